"""One WebSocket connection after the handshake: the ``Session`` the hub sends to.

Reading. A plain TCP connection leaves gunicorn's request greenlet: its socket is
duplicated, the handler returns, and a greenlet is spawned only while the socket has
input, so an idle connection holds no greenlet and no request state (the parked request
stack was most of its memory). A TLS socket cannot be duplicated; it is read in its
request greenlet instead. Past the read, both are the same.

Writing. Frames go into a bounded queue; everything queued in one turn of the event loop
leaves in one non-blocking ``sendmsg``. A writer greenlet exists only while the peer's
window is full; one that makes no progress within the send timeout cuts the peer off.
A receiver whose queue would pass its limit is closed (4002) and the send reports False,
so one slow peer never holds up a sender. Relays that will never be written are reported
per sender through the hub. A relay is refused (peer-busy, to its sender) when it would
pass the limit, or an eighth of it while the peer's window is full: other peers cannot
fill a receiver's queue on purpose to get it closed. Pongs answer only the latest ping (RFC 6455 5.5.3): one
waits at most, so a ping flood cannot grow the queue; every frame counts in its bytes.

Backpressure. While the queue is over half its limit the connection is not read (its
own requests would only add to it); below an eighth reading resumes. One that stays over
for the send timeout is closed (4002).

Closing. Whoever closes first, presence is released at once. Our close frame goes out
after what is already queued (but a slow consumer's queue is dropped); then the write
side is shut and the peer's input discarded until it closes or CLOSE_WAIT passes.
"""

from __future__ import annotations

import _socket
import collections
import itertools
import logging
import secrets
from collections import Counter
from typing import Callable, Protocol

import gevent
from gevent import get_hub
from gevent.event import Event

from ..protocol import CloseCode, ErrorCode, ProtocolError
from .frames import (
    OP_BINARY, OP_PING, OP_PONG, OP_TEXT, FrameError, FrameParser, close_frame, frame,
)
from .readers import readers

log = logging.getLogger("volli.ws")

CLOSE_WAIT = 2.0  # seconds the peer gets to finish the close handshake
RECV_SIZE = 65536
READS_PER_TURN = 8  # then other connections get a turn
FRAME_BATCH = 64  # frames counted here before the hub's frame-rate limit is charged
MAX_IOV = 512  # buffers per sendmsg
PING_FRAME = frame(OP_PING, b"")


class Events(Protocol):
    """What a connection reports to (the hub)."""

    def receive_text(self, session: "Connection", text: str) -> None: ...

    def receive_binary(self, session: "Connection") -> None: ...

    def receive_frames(self, session: "Connection", count: int) -> None: ...

    def disconnect(self, session: "Connection",
                   then: Callable[[], None] = lambda: None) -> None: ...

    def report_undelivered(self, peer: str, undelivered: Counter[str]) -> None: ...


class _SendTimeout(Exception):
    pass


