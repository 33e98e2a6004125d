"""One WebSocket connection after the handshake: the gevent I/O driver of a
``ServerProtocol`` (``volli.transport.protocol``, the RFC 6455 state machine and the output
queue), and the ``Session`` the hub sends to.

Reading. A plain TCP connection leaves gunicorn's request greenlet: its socket is
detached, the handler returns, and a greenlet is spawned only while the socket has
input, so an idle connection holds no greenlet and no request state (the parked request
stack was most of its memory). A TLS socket cannot be detached; it is read in its
request greenlet instead. Past the read, both are the same.

Writing. What a connection's queue gathers leaves in one non-blocking ``sendmsg``, at
the end of the read that queued it (replies and relays alike), or, for output queued
outside a read, in one event-loop callback for all connections. A writer greenlet exists
only while the peer's window is full; one that makes
no progress within the send timeout cuts the peer off. A receiver whose queue would pass
its limit is closed (4002) and the send reports False, so one slow peer never holds up a
sender; a relay the protocol refuses is answered peer-busy to its sender. Relays that will
never be written are reported per sender through the hub.

Backpressure. While the queue is over half its limit the connection is not read; below an
eighth reading resumes. One that stays over for the send timeout is closed (4002).

Closing. Whoever closes first, presence is released at once. Our close frame goes out
after what is already queued (but a slow consumer's queue is dropped); then the write
side is shut and the peer's input discarded until it closes or CLOSE_WAIT passes.
"""

from __future__ import annotations

import _socket
import logging
import secrets
from collections import Counter
from typing import Callable, Protocol

import gevent
from gevent import get_hub
from gevent.socket import socket as GeventSocket
from gevent.event import Event

from ..protocol import CloseCode, ErrorCode, ProtocolError
from .frames import OP_BINARY, OP_CLOSE, OP_TEXT
from .protocol import BUSY, FULL, QUEUED, ServerProtocol, State
from .readers import readers

log = logging.getLogger("volli.ws")

CLOSE_WAIT = 2.0  # seconds the peer gets to finish the close handshake
RECV_SIZE = 65536
READS_PER_TURN = 8  # then other connections get a turn


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


