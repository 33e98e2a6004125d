"""Attack 3 on the endpoint: a wss client that hangs up while the 101 is being written.

volli/endpoint.py's ``client_left`` handler promises "one line and no traceback" for a client
that leaves during the handshake, but it handles ConnectionError only. Over TLS the write
of the 101 (simple_websocket's handshake, through gevent's SSLSocket) raises
ssl.SSLEOFError / ssl.SSLError, which is an OSError but not a ConnectionError: Flask logs
"Exception on /signaling" at ERROR with a full traceback, and answers 500, for an ordinary
client hang-up. (Plain TCP takes the one-line path.)
"""

from __future__ import annotations

import base64
import socket
import ssl
import time

from certs import self_signed
from conftest import Server

REQ = ("GET /signaling HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
       "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
       f"{base64.b64encode(b'k' * 16).decode()}\r\n\r\n").encode()


def test_a_wss_client_leaving_during_the_handshake_logs_no_traceback(tmp_path):
    cert, key = self_signed(tmp_path)
    srv = Server(tmp_path, {"VOLLI_TLS_CERTFILE": str(cert), "VOLLI_TLS_KEYFILE": str(key),
                            "WEB_CONCURRENCY": "1"})
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    try:
        srv.wait_log("volli ready", 20)
        for _ in range(10):
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(REQ)
            tls.close()  # gone before the 101
        time.sleep(2)
        log = srv.log()
        errors = [line for line in log.splitlines()
                  if "Exception on /signaling" in line or line.startswith("ssl.SSL")]
        assert not errors, "\n".join(errors[:6])
    finally:
        srv.stop()
