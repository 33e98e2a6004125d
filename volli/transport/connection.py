"""One WebSocket connection: the ``Session`` the hub sends to.

Sends never block the caller: frames go into a bounded queue that a writer greenlet,
spawned only while there is something to write, drains into the socket. A receiver
whose queue would pass its limit is closed (4002) and the send reports False, so one
slow or dead peer never holds up a sender. Relays that will never be written are
reported (per sender) through ``on_dropped``.
"""

from __future__ import annotations

import collections
import secrets
from collections import Counter
from typing import Callable

import gevent
from simple_websocket import ConnectionClosed

from ..protocol import CloseCode
from .socket_guard import GuardedSocket

# Seconds the handler waits for the peer's answer to a server-initiated close.
CLOSE_WAIT = 2.0


class Connection:
    def __init__(self, ws, sock: GuardedSocket, queue_limit: int, send_timeout: float,
                 remote_addr: str, on_close: Callable[["Connection"], None],
                 on_dropped: Callable[[str, Counter[str]], None]) -> None:
        self.id = secrets.token_hex(8)
        self.user_id: str | None = None
        self.public_key: str | None = None
        self.signed = False
        self.nonce = ""
        self.remote_addr = remote_addr
        self.close_code: int | None = None
        self._ws = ws
        self._sock = sock
        # (frame text, userId of the sender it relays for, or None for server replies)
        self._queue: collections.deque[tuple[str, str | None]] = collections.deque()
        self._queued = 0
        self._queue_limit = queue_limit
        self._send_timeout = send_timeout
        self._writer: gevent.Greenlet | None = None
        # Called once, as soon as the connection is known to be closing: presence must not
        # wait for the close handshake (a slow peer may never complete it).
        self._on_close = on_close
        # Called with (this userId, {sender: count}) for relays that will never be written.
        self._on_dropped = on_dropped

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def send(self, text: str, origin: str | None = None) -> bool:
        if self.close_code is not None:
            return False
        if self._queued + len(text) > self._queue_limit:
            self.close(CloseCode.SLOW_CONSUMER, "too slow: send queue full")
            return False
        self._queue.append((text, origin))
        self._queued += len(text)
        if self._writer is None:
            self._writer = gevent.spawn(self._drain)
        return True

    def _drain(self) -> None:
        try:
            while self._queue:
                text, _ = self._queue.popleft()
                self._queued -= len(text)
                self._ws.send(text)
        except (ConnectionClosed, OSError):
            self._abort()
        finally:
            self._writer = None

    def close(self, code: int, reason: str = "") -> None:
        """Start closing with ``code``; returns at once. What is already queued is written
        first (so a final message such as session-replaced arrives), except for a slow
        consumer, whose queue is dropped."""
        if not self._mark_closed(code):
            return
        if code == CloseCode.SLOW_CONSUMER:
            self._drop_queue()
        gevent.spawn(self._send_close, code, reason)

    def _mark_closed(self, code: int) -> bool:
        """First call wins: record the code and release presence at once."""
        if self.close_code is not None:
            return False
        self.close_code = code
        self._on_close(self)
        return True

    def _drop_queue(self) -> None:
        undelivered = Counter(origin for _, origin in self._queue if origin is not None)
        self._queue.clear()
        self._queued = 0
        if undelivered and self.user_id is not None:
            self._on_dropped(self.user_id, undelivered)

    def _send_close(self, code: int, reason: str) -> None:
        writer = self._writer
        if writer is not None:
            writer.join(timeout=self._send_timeout)
        if self._writer is not None:  # still stuck: give up on the peer
            self._abort()
            return
        try:
            self._ws.close(code, reason)
        except (ConnectionClosed, OSError):
            self._abort()
        self._wake_handler()

    def _abort(self) -> None:
        """The peer is gone or unusable: drop the queue and cut the socket."""
        self._mark_closed(CloseCode.ABNORMAL)
        self._drop_queue()
        self._sock.abort()
        self._wake_handler()

    def _wake_handler(self) -> None:
        # simple-websocket only wakes receive() on reader events; a close started here
        # must end the handler's receive() too.
        self._ws.connected = False
        self._ws.event.set()

    def finish(self) -> None:
        """The handler is done: record how the peer closed, report relays it never got,
        and let it answer our close frame before gunicorn closes the socket."""
        self._mark_closed(int(self._ws.close_reason))
        self._drop_queue()
        self._ws.thread.join(timeout=CLOSE_WAIT)
