"""A lean WebSocket client for the bench: raw non-blocking sockets, epoll, minimal framing.

python-websockets costs tens of microseconds of Python per connection and per frame. For
the phases where the client must not be the bottleneck (connections per second, tens of
thousands of idle registered connections, bench/capacity.py's 100,000) this module speaks
just enough of RFC 6455 itself:

- the HTTP/1.1 upgrade (no permessage-deflate, no subprotocol offered), checked for
  ``101``; anything else (e.g. Volli's 503 at its connection limit, 429 per-IP limits)
  fails the connection with the status line as the reason;
- masked client frames (text, pong, close), unmasked server frames (text, binary, ping,
  close, continuation), any payload length;
- registration: Volli's protocol sends ``{"type":"register",...}`` and waits for
  ``registered`` (skipping the ``hello`` Volli sends first); peerjs-server's registers by
  the query string and answers ``{"type":"OPEN"}`` first.

``Pool`` keeps many connections on one epoll, opens them with a bounded number of
handshakes in flight, spreads them over several source addresses (bind before connect,
with IP_BIND_ADDRESS_NO_PORT so each (source, destination) pair has its own ~28k ephemeral
ports), answers the server's pings while holding them, and closes them with a close frame.
``BlockingWS`` is one blocking connection, for the round-trip measurement.

Only for loopback targets (127.0.0.0/8): ``parse_target`` refuses anything else.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import select
import socket
import time
import urllib.parse
from collections import Counter
from typing import Any, Callable

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Connection states in a Pool.
CONNECTING, UPGRADING, REGISTERING, OPEN, CLOSING = range(5)
STATE_NAMES = ("connecting", "upgrading", "registering", "open", "closing")


# A Chromium upgrade as nginx forwards it (no Origin: the benches' servers allow none).
BROWSER_HEADERS = (
    "Pragma: no-cache\r\nCache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "X-Real-IP: 127.0.0.1\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: https\r\n"
    "Cookie: session=0123456789abcdef\r\n")


class Target:
    """Where and how to connect: protocol ``volli`` (also the baseline) or ``peerjs``."""

    __slots__ = ("proto", "host", "port", "path", "query", "public_key", "extra_headers")

    def __init__(self, proto: str, url: str, public_key: str = "cap",
                 browser_headers: bool = False) -> None:
        """``public_key``: the (unsigned) ``publicKey`` a Volli registration carries;
        ``browser_headers``: the upgrade also carries what a browser behind nginx sends
        (``BROWSER_HEADERS``), 15 header lines instead of 5."""
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ws" or not u.hostname or not u.hostname.startswith("127."):
            raise ValueError(f"only ws://127.x.y.z targets: {url!r}")
        self.proto = proto
        self.host = u.hostname
        self.port = u.port or 80
        self.path = u.path or "/"
        self.query = u.query
        self.public_key = public_key
        self.extra_headers = BROWSER_HEADERS if browser_headers else ""

    def request(self, user_id: str, n: int) -> bytes:
        """The upgrade request for one connection (peerjs: id and token in the query)."""
        path = self.path
        if self.proto == "peerjs":
            path += "?" + urllib.parse.urlencode({"key": "peerjs", "id": user_id,
                                                  "token": f"t{n:x}"})
        elif self.query:
            path += "?" + self.query
        key = base64.b64encode(os.urandom(16)).decode()
        return (f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{self.extra_headers}\r\n").encode()

    def register_frame(self, user_id: str) -> bytes | None:
        if self.proto == "peerjs":
            return None  # registered by the query string
        return client_frame(b'{"type":"register","userId":' + json.dumps(user_id).encode() +
                            b',"publicKey":' + json.dumps(self.public_key).encode() + b'}')


def parse_target(proto: str, url: str, public_key: str = "cap") -> Target:
    return Target(proto, url, public_key)


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def client_frame(payload: bytes, opcode: int = OP_TEXT, key: bytes | None = None) -> bytes:
    """One masked, final frame (``key``: the 4-byte mask, random if not given)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = key or os.urandom(4)
    return head + key + _mask(payload, key)


CLOSE_1000 = (1000).to_bytes(2, "big")


class ProtocolError(Exception):
    pass


class FrameReader:
    """Incremental parser of server frames: feed bytes, get [(opcode, payload)], with
    fragmented messages joined."""

    __slots__ = ("buf", "frag", "frag_op")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.frag: bytearray | None = None
        self.frag_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            ln, hdr = b1 & 0x7F, 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, hdr = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, hdr = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if b1 & 0x80:
                raise ProtocolError("masked frame from the server")
            end = pos + hdr + ln
            if end > n:
                break
            payload = bytes(buf[pos + hdr:end])
            pos = end
            op, fin = b0 & 0x0F, b0 & 0x80
            if op == OP_CONT:
                if self.frag is None:
                    raise ProtocolError("continuation without a start")
                self.frag += payload
                if fin:
                    out.append((self.frag_op, bytes(self.frag)))
                    self.frag = None
            elif op < 8 and not fin:
                self.frag, self.frag_op = bytearray(payload), op
            else:
                out.append((op, payload))
        if pos:
            del buf[:pos]
        return out


