"""One WebSocket connection: the ``Session`` the hub sends to.

Sends never block the caller: frames go into a bounded queue that a writer greenlet,
spawned only while there is something to write, drains into the socket. A receiver
whose queue would pass the byte limit is closed (4002) and the send reports False, so
one slow or dead peer never holds up a sender.
"""

from __future__ import annotations

import collections
import secrets
from typing import Callable

import gevent
from simple_websocket import ConnectionClosed

from ..protocol import CloseCode
from .socket_guard import GuardedSocket

# Seconds the handler waits for the peer's answer to a server-initiated close.
CLOSE_WAIT = 2.0


class Connection:
    def __init__(self, ws, sock: GuardedSocket, queue_limit: int, remote_addr: str,
                 on_close: Callable[["Connection"], None]) -> None:
        self.id = secrets.token_hex(8)
        self.user_id: str | None = None
        self.public_key: str | None = None
        self.remote_addr = remote_addr
        self.close_code: int | None = None
        self._ws = ws
        self._sock = sock
        self._queue: collections.deque[str] = collections.deque()
        self._queued = 0
        self._queue_limit = queue_limit
        self._writer: gevent.Greenlet | None = None
        # Called once, as soon as the connection is known to be closing: presence must
        # not wait for the close handshake (a slow peer may never complete it).
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def send(self, text: str) -> bool:
        if self.close_code is not None:
            return False
        if self._queued + len(text) > self._queue_limit:
            self.close(CloseCode.SLOW_CONSUMER, "too slow: send queue full")
            return False
        self._queue.append(text)
        self._queued += len(text)
        if self._writer is None:
            self._writer = gevent.spawn(self._drain)
        return True

    def _drain(self) -> None:
        try:
            while self._queue and self.close_code is None:
                text = self._queue.popleft()
                self._queued -= len(text)
                self._ws.send(text)
        except (ConnectionClosed, OSError):
            self._abort()
        finally:
            self._writer = None

    def close(self, code: int, reason: str = "") -> None:
        """Start closing with ``code``; returns at once (the close frame goes out later)."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._queue.clear()
        self._queued = 0
        self._on_close(self)
        gevent.spawn(self._send_close, code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        try:
            self._ws.close(code, reason)
        except (ConnectionClosed, OSError):
            self._abort()
        self._wake_handler()

    def _abort(self) -> None:
        """The peer is gone or unusable: cut the socket so the reader ends."""
        if self.close_code is None:
            self.close_code = CloseCode.ABNORMAL
            self._on_close(self)
        self._sock.abort()
        self._wake_handler()

    def _wake_handler(self) -> None:
        # simple-websocket only wakes receive() on reader events; a close started here
        # must end the handler's receive() too.
        self._ws.connected = False
        self._ws.event.set()

    def wait_closed(self) -> None:
        """Let the peer answer our close frame before gunicorn closes the socket."""
        self._ws.thread.join(timeout=CLOSE_WAIT)