class _Due:
    """Connections with output queued and a flush on the way. Written at the end of the
    next read (of any connection), or by one event-loop callback, whichever comes first."""

    def __init__(self) -> None:
        self._conns: list[Connection] = []
        self._scheduled = False

    def add(self, conn: "Connection") -> None:
        self._conns.append(conn)
        if not self._scheduled:
            self._scheduled = True
            get_hub().loop.run_callback(self._callback)

    def _callback(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Never blocks: each connection writes what its socket takes now. One that fails
        (a bug) is closed; the others in the batch are written all the same."""
        while self._conns:
            conns, self._conns = self._conns, []
            for conn in conns:
                try:
                    conn._flush()
                except Exception:
                    log.exception("writing to connection %s failed", conn.id)
                    gevent.spawn(conn._release)


due = _Due()


class Connection:
    # Only TLS connections set this. An instance dict past 30 keys stops sharing its keys
    # with the others and grows from about 0.3 to 1.6 kB: keep __init__ under that.
    _resumed: Event | None = None  # wakes a paused serve()

    def __init__(self, sock, *, detached: bool, events: Events, max_message_size: int,
                 queue_limit: int, send_timeout: float, remote_addr: str, deflate=None,
                 on_finished: Callable[["Connection"], None] = lambda conn: None) -> None:
        self.id = secrets.token_hex(8)
        self.user_id: str | None = None
        self.public_key: str | None = None
        self.signed = False
        self.encryption_key = None  # an EncryptionKey published with a signed registration
        self.nonce = ""
        self.remote_addr = remote_addr
        self._sock = sock  # detached: a non-blocking _socket.socket; TLS: gevent's SSLSocket
        self._detached = detached
        self._events = events
        self._protocol = ServerProtocol(max_message_size=max_message_size,
                                        queue_limit=queue_limit, deflate=deflate)
        self._stall = None  # the timer that closes a connection paused too long
        self._send_timeout = send_timeout
        self._flushing = False  # a flush callback or the writer will write what is queued
        self._writer: gevent.Greenlet | None = None
        self._write_shut = False
        self._reading = False  # a reader greenlet has this connection
        self._watcher = None
        self._timers: list = []  # event-loop timers: a greenlet only once one fires
        self._on_finished = on_finished

    @property
    def close_code(self) -> int | None:
        return self._protocol.close_code

    @property
    def closed(self) -> bool:
        return self._protocol.close_code is not None

    # -- sending ----------------------------------------------------------------------

    def send(self, text: str, origin: str | None = None) -> bool:
        done = self._protocol.send_text(text, origin, self._writer is not None)
        if done == QUEUED:
            if not self._flushing:
                self._flush_soon()
            return True
        if done == BUSY:
            raise ProtocolError(ErrorCode.PEER_BUSY,
                                f"{self.user_id!r} is not reading fast enough; retry shortly")
        if done == FULL:
            self.close(CloseCode.SLOW_CONSUMER, "too slow: send queue full")
        return False

    def _flush_soon(self) -> None:
        self._flushing = True
        due.add(self)

    def _flush(self) -> None:
        """Called by ``due``: never blocks."""
        protocol = self._protocol
        if self._writer is not None or protocol.state is State.CLOSED:
            return
        self._flushing = False
        more = protocol.has_output()
        if self._detached:
            try:
                while more:
                    more = self._write_some()
            except BlockingIOError:
                more = True
            except OSError:  # the peer is gone; releasing may block, not here
                gevent.spawn(self._release)
                return
        if more:
            self._flushing = True
            self._writer = gevent.spawn(self._write_waiting)
        elif protocol.close_expected():
            self._shut_write()

    def _write_some(self) -> bool:
        """One non-blocking write; whether output remains."""
        protocol = self._protocol
        bufs = protocol.data_to_send()
        try:
            sent = self._sock.send(bufs[0]) if len(bufs) == 1 else self._sock.sendmsg(bufs)
        except BlockingIOError:
            protocol.data_sent(0)
            raise
        more = protocol.data_sent(sent)
        if self._stall is not None and protocol.may_resume():
            self._resume()
        return more

    def _write_waiting(self) -> None:
        """The writer: drains the queue while the peer's window is full."""
        protocol = self._protocol
        try:
            if self._detached:
                watcher = get_hub().loop.io(self._sock.fileno(), 2)
                try:
                    while protocol.has_output():
                        try:
                            self._write_some()
                        except BlockingIOError:
                            with gevent.Timeout(self._send_timeout, _SendTimeout):
                                get_hub().wait(watcher)
                finally:
                    watcher.close()
            else:
                while protocol.has_output():
                    data = b"".join(protocol.data_to_send())
                    with gevent.Timeout(self._send_timeout, _SendTimeout):
                        self._sock.sendall(data)
                    protocol.data_sent(len(data))
                    if self._stall is not None and protocol.may_resume():
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
        if protocol.close_expected():
            self._shut_write()

    def _shut_write(self) -> None:
        """Our close frame is out: FIN tells the peer, and it answers by closing."""
        if not self._write_shut:
            self._write_shut = True
            try:
                if self._detached:
                    self._sock.shutdown(_socket.SHUT_WR)
                else:
                    # TLS: gevent's SSLSocket.shutdown drops its SSL object under serve()'s
                    # read; shut only the TCP write side (our close frame was the last record).
                    GeventSocket.shutdown(self._sock, _socket.SHUT_WR)
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
                if self._protocol.should_pause():
                    self._pause()
                    return
                if len(data) < RECV_SIZE:  # drained: the watcher fires again for more,
                    return  # and one recv that fails costs a syscall and an exception
        finally:
            self._reading = False
            # What this read queued (replies, relays) leaves now, not in the flush
            # callback: in an accept flood that callback waits behind every new
            # connection's greenlet, and a client got its `registered` seconds late and
            # an established pair its relays a second late (bench/storm.py).
            due.flush()

    def serve(self) -> None:
        """Read in the calling greenlet until the connection is over (TLS)."""
        while True:
            try:
                data = self._sock.recv(RECV_SIZE)
            except (OSError, ValueError):  # ValueError: an SSL socket already unwrapped
                data = b""
            self._reading = True
            try:
                if not self._received(data):
                    return
            finally:
                self._reading = False
                due.flush()
            if self._protocol.should_pause():
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
        protocol = self._protocol
        frames = protocol.receive_data(data)
        if frames:
            self._events.receive_frames(self, frames)
        try:
            for opcode, value in protocol.events_received():
                if opcode == OP_TEXT:
                    self._events.receive_text(self, value)
                elif opcode == OP_BINARY:
                    self._events.receive_binary(self)
                elif opcode == OP_CLOSE:
                    self._mark_closed(*value)
                elif not self._flushing:  # a ping: its pong waits
                    self._flush_soon()
        except Exception:
            log.exception("connection %s failed", self.id)
            self.close(CloseCode.INTERNAL_ERROR, "internal server error")
        return True

    def keepalive(self) -> None:
        """Called every ping interval: a peer that did not answer the last ping is closed."""
        protocol = self._protocol
        if protocol.close_code is not None:
            return
        if protocol.awaiting_pong:
            # Input still being handled (a request waiting for Redis, say) may hold the
            # pong: the peer is alive, only this worker is slow to read it.
            if not self._reading:
                self.close(CloseCode.POLICY_VIOLATION, "Ping/Pong timeout")
            return
        protocol.send_ping()
        if not self._flushing:
            self._flush_soon()

    def _register_deadline(self) -> None:
        if self.user_id is None and self._protocol.close_code is None:
            self.close(CloseCode.REGISTER_TIMEOUT, "register timeout")

    # -- closing ----------------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Start closing with ``code``; returns at once."""
        self._mark_closed(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        if self._protocol.state is State.CLOSED:  # the socket went first
            return
        self._protocol.send_close(code, reason)
        if not self._flushing:
            self._flush_soon()
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
        protocol = self._protocol
        if not protocol.begin_close(code):
            return False
        # The writer must not drain, while the release is under way, what a slow
        # consumer's queue held (its senders are told it was dropped).
        if code == CloseCode.SLOW_CONSUMER:
            self._report(protocol.drop_queue(keep_started=True))
        if reason is None:
            self._events.disconnect(self)
        else:
            self._events.disconnect(self, lambda: self._send_close(code, reason))
        return True

    def _report(self, undelivered: Counter[str]) -> None:
        if undelivered and self.user_id is not None:
            self._events.report_undelivered(self.user_id, undelivered)

    def _release(self) -> None:
        """The end: report what was never written, close the socket, account."""
        protocol = self._protocol
        if protocol.state is State.CLOSED:
            return
        undelivered = protocol.receive_eof()  # first: releasing may yield, and re-enter
        self._mark_closed(CloseCode.ABNORMAL)
        self._report(undelivered)
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