def _split_response(buf: bytes) -> tuple[bytes, bytes] | None:
    """(response head, rest) once the upgrade response is complete, else None."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    return buf[:i], buf[i + 4:]


def _check_response(head: bytes) -> str | None:
    """Why the upgrade failed (the status line), or None for a 101."""
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if not status.startswith("HTTP/1.1 101"):
        return status.strip() or "empty response"
    if b"sec-websocket-extensions" in head.lower():
        return "server negotiated an extension we did not offer"
    return None


def _registered(proto: str, user_id: str, msg: dict[str, Any]) -> bool | None:
    """True: registered; None: keep waiting (Volli's hello); False: refused."""
    kind = msg.get("type")
    if proto == "peerjs":
        return kind == "OPEN"
    if kind == "hello":
        return None
    return kind == "registered" and msg.get("userId") == user_id


def _refusal(msg: dict[str, Any]) -> str:
    return f"reply {msg.get('type')}" + (f"/{msg['code']}" if msg.get("code") else "")


class Conn:
    __slots__ = ("sock", "fd", "uid", "n", "state", "hs", "reader", "out", "t0", "t_reg",
                 "close_code")

    def __init__(self, sock: socket.socket, uid: str, n: int, t0: float) -> None:
        self.sock, self.fd, self.uid, self.n = sock, sock.fileno(), uid, n
        self.state = CONNECTING
        self.hs = b""
        self.reader = FrameReader()
        self.out = b""
        self.t0 = t0
        self.t_reg = 0.0
        self.close_code: int | None = None


def send_or_queue(ep, c, data: bytes) -> None:
    """Send without blocking; what the socket does not take waits in ``c.out`` (sent in
    order, behind anything already waiting) and the fd is watched for writing."""
    if c.out:
        c.out += data
        return
    try:
        sent = c.sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        c.out = data[sent:]
        ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)


