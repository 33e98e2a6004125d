"""Attack 3 on the transport (TLS, served in place by Connection.serve()).

Once our close frame is written, Connection._shut_write calls ``self._sock.shutdown(SHUT_WR)``.
On a TLS socket that is gevent's SSLSocket.shutdown, which *drops the SSL object*
(``self._sslobj = None``) before shutting the TCP write side. The reader, serve(), is
blocked in ``self._sock.recv``: when the peer answers (its close frame, or its FIN), the
read finds no SSL object and raises ValueError("Read on closed or unwrapped SSL socket."),
which serve() does not catch (it catches OSError only). So every closed wss connection:
- logs "Exception on /signaling" with a traceback at ERROR (and a 500 in the access log);
- is not released when the peer closes: its slot and descriptor stay until the CLOSE_WAIT
  timer (2 s + VOLLI_SEND_TIMEOUT) releases it.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request

from certs import self_signed
from conftest import Client, Server


def _health(srv, context):
    with urllib.request.urlopen(f"https://localhost:{srv.port}/health", context=context,
                                timeout=5) as response:
        return json.loads(response.read())


def test_a_normal_wss_close_is_released_at_once_and_logs_no_error(tmp_path):
    cert, key = self_signed(tmp_path)
    srv = Server(tmp_path, {"VOLLI_TLS_CERTFILE": str(cert), "VOLLI_TLS_KEYFILE": str(key),
                            "WEB_CONCURRENCY": "1", "VOLLI_SEND_TIMEOUT": "10"})
    context = ssl.create_default_context(cafile=str(cert))
    try:
        srv.wait_log("volli ready", 20)
        url = f"wss://localhost:{srv.port}/signaling"
        clients = [Client(url, ssl=context) for _ in range(3)]
        for i, client in enumerate(clients):
            client.register(f"tls{i}@x")
        assert _health(srv, context)["connections"] == 3
        closed_at = time.monotonic()
        for client in clients:
            client.close()  # the client's close handshake, then it closes TCP
        # The peers closed: the slots should be free well before CLOSE_WAIT + send timeout.
        deadline = closed_at + 4
        while _health(srv, context)["connections"] and time.monotonic() < deadline:
            time.sleep(0.1)
        still = _health(srv, context)["connections"]
        time.sleep(0.5)
        log = srv.log()
        errors = [line for line in log.splitlines()
                  if "Exception on /signaling" in line or "Read on closed or unwrapped" in line]
        assert still == 0 and not errors, (
            f"{still} connections still held 4 s after their clients closed; "
            f"{len(errors)} error lines:\n" + "\n".join(errors[:6]))
    finally:
        srv.stop()
