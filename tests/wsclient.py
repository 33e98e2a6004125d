"""A lean blocking WebSocket client on a raw socket, for tests that open thousands of
connections (python-websockets costs the client more CPU than the server), and a look at
the gunicorn worker's process."""

from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path

from conftest import Server
from rawclient import masked

HANDSHAKE = ("GET /signaling HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n")


def _read_text(sock: socket.socket, buf: bytearray) -> str:
    """The next unfragmented server text frame (servers do not mask); a keepalive ping
    that comes first is skipped."""
    while True:
        if len(buf) >= 2:
            n, start = buf[1] & 0x7F, 2
            if n == 126:
                n, start = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, start = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) >= start + n:
                opcode, text = buf[0] & 0x0F, bytes(buf[start:start + n]).decode()
                del buf[:start + n]
                if opcode == 0x1:
                    return text
                continue
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data


def register_once(port: int, user_id: str, public_key: str) -> dict:
    """Open, read hello, register unsigned, close: the reply to register."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(HANDSHAKE.format(key=base64.b64encode(os.urandom(16)).decode()).encode())
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        status = bytes(buf[:12])
        assert status.endswith(b"101"), bytes(buf)
        del buf[:buf.index(b"\r\n\r\n") + 4]
        assert json.loads(_read_text(sock, buf))["type"] == "hello"
        sock.sendall(masked(0x1, json.dumps({"type": "register", "userId": user_id,
                                             "publicKey": public_key}).encode()))
        return json.loads(_read_text(sock, buf))


def churn_registrations(port: int, count: int, public_key: str, tag: str) -> None:
    for i in range(count):
        reply = register_once(port, f"{tag}-{i}@churn", public_key)
        assert reply["type"] == "registered", reply


def worker_pid(srv: Server) -> int:
    """The one gunicorn worker of ``srv`` (a child of its master)."""
    children = [int(pid) for task in Path(f"/proc/{srv.proc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    assert len(children) == 1, children
    return children[0]


def worker_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