class Pool:
    """Many connections on one epoll. Every loop here is bounded by a deadline."""

    def __init__(self, target: Target, sources: list[str], concurrency: int = 200,
                 handshake_timeout: float = 30.0) -> None:
        self.target = target
        self.sources = sources or ["127.0.0.1"]
        self.concurrency = max(1, concurrency)
        self.handshake_timeout = handshake_timeout
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.pending = 0  # connections not yet open (in flight)
        self.opened = 0  # registered, ever
        self.started = 0
        self.failures: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # open connections the server closed
        self.unexpected = 0
        self.unexpected_sample: str | None = None
        self.handshake_ms: list[float] = []
        self._next_source = 0

    # -- public

    @property
    def open_count(self) -> int:
        return sum(1 for c in self.conns.values() if c.state == OPEN)

    def open(self, ids: list[str], deadline: float,
             progress: Callable[[], None] | None = None,
             max_failures: int | None = None) -> dict[str, Any]:
        """Open and register one connection per id, at most ``concurrency`` in flight, until
        all are open or failed, or ``deadline`` (then the rest count as failed). After
        ``max_failures`` failures no new connection is started (the rest count as failed
        with that reason)."""
        t0 = time.monotonic()
        opened0, failed0 = self.opened, sum(self.failures.values())
        queue = list(reversed(ids))
        last_progress = t0
        while (queue or self.pending) and time.monotonic() < deadline:
            if max_failures is not None and queue and \
                    sum(self.failures.values()) - failed0 >= max_failures:
                self.failures[f"not started: {max_failures} failures already"] += len(queue)
                queue = []
            while queue and self.pending < self.concurrency:
                self._start(queue.pop(), time.monotonic())
            self._poll(0.05)
            now = time.monotonic()
            if now - last_progress >= 1.0:
                self._expire(now)
                if progress:
                    progress()
                last_progress = now
        if queue or self.pending:
            self.failures["not opened before the deadline"] += len(queue)
            for c in [c for c in self.conns.values() if c.state < OPEN]:
                self._fail(c, f"still {STATE_NAMES[c.state]} at the deadline")
        t1 = time.monotonic()
        return {"asked": len(ids), "opened": self.opened - opened0,
                "failed": sum(self.failures.values()) - failed0, "seconds": t1 - t0,
                "t_start": t0, "t_end": t1}

    def service(self, until: float) -> None:
        """Answer pings and notice closes until ``until``."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._poll(min(left, 0.2))

    def close_all(self, deadline: float) -> dict[str, Any]:
        """Send a close frame on every connection, wait (bounded) for the server to close,
        then close whatever is left."""
        t0 = time.monotonic()
        frame = client_frame(CLOSE_1000, OP_CLOSE)
        for c in list(self.conns.values()):
            if c.state == OPEN:
                c.state = CLOSING
                self._send(c, frame)
            else:
                self._drop(c)
        while self.conns and time.monotonic() < deadline:
            self._poll(0.05)
        forced = len(self.conns)
        for c in list(self.conns.values()):
            self._drop(c)
        self.ep.close()
        return {"seconds": time.monotonic() - t0, "forced": forced}

    def stats(self) -> dict[str, Any]:
        hs = sorted(self.handshake_ms)

        def pct(q: float) -> float | None:
            return hs[min(len(hs) - 1, int(q * (len(hs) - 1)))] if hs else None

        return {"opened": self.opened, "open_now": self.open_count,
                "failures": dict(self.failures.most_common(10)),
                "failed": sum(self.failures.values()),
                "dropped": dict(self.dropped.most_common(10)),
                "unexpected": self.unexpected, "unexpected_sample": self.unexpected_sample,
                "handshake_p50_ms": pct(0.5), "handshake_p99_ms": pct(0.99),
                "handshake_max_ms": hs[-1] if hs else None}

    # -- internals

    def _start(self, uid: str, now: float) -> None:
        self.started += 1
        src = self.sources[self._next_source % len(self.sources)]
        self._next_source += 1
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self.failures[f"socket(): {errno.errorcode.get(exc.errno, exc)}"] += 1
            return
        s.setblocking(False)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if src != "127.0.0.1" or len(self.sources) > 1:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((src, 0))
            rc = s.connect_ex((self.target.host, self.target.port))
        except OSError as exc:
            s.close()
            self.failures[f"bind/connect: {errno.errorcode.get(exc.errno, exc)}"] += 1
            return
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self.failures[f"connect: {errno.errorcode.get(rc, rc)}"] += 1
            return
        c = Conn(s, uid, self.started, now)
        self.conns[c.fd] = c
        self.pending += 1
        self.ep.register(c.fd, select.EPOLLOUT)

    def _expire(self, now: float) -> None:
        for c in [c for c in self.conns.values()
                  if c.state < OPEN and now - c.t0 > self.handshake_timeout]:
            self._fail(c, f"timeout while {STATE_NAMES[c.state]}")

    def _poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout, 4096):
            c = self.conns.get(fd)
            if c is None:
                continue
            try:
                if c.state == CONNECTING:
                    self._on_connected(c)
                    continue
                if ev & select.EPOLLOUT and c.out:
                    self._flush(c)
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._on_readable(c)
            except (OSError, ProtocolError, ValueError) as exc:
                why = (errno.errorcode.get(exc.errno, str(exc))
                       if isinstance(exc, OSError) and exc.errno else repr(exc))
                if c.state >= OPEN:
                    self.dropped[why] += 1
                    self._drop(c)
                else:
                    self._fail(c, f"{why} while {STATE_NAMES[c.state]}")

    def _on_connected(self, c: Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, f"connect: {errno.errorcode.get(err, err)}")
            return
        c.state = UPGRADING
        self.ep.modify(c.fd, select.EPOLLIN)
        self._send(c, self.target.request(c.uid, c.n))

    def _send(self, c: Conn, data: bytes) -> None:
        send_or_queue(self.ep, c, data)

    def _flush(self, c: Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            return
        c.out = c.out[sent:]
        if not c.out:
            self.ep.modify(c.fd, select.EPOLLIN)

    def _on_readable(self, c: Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            if c.state == CLOSING:
                self._drop(c)
            elif c.state == OPEN:
                self.dropped[f"EOF (close code {c.close_code})"] += 1
                self._drop(c)
            else:
                self._fail(c, f"EOF while {STATE_NAMES[c.state]}")
            return
        if c.state == UPGRADING:
            c.hs += data
            parts = _split_response(c.hs)
            if parts is None:
                if len(c.hs) > 16384:
                    self._fail(c, "oversized upgrade response")
                return
            head, data = parts
            c.hs = b""
            why = _check_response(head)
            if why:
                self._fail(c, why)
                return
            c.state = REGISTERING
            reg = self.target.register_frame(c.uid)
            if reg is not None:
                self._send(c, reg)
            if not data:
                return
        for op, payload in c.reader.feed(data):
            if op == OP_TEXT:
                if c.state == REGISTERING:
                    msg = _loads(payload)
                    ok = _registered(self.target.proto, c.uid, msg)
                    if ok is None:
                        continue
                    if not ok:
                        self._fail(c, _refusal(msg))
                        return
                    c.state = OPEN
                    c.t_reg = time.monotonic()
                    self.pending -= 1
                    self.opened += 1
                    self.handshake_ms.append((c.t_reg - c.t0) * 1e3)
                elif c.state == OPEN:
                    self.unexpected += 1
                    if self.unexpected_sample is None:
                        self.unexpected_sample = payload[:200].decode(errors="replace")
            elif op == OP_PING:
                self._send(c, client_frame(payload, OP_PONG))
            elif op == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                c.close_code = code
                if c.state == CLOSING:
                    self._drop(c)
                    return
                reason = payload[2:].decode(errors="replace")
                if c.state < OPEN:
                    self._fail(c, f"closed {code} {reason}".strip())
                else:
                    self.dropped[f"closed {code} {reason}".strip()] += 1
                    self._send(c, client_frame(payload[:2], OP_CLOSE))
                    self._drop(c)
                return

    def _fail(self, c: Conn, why: str) -> None:
        self.failures[why] += 1
        self._drop(c)

    def _drop(self, c: Conn) -> None:
        if self.conns.pop(c.fd, None) is None:
            return
        if c.state < OPEN:
            self.pending -= 1
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()



class DrainPool(Pool):
    """A Pool that records, for each registered connection, when it ended and the close
    code the server sent (None: the TCP connection ended without a close frame): for
    measuring a server's drain (bench/drain.py, tests/test_drain.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ended: list[tuple[float, int | None]] = []  # (time.monotonic(), close code)

    def _drop(self, c: Conn) -> None:
        if c.fd in self.conns and c.state == OPEN:
            self.ended.append((time.monotonic(), c.close_code))
        super()._drop(c)

