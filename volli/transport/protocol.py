"""The server side of one WebSocket connection, sans-I/O (RFC 6455): bytes in, events out;
messages in, buffers out. No sockets, greenlets or timers: ``volli.transport.connection``
moves the bytes and keeps the time.

Input. ``receive_data`` parses a read (``frames.FrameParser``) and returns how many frames
to charge to the frame-rate limit now (every 64); ``events_received`` then yields
``(OP_TEXT, str)``, ``(OP_BINARY, bytes)``, ``(OP_PING, payload)`` (a pong is now waiting to
be sent) and ``(OP_CLOSE, (code, reason))`` (close with that code: the peer's, echoed, or a
protocol violation's), in order, and stops as soon as the connection is closing. Pongs are
handled here. Once closing, input is discarded.

Output. A bounded queue of frames, each tagged with the sender of a relay so that what is
never written can be reported per sender. ``data_to_send`` gives the buffers for one
``sendmsg``; ``data_sent(n)`` acknowledges the bytes written (0 when none were). A pong
answers only the latest ping (RFC 6455 5.5.3): one waits at most, and goes out only between
frames. Nothing is queued after our close frame.

States: OPEN; CLOSING once a close code is decided (by either side; our close frame follows
with ``send_close``); CLOSED once the transport is gone (``receive_eof``).
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections import Counter
from typing import Any, Iterable, Iterator

from .frames import (
    OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameError, FrameParser, close_frame, frame,
)

FRAME_BATCH = 64  # frames counted here before the caller charges the frame-rate limit
MAX_IOV = 512  # buffers per sendmsg
PING_FRAME = frame(OP_PING, b"")


class State(enum.IntEnum):
    OPEN = 0
    CLOSING = 1
    CLOSED = 2


# What send_text did with a message.
QUEUED, BUSY, FULL, NOT_OPEN = 0, 1, 2, 3


class ServerProtocol:
    __slots__ = ("state", "close_code", "awaiting_pong", "_parser", "_deflate", "_events",
                 "_error", "_out", "_offset", "_queued", "_queue_limit", "_pong", "_sending",
                 "_pong_sending", "_close_sent")

    def __init__(self, *, max_message_size: int, queue_limit: int, deflate=None) -> None:
        self.state = State.OPEN
        self.close_code: int | None = None  # decided by either side; first one wins
        self.awaiting_pong = False
        self._parser = FrameParser(max_message_size, deflate)
        self._deflate = deflate
        self._events: list[tuple[int, Any]] | tuple = ()  # parsed, not yet handed out
        self._error: FrameError | None = None  # the violation after those events
        self._out: collections.deque[tuple[bytes, str | None]] = collections.deque()
        self._offset = 0  # bytes of the first queued frame already written
        self._queued = 0  # bytes queued (the waiting pong included) and not yet written
        self._queue_limit = queue_limit
        self._pong: bytes | None = None  # the answer to the latest ping, not yet queued
        self._sending = 0  # frames handed out by data_to_send and not yet acknowledged
        self._pong_sending = False  # ... the first of them the pong
        self._close_sent = False  # our close frame is queued

    # -- input --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> int:
        """Parse one read; returns the frames to charge now (0 until a batch is full)."""
        if self.close_code is not None:
            return 0  # closing: discard until the peer closes
        parser = self._parser
        try:
            self._events = parser.feed(data)
        except FrameError as exc:
            self._events, self._error = exc.events, exc
        if parser.frames >= FRAME_BATCH:  # every frame counts: pings, continuations too
            frames, parser.frames = parser.frames, 0
            return frames
        return 0

    def events_received(self) -> Iterable[tuple[int, Any]]:
        """The events of the last read, in order, until the connection is closing."""
        events, self._events = self._events, ()
        if self._error is None and (not events or len(events) == 1
                                    and events[0][0] <= OP_BINARY):
            return events  # the usual read, one message: no generator
        return self._in_order(events)

    def _in_order(self, events) -> Iterator[tuple[int, Any]]:
        for event in events:
            if self.close_code is not None:
                return
            opcode = event[0]
            if opcode == OP_TEXT or opcode == OP_BINARY:
                yield event
            elif opcode == OP_PING:
                self._set_pong(frame(OP_PONG, event[1]))
                yield event
            elif opcode == OP_PONG:
                self.awaiting_pong = False
            else:  # the peer closes: echo its code
                yield OP_CLOSE, (event[1][0], "")
        error, self._error = self._error, None
        if error is not None and self.close_code is None:
            yield OP_CLOSE, (error.code, error.reason)

    def receive_eof(self) -> Counter[str]:
        """The transport is gone: returns the relays never written, per sender."""
        self.state = State.CLOSED
        return self.drop_queue()

    # -- output -------------------------------------------------------------------------

    def send_text(self, text: str, origin: str | None = None, window_full: bool = False) -> int:
        """Queue a text frame (a relay from ``origin``): QUEUED; BUSY if a relay must wait
        (nothing queued); FULL if the queue would pass its limit (close with 4002); NOT_OPEN.
        A relay waits when it would pass the limit, or an eighth of it while the peer's
        ``window_full``: other peers cannot fill a receiver's queue to get it closed. A
        burst within one turn of the loop, about to be flushed, is not refused."""
        if self.close_code is not None:
            return NOT_OPEN
        payload = text.encode()
        limit = self._queue_limit
        if self._deflate is None:
            data = frame(OP_TEXT, payload)
            size = len(data)
        else:
            # A refused relay must never enter the deflate stream (the peer would inflate
            # later frames against text it never got): decide on a bound of its size.
            data, size = None, _deflated_bound(len(payload))
        if origin is not None and self._queued:
            queued = self._queued + size
            if queued > limit or window_full and queued > limit >> 3:
                return BUSY
        if data is None:
            data = frame(OP_TEXT, self._deflate.compress(payload), rsv1=True)
        queued = self._queued + len(data)
        if queued > limit:
            return FULL  # the connection closes: what the stream holds no longer matters
        self._out.append((data, origin))
        self._queued = queued
        return QUEUED

    def send_ping(self) -> bool:
        """Queue a keepalive ping; False once closing."""
        if self.close_code is not None:
            return False
        self.awaiting_pong = True
        self._out.append((PING_FRAME, None))
        self._queued += len(PING_FRAME)
        return True

    def begin_close(self, code: int) -> bool:
        """Decide the close code (input is discarded from now on); False if one was."""
        if self.close_code is not None:
            return False
        self.close_code = code
        if self.state is State.OPEN:
            self.state = State.CLOSING
        return True

    def send_close(self, code: int, reason: str = "") -> None:
        """Queue our close frame, after what is queued; nothing may follow it."""
        self.begin_close(code)
        self._set_pong(None)
        data = close_frame(code, reason)
        self._out.append((data, None))
        self._queued += len(data)
        self._close_sent = True

    def close_expected(self) -> bool:
        """Our close frame is queued: once it is written, shut the write side and let the
        peer close the transport."""
        return self._close_sent

    def _set_pong(self, pong: bytes | None) -> None:
        """The one pending pong: a newer ping replaces it."""
        if self._pong is not None:
            self._queued -= len(self._pong)
        if pong is not None:
            self._queued += len(pong)
        self._pong = pong

    def has_output(self) -> bool:
        return bool(self._out) or self._pong is not None

    def data_to_send(self) -> list:
        """Buffers for one write, the partly written frame first. Acknowledge with
        ``data_sent`` before the next call."""
        out = self._out
        if self._pong is not None and not self._offset:  # control frames go between frames
            out.appendleft((self._pong, None))
            self._pong = None
            self._pong_sending = True
        if len(out) == 1:  # the usual case while the peer keeps up
            bufs = [out[0][0]]
        else:
            bufs = [data for data, _ in itertools.islice(out, MAX_IOV)]
        if self._offset:
            bufs[0] = memoryview(bufs[0])[self._offset:]
        self._sending = len(bufs)
        return bufs

    def data_sent(self, sent: int) -> bool:
        """``sent`` bytes of the last ``data_to_send`` were written; returns whether output
        remains."""
        out = self._out
        self._sending = 0
        if self._pong_sending:
            self._pong_sending = False
            if not sent and self._pong is None:  # not started: a newer ping may replace it
                self._pong = out.popleft()[0]
        self._queued -= sent
        sent += self._offset
        while out and sent >= len(out[0][0]):
            sent -= len(out.popleft()[0])
        self._offset = sent
        return bool(out) or self._pong is not None

    def drop_queue(self, keep_started: bool = False) -> Counter[str]:
        """Discard what is queued; returns the relays dropped, per sender. With
        ``keep_started``, frames already (partly) handed to the transport stay, since a
        frame cut short would corrupt the stream."""
        out = self._out
        started = (self._sending or (1 if self._offset else 0)) if keep_started else 0
        kept = [out.popleft() for _ in range(min(started, len(out)))]
        undelivered = Counter(origin for _, origin in out if origin is not None)
        out.clear()
        out.extend(kept)
        if not kept:
            self._offset = 0
        self._pong = None
        self._queued = sum(len(data) for data, _ in kept) - self._offset
        return undelivered

    # -- flow control -------------------------------------------------------------------

    def should_pause(self) -> bool:
        """Backpressure: over half the limit queued, stop reading this peer (its own
        requests would only add to it)."""
        return self._queued > self._queue_limit >> 1 and self.close_code is None

    def may_resume(self) -> bool:
        """Below an eighth of the limit, read it again."""
        return self._queued <= self._queue_limit >> 3

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def offset(self) -> int:
        """Bytes of the first queued frame already written."""
        return self._offset


def _deflated_bound(length: int) -> int:
    """The most a text frame of ``length`` bytes can take once deflated (zlib's
    deflateBound, plus the frame header)."""
    return length + (length >> 12) + (length >> 14) + 32