class Connection:
    # Only TLS connections set these. An instance dict past 30 keys stops sharing its keys
    # with the others and grows from about 0.3 to 1.6 kB: keep __init__ under that.
    _resumed: Event | None = None  # wakes a paused serve()
    _sending = 0  # frames at the queue's head inside a TLS sendall

    def __init__(self, sock, *, detached: bool, events: Events, max_message_size: int,
                 queue_limit: int, send_timeout: float, remote_addr: str, deflate=None,
                 on_finished: Callable[["Connection"], None] = lambda conn: None) -> None:
        self.id = secrets.token_hex(8)
        self.user_id: str | None = None
        self.public_key: str | None = None
        self.signed = False
        self.nonce = ""
        self.remote_addr = remote_addr
        self.close_code: int | None = None
        self._sock = sock  # detached: a non-blocking _socket.socket; TLS: gevent's SSLSocket
        self._detached = detached
        self._events = events
        self._parser = FrameParser(max_message_size, deflate)
        self._deflate = deflate
        self._out: collections.deque[tuple[bytes, str | None]] = collections.deque()
        self._offset = 0  # bytes of the first queued frame already written
        self._queued = 0  # bytes queued and not yet written
        self._queue_limit = queue_limit
        # Backpressure: not read while over half the limit (the timer then closes it after
        # the send timeout), read again below an eighth.
        self._stall = None
        self._pong: bytes | None = None  # the answer to the latest ping, not yet written
        self._send_timeout = send_timeout
        self._flushing = False  # a flush callback or the writer will write what is queued
        self._writer: gevent.Greenlet | None = None
        self._closing = False  # our close frame is queued: nothing may follow it
        self._write_shut = False
        self._released = False
        self._awaiting_pong = False
        self._reading = False  # a reader greenlet has this connection
        self._watcher = None
        self._timers: list = []  # event-loop timers: a greenlet only once one fires
        self._on_finished = on_finished

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    # -- sending ----------------------------------------------------------------------

    def send(self, text: str, origin: str | None = None) -> bool:
        if self.close_code is not None:
            return False
        payload = text.encode()
        if self._deflate is not None:
            data = frame(OP_TEXT, self._deflate.compress(payload), rsv1=True)
        else:
            data = frame(OP_TEXT, payload)
        queued = self._queued
        if origin is not None and queued and self._busy(queued + len(data)):
            raise ProtocolError(ErrorCode.PEER_BUSY,
                                f"{self.user_id!r} is not reading fast enough; retry shortly")
        if queued + len(data) > self._queue_limit:
            self.close(CloseCode.SLOW_CONSUMER, "too slow: send queue full")
            return False
        self._push(data, origin)
        return True

    def _busy(self, queued: int) -> bool:
        """Whether a relay that would leave ``queued`` bytes queued must wait: past the
        limit, or past an eighth of it while the peer's window is full (a writer waits). A
        burst within one turn of the loop, about to be flushed, is not refused."""
        return queued > self._queue_limit or (self._writer is not None
                                              and queued > self._queue_limit >> 3)

    def _push(self, data: bytes, origin: str | None = None) -> None:
        self._out.append((data, origin))
        self._queued += len(data)
        if not self._flushing:
            self._flush_soon()

    def _flush_soon(self) -> None:
        self._flushing = True
        get_hub().loop.run_callback(self._flush)

    def _set_pong(self, pong: bytes | None) -> None:
        """The one pending pong: a newer ping replaces it (RFC 6455 5.5.3)."""
        if self._pong is not None:
            self._queued -= len(self._pong)
        if pong is not None:
            self._queued += len(pong)
            if not self._flushing:
                self._flush_soon()
        self._pong = pong

    def _flush(self) -> None:
        """Runs in the event loop after the current greenlet yields: never blocks."""
        if self._writer is not None or self._released:
            return
        self._flushing = False
        if self._detached:
            try:
                while self._out or self._pong:
                    self._write_some()
            except BlockingIOError:
                pass
            except OSError:  # the peer is gone; releasing may block, not here
                gevent.spawn(self._release)
                return
        if self._out or self._pong:
            self._flushing = True
            self._writer = gevent.spawn(self._write_waiting)
        elif self._closing:
            self._shut_write()

    def _write_some(self) -> None:
        out = self._out
        pong = None if self._offset else self._pong  # control frames go between frames
        if len(out) == 1 and pong is None:
            data = out[0][0]
            sent = self._sock.send(memoryview(data)[self._offset:] if self._offset else data)
        else:
            bufs = [data for data, _ in itertools.islice(out, MAX_IOV)]
            if self._offset:
                bufs[0] = memoryview(bufs[0])[self._offset:]
            elif pong is not None:
                bufs.insert(0, pong)
            sent = self._sock.sendmsg(bufs)
        self._queued -= sent
        if pong is not None:  # (partly) written: it heads the queue and must finish first
            self._pong = None
            out.appendleft((pong, None))
        sent += self._offset
        while out and sent >= len(out[0][0]):
            sent -= len(out.popleft()[0])
        self._offset = sent
        if self._stall is not None and self._queued <= self._queue_limit >> 3:
            self._resume()

    def _write_waiting(self) -> None:
        """The writer: drains the queue while the peer's window is full."""
        try:
            if self._detached:
                watcher = get_hub().loop.io(self._sock.fileno(), 2)
                try:
                    while self._out or self._pong:
                        try:
                            self._write_some()
                        except BlockingIOError:
                            with gevent.Timeout(self._send_timeout, _SendTimeout):
                                get_hub().wait(watcher)
                finally:
                    watcher.close()
            else:
                while self._out or self._pong:
                    if self._pong is not None:  # nothing is partly written here
                        self._out.appendleft((self._pong, None))
                        self._pong = None
                    count = self._sending = len(self._out)
                    data = b"".join(data for data, _ in itertools.islice(self._out, count))
                    with gevent.Timeout(self._send_timeout, _SendTimeout):
                        self._sock.sendall(data)
                    for _ in range(count):
                        self._out.popleft()
                    self._sending = 0
                    self._queued -= len(data)
                    if self._stall is not None and self._queued <= self._queue_limit >> 3:
                        self._resume()
        except (_SendTimeout, OSError) as exc:  # the peer is gone or unusable
            if isinstance(exc, _SendTimeout):
                log.info("connection %s (user=%s) took no data for %gs: cut off",
                         self.id, self.user_id, self._send_timeout)
            self._writer = None
            self._release()
            return
        self._writer = None
        self._flushing = False
        if self._closing:
            self._shut_write()

    def _shut_write(self) -> None:
        """Our close frame is out: FIN tells the peer, and it answers by closing."""
        if not self._write_shut:
            self._write_shut = True
            try:
                self._sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass

    # -- receiving --------------------------------------------------------------------

    def start(self, register_timeout: float) -> None:
        """Start reading (detached) and the register deadline."""
        self._after(register_timeout, self._register_deadline)
        if self._detached:
            self._watcher = get_hub().loop.io(self._sock.fileno(), 1)
            self._watcher.start(self._readable)

    def _readable(self) -> None:
        # The watcher stays on (stopping and starting it costs epoll_ctl calls); input
        # that is already being read is ignored here.
        if not self._reading:
            self._reading = True
            readers.submit(self)

    def read(self) -> None:
        """Read what is waiting (in a reader greenlet)."""
        try:
            for _ in range(READS_PER_TURN):
                try:
                    data = self._sock.recv(RECV_SIZE)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not self._received(data):
                    return
                if self._queued > self._queue_limit >> 1 and self.close_code is None:
                    self._pause()
                    return
        finally:
            self._reading = False

    def serve(self) -> None:
        """Read in the calling greenlet until the connection is over (TLS)."""
        while True:
            try:
                data = self._sock.recv(RECV_SIZE)
            except OSError:
                data = b""
            self._reading = True
            try:
                if not self._received(data):
                    return
            finally:
                self._reading = False
            if self._queued > self._queue_limit >> 1 and self.close_code is None:
                if self._resumed is None:
                    self._resumed = Event()
                self._resumed.clear()
                self._pause()
                self._resumed.wait()

    def _pause(self) -> None:
        """Backpressure: stop reading until our own output drains (or cut it off)."""
        if self._watcher is not None:
            self._watcher.stop()
        self._stall = get_hub().loop.timer(self._send_timeout)
        self._stall.start(gevent.spawn, self._stalled)

    def _resume(self) -> None:
        self._stall.close()
        self._stall = None
        if self._watcher is not None:
            self._watcher.start(self._readable)
        elif self._resumed is not None:
            self._resumed.set()

    def _stalled(self) -> None:
        if self._stall is not None:
            log.info("connection %s (user=%s) left its output unread for %gs: closed",
                     self.id, self.user_id, self._send_timeout)
            self.close(CloseCode.SLOW_CONSUMER, "too slow: output not read")

    def _received(self, data: bytes) -> bool:
        """Handle one read; False once there is nothing more to read."""
        if not data:
            self._release()
            return False
        if self.close_code is not None:
            return True  # closing: discard until the peer closes
        parser = self._parser
        try:
            events, error = parser.feed(data), None
        except FrameError as exc:
            events, error = exc.events, exc
        if parser.frames >= FRAME_BATCH:  # every frame counts: pings, continuations too
            frames, parser.frames = parser.frames, 0
            self._events.receive_frames(self, frames)
        try:
            for opcode, value in events:
                if self.close_code is not None:
                    break
                if opcode == OP_TEXT:
                    self._events.receive_text(self, value)
                elif opcode == OP_BINARY:
                    self._events.receive_binary(self)
                elif opcode == OP_PING:
                    self._set_pong(frame(OP_PONG, value))
                elif opcode == OP_PONG:
                    self._awaiting_pong = False
                else:  # the peer closes: echo its code
                    self._mark_closed(value[0], "")  # echoed
            if error is not None and self.close_code is None:
                self.close(error.code, error.reason)
        except Exception:
            log.exception("connection %s failed", self.id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
        return True

    def keepalive(self) -> None:
        """Called every ping interval: a peer that did not answer the last ping is closed."""
        if self.close_code is not None:
            return
        if self._awaiting_pong:
            # Input still being handled (a request waiting for Redis, say) may hold the
            # pong: the peer is alive, only this worker is slow to read it.
            if not self._reading:
                self.close(CloseCode.POLICY_VIOLATION, "Ping/Pong timeout")
            return
        self._awaiting_pong = True
        self._push(PING_FRAME)

    def _register_deadline(self) -> None:
        if self.user_id is None and self.close_code is None:
            self.close(CloseCode.REGISTER_TIMEOUT, "register timeout")

    # -- closing ----------------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Start closing with ``code``; returns at once."""
        self._mark_closed(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        if self._released:  # the socket went first
            return
        self._closing = True
        self._set_pong(None)  # nothing may follow the close frame
        self._push(close_frame(code, reason))
        self._after(CLOSE_WAIT + self._send_timeout, self._release)

    def _after(self, seconds: float, action: Callable[[], None]) -> None:
        """Run ``action`` in a new greenlet after ``seconds``, unless released first."""
        timer = get_hub().loop.timer(seconds)
        timer.start(gevent.spawn, action)
        self._timers.append(timer)

    def _mark_closed(self, code: int, reason: str | None = None) -> bool:
        """First call wins: record the code and release presence at once; with a
        ``reason``, our close frame follows once the release is done (a client that sees
        it finds its ID free)."""
        if self.close_code is not None:
            return False
        self.close_code = code
        # The writer must not drain, while the release is under way, what a slow
        # consumer's queue held (its senders are told it was dropped).
        if code == CloseCode.SLOW_CONSUMER:
            self._drop_queue(keep_started=True)
        if reason is None:
            self._events.disconnect(self)
        else:
            self._events.disconnect(self, lambda: self._send_close(code, reason))
        return True

    def _drop_queue(self, keep_started: bool = False) -> None:
        """Discard what is queued; with ``keep_started``, frames already (partly) handed to
        the socket stay, since a frame cut short would corrupt the stream."""
        out = self._out
        started = (1 if self._offset else self._sending) if keep_started else 0
        kept = [out.popleft() for _ in range(started)]
        undelivered = Counter(origin for _, origin in out if origin is not None)
        out.clear()
        out.extend(kept)
        if not kept:
            self._offset = 0
        self._pong = None
        self._queued = sum(len(data) for data, _ in kept) - self._offset
        if undelivered and self.user_id is not None:
            self._events.report_undelivered(self.user_id, undelivered)

    def _release(self) -> None:
        """The end: report what was never written, close the socket, account."""
        if self._released:
            return
        self._released = True
        self._mark_closed(CloseCode.ABNORMAL)
        self._drop_queue()
        if self._stall is not None:
            self._stall.close()
        if self._resumed is not None:
            self._resumed.set()  # a paused serve() reads the closed socket and returns
        current = gevent.getcurrent()
        for timer in self._timers:
            timer.close()
        if self._watcher is not None:
            self._watcher.close()
        writer = self._writer
        if writer is not None and writer is not current:
            # Close only once the writer has stopped waiting on the socket.
            writer.rawlink(lambda _: self._sock.close())
            writer.kill(block=False)
        else:
            self._sock.close()
        self._on_finished(self)