class BlockingWS:
    """One blocking, registered connection (TCP_NODELAY), for sequential round trips."""

    def __init__(self, target: Target, user_id: str, timeout: float = 10.0) -> None:
        self.target = target
        self.sock = socket.create_connection((target.host, target.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader()
        self.frames: list[tuple[int, bytes]] = []
        self.sock.sendall(target.request(user_id, 0))
        buf = b""
        for _ in range(1000):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("EOF during the upgrade")
            buf += chunk
            parts = _split_response(buf)
            if parts:
                break
        else:
            raise ConnectionError("no upgrade response")
        head, rest = parts
        why = _check_response(head)
        if why:
            raise ConnectionError(f"upgrade refused: {why}")
        self.frames = self.reader.feed(rest)
        reg = target.register_frame(user_id)
        if reg is not None:
            self.sock.sendall(reg)
        for _ in range(100):
            msg = _loads(self.recv_text())
            ok = _registered(target.proto, user_id, msg)
            if ok:
                return
            if ok is False:
                raise ConnectionError(f"register {user_id!r}: {_refusal(msg)}")
        raise ConnectionError("no registration reply")

    def send_text(self, data: bytes) -> None:
        self.sock.sendall(client_frame(data))

    def recv_text(self) -> bytes:
        for _ in range(100_000):
            while self.frames:
                op, payload = self.frames.pop(0)
                if op == OP_TEXT:
                    return payload
                if op == OP_PING:
                    self.sock.sendall(client_frame(payload, OP_PONG))
                elif op == OP_CLOSE:
                    raise ConnectionError(f"closed by the server: {payload[:2].hex()} "
                                          f"{payload[2:].decode(errors='replace')}")
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("EOF")
            self.frames = self.reader.feed(chunk)
        raise ConnectionError("no text frame")

    def close(self) -> None:
        try:
            self.sock.sendall(client_frame(CLOSE_1000, OP_CLOSE))
            self.sock.settimeout(2)
            for _ in range(100):
                if not self.sock.recv(65536):
                    break
        except OSError:
            pass
        finally:
            self.sock.close()


def source_addresses(count: int) -> list[str]:
    """``count`` loopback source addresses from 127.0.0.2 on (127.0.0.2 ... 127.0.0.251,
    127.0.1.2, ...): all of 127/8 is on lo under Linux."""
    return [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(count)]


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE (soft and, as root, hard) to at least ``want`` where the kernel
    allows (fs.nr_open); children started afterwards inherit it. Returns the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(open("/proc/sys/fs/nr_open").read())
    except (OSError, ValueError):
        nr_open = hard
    if want > soft:
        new_hard = hard if hard == resource.RLIM_INFINITY else max(hard, min(want, nr_open))
        new_soft = min(want, new_hard) if new_hard != resource.RLIM_INFINITY else want
        for limits in ((new_soft, new_hard), (min(want, hard), hard)):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
                break
            except (ValueError, OSError):
                continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
