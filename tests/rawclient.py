"""A bare WebSocket client on wsproto, for peers that misbehave on purpose: never read,
never answer pings, or send frames a polite client library refuses to send."""

from __future__ import annotations

import json
import socket
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection, BytesMessage, CloseConnection, Message, Request, TextMessage,
)


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
           mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One client frame, built by hand (so it can be anything a peer might send)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0xFE]) + n.to_bytes(2, "big")
    else:
        head += bytes([0xFF]) + n.to_bytes(8, "big")
    key = int.from_bytes(mask * (n // 4 + 1), "little") & ((1 << 8 * n) - 1)
    return head + mask + (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


class RawClient:
    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host="127.0.0.1", target="/signaling")))
        self.events: list = []
        while not any(isinstance(e, AcceptConnection) for e in self.events):
            self._read()
        self.hello = json.loads(self.next_message())

    def _read(self) -> None:
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        self.events.extend(self.ws.events())

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def send_json(self, message: dict) -> None:
        self.send_text(json.dumps(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(Message(data=data)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_message(self, deadline: float = 5.0) -> str | bytes:
        """The next whole message (wsproto hands out a long one in parts)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for i, event in enumerate(self.events):
                if isinstance(event, (TextMessage, BytesMessage)) and event.message_finished:
                    head = self.events[:i + 1]
                    parts = [e for e in head if isinstance(e, (TextMessage, BytesMessage))]
                    self.events[:i + 1] = [e for e in head if e not in parts]
                    return event.data[:0].join(e.data for e in parts)
                if isinstance(event, CloseConnection):
                    raise ConnectionError(f"closed {event.code}")
            self._read()
        raise TimeoutError("no message")

    def wait_close(self, deadline: float = 10.0) -> int | None:
        """The close code the server sent, or None if the TCP connection just ended."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for event in self.events:
                if isinstance(event, CloseConnection):
                    return event.code
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        raise TimeoutError("connection not closed")

    def close(self) -> None:
        self.sock.close()
