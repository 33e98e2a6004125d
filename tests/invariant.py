"""The presence invariant of issue 12, checked under a random workload and Redis faults.

    A user ID maps to at most one live connection, and an ID is online exactly while
    that connection is open.

A Jepsen in miniature, reusable by a test (tests/test_presence_invariant.py, a fixed seed
and a short schedule) and a soak (bench/invariant_soak.py): no pytest here.

- ``Conn``: one real WebSocket client (python-websockets) with a reader thread that records
  everything the server sent it, with times: `registered`, `session-replaced`, relays it
  received, errors, the close code. The *model* is read off these records: a connection
  *holds* an ID from the `registered` it received until its `session-replaced`, its close,
  or our closing it. A connection that was replaced before its `registered` arrived never
  held the ID.
- ``Workload``: seeded random actions on a pool of user IDs (half signed with a fixed key
  per ID, half unsigned): registrations, same-key takeovers, unsigned collisions, bursts of
  simultaneous same-key registrations, key rotations, abrupt and clean closes,
  registrations racing the register deadline, relays with unique requestIds.
- ``Checker``: after each phase has settled, checker connections on both servers (spread
  over the workers) discover every ID and relay to every held one; relays and
  registrations of the phase are accounted for. Violations carry the seed, the phase, the
  ID and the connections involved.
- ``run``: phases (quiet, Redis stopped then started empty, restarted empty, paused with
  DEBUG SLEEP) interleaved, each followed by its settle and check.

Relay delivery is checked in full (delivered once, or reported to the sender) only for
relays sent in quiet phases: pub/sub is at-most-once, so a relay published while a node's
listener is reconnecting after a Redis restart can be lost without a word
(docs/scaling.md, Failure model). In fault phases a relay must still never reach a
connection that does not hold its target, nor arrive twice.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import socket
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from signing import Identity
from volli.protocol import identity as signing_payloads
from workers import worker_of

RELAY_FIELDS = {"offer": "offer", "answer": "answer", "ice-candidate": "candidate"}
# Error replies that account for a relay (docs/protocol.md sections 5, 7, 8).
RELAY_REPORTED = {"peer-offline", "unavailable", "peer-busy", "rate-limited"}
REPLY_TIMEOUT = 8.0  # a reply may wait out a Redis pause (the workers' socket timeout is 5 s)
RETRY_PAUSE = 0.15  # between `unavailable` and the next attempt, as the contract asks


@dataclasses.dataclass(frozen=True)
class Settings:
    """The servers' short timings; every wait of the checker derives from them."""
    ttl: float = 3.0  # VOLLI_PRESENCE_TTL
    register_timeout: float = 1.0  # VOLLI_REGISTER_TIMEOUT
    ping_interval: float = 2.0  # VOLLI_PING_INTERVAL

    def env(self) -> dict[str, str]:
        return {"VOLLI_PRESENCE_TTL": str(self.ttl),
                "VOLLI_REGISTER_TIMEOUT": str(self.register_timeout),
                "VOLLI_PING_INTERVAL": str(self.ping_interval)}

    @property
    def heartbeat(self) -> float:
        return self.ttl / 3

    @property
    def settle(self) -> float:
        """After Redis answers again: the recovery window (at most a TTL after a worker
        notices), a heartbeat, and a margin."""
        return self.ttl + self.heartbeat + 0.5

    def overlap_tolerance(self, quiet: bool) -> float:
        """How long two connections may both believe they hold an ID: the old holder's
        `session-replaced` in flight; in a fault phase also one heartbeat, which closes a
        holder whose takeover notice was lost with a Redis connection."""
        return 2.0 if quiet else 2.0 + self.heartbeat


@dataclasses.dataclass(frozen=True)
class Phase:
    index: int
    kind: str  # quiet | redis-stop | redis-restart | pause | failover (Cluster, Sentinel)
    seconds: float  # workload time (for redis-stop: how long Redis is down; pause: its length)

    @property
    def quiet(self) -> bool:
        return self.kind == "quiet"

    @property
    def name(self) -> str:
        return f"{self.index}:{self.kind}({self.seconds:.1f}s)"


@dataclasses.dataclass
class Violation:
    kind: str
    phase: str
    uid: str | None
    detail: str
    seed: int

    def __str__(self) -> str:
        return f"[seed {self.seed} phase {self.phase}] {self.kind} {self.uid or ''}: {self.detail}"


# --------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass
class Relay:
    rid: str
    sender: "Conn"
    to: str
    sent_at: float
    phase: Phase
    holders: list["Conn"]  # who held `to` in the model when it was sent


@dataclasses.dataclass
class Delivery:
    conn: "Conn"
    at: float
    message: dict[str, Any]


class History:
    """Everything the clients saw, shared by the reader threads (one lock)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.t0 = time.monotonic()
        self.phase = Phase(0, "setup", 0.0)
        self.lock = threading.Lock()
        self.conns: list[Conn] = []
        self.relays: dict[str, Relay] = {}
        self.deliveries: dict[str, list[Delivery]] = defaultdict(list)
        self.relay_errors: dict[str, str] = {}
        self.notices: Counter[tuple[int, str]] = Counter()  # (sender conn, peer) -> count
        self.counts: Counter[str] = Counter()
        self.reported: set[tuple[int, int]] = set()  # double holders already reported
        self.phase_counts: dict[int, Counter[str]] = defaultdict(Counter)
        self._ids = itertools.count(1)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n
            self.phase_counts[self.phase.index][key] += n

    def add_conn(self, conn: "Conn") -> None:
        with self.lock:
            self.conns.append(conn)

    def sent(self, relay: Relay) -> None:
        with self.lock:
            self.relays[relay.rid] = relay

    def delivered(self, conn: "Conn", message: dict[str, Any], at: float) -> None:
        with self.lock:
            self.deliveries[str(message.get("requestId"))].append(Delivery(conn, at, message))

    def relay_error(self, rid: str, code: str) -> None:
        with self.lock:
            self.relay_errors[rid] = code

    def notice(self, conn: "Conn", message: dict[str, Any]) -> None:
        """An `undelivered` notice: `count` relays to `peer` were accepted, then dropped."""
        with self.lock:
            self.notices[(conn.n, message.get("peer"))] += int(message.get("undelivered", 0))


# --------------------------------------------------------------------------------------
# One client


class _Pending:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None


class Conn:
    """A WebSocket client whose reader thread records what the server sends."""

    def __init__(self, history: History, server: int, url: str, role: str = "w") -> None:
        self.history = history
        self.server = server
        self.role = role
        self.ws = connect(url, open_timeout=5, close_timeout=2, proxy=None, max_size=None,
                          ping_interval=None).__enter__()  # as conftest.Client does
        self.opened_at = history.now()
        try:
            self.nonce = json.loads(self.ws.recv(timeout=5))["nonce"]
        except BaseException:
            self.ws.socket.close()
            raise
        self.n = next(_conn_numbers)
        self.uid: str | None = None  # the ID of its `register`
        self.identity: Identity | None = None  # its key when registered signed
        self.outcome: str | None = None  # "registered", an error code, "no-reply"
        self.registered_at: float | None = None
        self.registered_in: Phase | None = None  # the phase its `registered` arrived in
        self.replaced_at: float | None = None
        self.closed_at: float | None = None  # the server's close (or the socket's end)
        self.close_code: int | None = None
        self.close_reason = ""
        self.local_close_at: float | None = None  # when we closed it
        self._pending: dict[str, _Pending] = {}
        history.add_conn(self)
        threading.Thread(target=self._read, daemon=True, name=f"conn{self.n}").start()

    # -- the model --------------------------------------------------------------------

    def holds(self) -> str | None:
        """The ID this client believes it holds now."""
        if (self.registered_at is None or self.replaced_at is not None
                or self.closed_at is not None or self.local_close_at is not None):
            return None
        return self.uid

    def held_until(self) -> float | None:
        """When it stopped holding its ID (None: still holds)."""
        ends = [t for t in (self.replaced_at, self.closed_at, self.local_close_at)
                if t is not None]
        return min(ends) if ends else None

    def could_receive_for(self, to: str, at: float) -> bool:
        """Whether a relay to ``to`` may reach this connection at ``at``: it asked for that
        ID and was not refused (a registration overtaken before its answer counts)."""
        refused = self.outcome not in (None, "registered", "no-reply")
        return self.uid == to and not refused and (
            self.replaced_at is None or at <= self.replaced_at)

    def describe(self) -> str:
        def t(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"
        return (f"c{self.n}(s{self.server} {self.role} uid={self.uid} "
                f"{'signed' if self.identity else 'unsigned'} opened={t(self.opened_at)} "
                f"outcome={self.outcome} registered={t(self.registered_at)} "
                f"replaced={t(self.replaced_at)} closed={t(self.closed_at)}"
                f"{'' if self.close_code is None else f' code={self.close_code}'}"
                f"{f' reason={self.close_reason!r}' if self.close_reason else ''} "
                f"local_close={t(self.local_close_at)})")

    # -- I/O --------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> bool:
        try:
            self.ws.send(json.dumps(message, separators=(",", ":")))
            return True
        except (ConnectionClosed, OSError, RuntimeError):
            return False

    def start(self, message: dict[str, Any]) -> _Pending:
        """Send with a fresh requestId; the reply lands in the returned _Pending."""
        rid = self.history.next_id("q")
        pending = _Pending()
        self._pending[rid] = pending
        if self.closed_at is not None or not self.send({**message, "requestId": rid}):
            pending.event.set()
        return pending

    def request(self, message: dict[str, Any], timeout: float = REPLY_TIMEOUT):
        pending = self.start(message)
        pending.event.wait(timeout)
        return pending.reply

    def sync(self, timeout: float = 3.0) -> bool:
        """A ping round trip: what the server queued before the pong has been read."""
        reply = self.request({"type": "ping"}, timeout)
        return reply is not None and reply.get("type") == "pong"

    def close_abrupt(self) -> None:
        """End the TCP connection with no close frame."""
        self.local_close_at = self.history.now()
        try:
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close_clean(self) -> None:
        self.local_close_at = self.history.now()
        try:
            self.ws.close(1000)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass

    def _read(self) -> None:
        try:
            while True:
                message = json.loads(self.ws.recv())
                self._dispatch(message, self.history.now())
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            self.close_code = rcvd.code if rcvd else 1006
            self.close_reason = rcvd.reason if rcvd else ""
        except Exception:  # noqa: BLE001 - a broken socket ends the record the same way
            self.close_code = 1006
        finally:
            self.closed_at = self.history.now()
            if self.close_code == 4000 and self.close_reason == "session replaced" \
                    and self.replaced_at is None:
                self.replaced_at = self.closed_at  # the notice itself was lost with the socket
            for pending in list(self._pending.values()):
                pending.event.set()

    def _dispatch(self, message: dict[str, Any], at: float) -> None:
        kind = message.get("type")
        if kind in RELAY_FIELDS:
            self.history.delivered(self, message, at)
            return
        if kind == "session-replaced":
            self.replaced_at = at
            self.history.count("session-replaced")
            return
        if kind == "registered" and message.get("userId") == self.uid:
            self.registered_at, self.registered_in = at, self.history.phase
        if kind == "error" and "undelivered" in message:
            self.history.notice(self, message)
            return
        rid = message.get("requestId")
        pending = self._pending.pop(rid, None) if rid is not None else None
        if pending is not None:
            pending.reply = message
            pending.event.set()
        elif kind == "error" and rid is not None:
            self.history.relay_error(str(rid), message.get("code", "?"))


_conn_numbers = itertools.count(1)


# --------------------------------------------------------------------------------------
# The cluster under test (duck-typed: conftest's Server and RedisServer)


class Cluster:
    """Servers sharing one Redis prefix, and that Redis."""

    def __init__(self, servers: list, redis) -> None:
        self.servers = servers
        self.redis = redis

    @property
    def urls(self) -> list[str]:
        return [srv.url for srv in self.servers]

    def wait_ready(self, deadline: float = 30.0) -> bool:
        end = time.monotonic() + deadline
        for srv in self.servers:
            while True:
                try:
                    if srv.http("/ready")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > end:
                    return False
                time.sleep(0.1)
        return True


def server_env(settings: Settings, redis_url: str, prefix: str, workers: int = 2) -> dict:
    return {"VOLLI_REDIS_URL": redis_url, "VOLLI_REDIS_PREFIX": prefix,
            "WEB_CONCURRENCY": str(workers), **settings.env()}


# --------------------------------------------------------------------------------------
# Workload


class Workload:
    """Seeded random client actions. Only the driver thread draws from ``rng``; helper
    threads (bursts, deadline races) get their parameters drawn for them."""

    def __init__(self, cluster: Cluster, settings: Settings, history: History,
                 rng: random.Random, ids: int = 26, clients: int = 24) -> None:
        self.cluster = cluster
        self.settings = settings
        self.history = history
        self.rng = rng
        self.max_live = clients
        self.signed_ids = [f"s{i:02d}@inv" for i in range(ids // 2)]
        self.unsigned_ids = [f"u{i:02d}@inv" for i in range(ids - ids // 2)]
        self.ids = self.signed_ids + self.unsigned_ids
        # Candidate keys per signed ID, current first (a rotation whose answer was lost
        # leaves two candidates; Redis restarted empty forgets every binding).
        self.keys = {uid: [Identity(rng.randbytes(32))] for uid in self.signed_ids}
        self._keys_lock = threading.Lock()
        self._helpers: list[threading.Thread] = []
        self.immediate: list[Violation] = []  # found while acting, reported with the phase
        self._actions: list[tuple[Callable[[], None], int]] = [
            (self.register_random, 22), (self.takeover, 8), (self.collision, 6),
            (self.burst, 5), (self.rotate, 4), (self.close_abrupt, 5),
            (self.close_clean, 4), (self.deadline_race, 5), (self.relay, 45)]

    # -- driving ----------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step()
            time.sleep(self.rng.uniform(0, 0.03))

    def step(self) -> None:
        actions, weights = zip(*self._actions)
        if len(self.live()) >= self.max_live:  # keep the pool bounded
            actions, weights = (self.close_abrupt, self.close_clean, self.relay), (1, 1, 2)
        self.rng.choices(actions, weights)[0]()

    def wait_helpers(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        for thread in self._helpers:
            thread.join(max(0.0, end - time.monotonic()))
        self._helpers = [t for t in self._helpers if t.is_alive()]

    def live(self) -> list[Conn]:
        return [c for c in self.history.conns if c.role == "w" and c.holds()]

    def holders(self, uid: str) -> list[Conn]:
        return [c for c in self.live() if c.holds() == uid]

    def open(self, server: int | None = None) -> Conn | None:
        server = self.rng.randrange(len(self.cluster.servers)) if server is None else server
        try:
            return Conn(self.history, server, self.cluster.urls[server])
        except Exception as exc:  # noqa: BLE001 - refused upgrades (503) included
            self.history.count(f"open-failed:{type(exc).__name__}")
            return None

    # -- registering ------------------------------------------------------------------

    def register(self, conn: Conn, uid: str, retry: bool = True) -> dict | None:
        """Register ``conn`` as ``uid`` (signed for a signed ID), retrying `unavailable`
        after a short pause until the register deadline closes the connection."""
        conn.uid = uid
        tag = "" if conn.role == "w" else f"{conn.role}-"
        end = time.monotonic() + 3 * self.settings.register_timeout + REPLY_TIMEOUT
        while True:
            reply = self._register_once(conn, uid)
            if reply is None:
                conn.outcome = "no-reply"
                return None
            code = reply.get("code")
            if code == "unavailable" and retry and conn.closed_at is None \
                    and time.monotonic() < end:
                self.history.count(f"{tag}register-unavailable")
                time.sleep(RETRY_PAUSE)
                continue
            conn.outcome = "registered" if reply.get("type") == "registered" else code
            self.history.count(f"{tag}registered" if code is None
                               else f"{tag}register-error:{code}")
            return reply

    def _register_once(self, conn: Conn, uid: str) -> dict | None:
        if uid not in self.keys:
            return conn.request({"type": "register", "userId": uid, "publicKey": "dW5zaWduZWQ="})
        with self._keys_lock:
            candidates = list(self.keys[uid])
        reply = None
        for key in candidates:  # a key rotated meanwhile: bad-signature, try the other
            conn.identity = key
            payload = signing_payloads.register_payload(conn.nonce, uid)
            reply = conn.request({"type": "register", "userId": uid, "publicKey": key.public,
                                  "signature": key.sign(payload)})
            if reply is None or reply.get("code") != "bad-signature":
                break
        if reply is not None and reply.get("type") == "registered":
            conn.nonce = reply.get("nonce", conn.nonce)
            self._make_current(uid, conn.identity)
        return reply

    def _make_current(self, uid: str, key: Identity) -> None:
        with self._keys_lock:
            keys = self.keys[uid]
            self.keys[uid] = [key] + [k for k in keys if k is not key][:2]

    def register_random(self) -> None:
        uid = self.rng.choice(self.ids)
        conn = self.open()
        if conn is not None:
            self._register_checked(conn, uid)

    def _register_checked(self, conn: Conn, uid: str) -> None:
        """Register, and if another client still holds ``uid`` for an unsigned ID (or a
        signed one not taken over), confirm it is live: two holders at once."""
        before = self.holders(uid)
        reply = self.register(conn, uid)
        if reply is None or reply.get("type") != "registered" or not before:
            return
        if uid in self.keys:
            self.history.count("takeover-registered")
            return
        self.history.count("collision-registered")
        self.confirm_double(uid, conn, before)

    def confirm_double(self, uid: str, conn: Conn, before: list[Conn]) -> None:
        for old in before:
            if old.holds() == uid and old.sync() and old.holds() == uid:
                self.history.count("violation:double-holder")
                self.history.reported.add((old.n, conn.n))
                self.immediate.append(Violation(
                    "double-holder", self.history.phase.name, uid,
                    f"an unsigned register of a held ID was answered registered: "
                    f"{conn.describe()} while {old.describe()} still holds it (pong after)",
                    self.history.seed))

    def takeover(self) -> None:
        held = [c for c in self.live() if c.identity is not None]
        if held:
            old = self.rng.choice(held)
            conn = self.open()
            if conn is not None:
                self.history.count("takeover-attempt")
                self._register_checked(conn, old.uid)

    def collision(self) -> None:
        held = [c for c in self.live() if c.identity is None]
        if held:
            uid = self.rng.choice(held).uid
            conn = self.open()
            if conn is not None:
                self.history.count("collision-attempt")
                before = self.holders(uid)
                reply = self.register(conn, uid)
                if reply is not None and reply.get("code") == "user-id-taken":
                    self.history.count("collision-refused")
                elif reply is not None and reply.get("type") == "registered" and before:
                    self.history.count("collision-registered")
                    self.confirm_double(uid, conn, before)

    def burst(self) -> None:
        """2-3 connections register one signed ID with its key at the same instant."""
        uid = self.rng.choice(self.signed_ids)
        conns = [c for c in (self.open() for _ in range(self.rng.choice((2, 3)))) if c]
        if len(conns) < 2:
            return
        barrier = threading.Barrier(len(conns))

        def go(conn: Conn) -> None:
            try:
                barrier.wait(5)
            except threading.BrokenBarrierError:
                return
            self.register(conn, uid)

        threads = [threading.Thread(target=go, args=(c,), daemon=True) for c in conns]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REPLY_TIMEOUT * 2)
        self.history.count("burst")
        self.history.count("burst-conns", len(conns))

    def rotate(self) -> None:
        held = [c for c in self.live() if c.identity is not None]
        if not held:
            return
        conn = self.rng.choice(held)
        new, old = Identity(self.rng.randbytes(32)), conn.identity
        payload = signing_payloads.rotate_payload(conn.nonce, conn.uid, new.public)
        self.history.count("rotate-attempt")
        with self._keys_lock:  # the new key may be bound whatever the answer
            self.keys[conn.uid] = self.keys[conn.uid][:2] + [new]
        reply = conn.request({"type": "rotate-key", "newPublicKey": new.public,
                              "signature": old.sign(payload)})
        if reply is not None and reply.get("type") == "key-rotated":
            conn.identity, conn.nonce = new, reply["nonce"]
            self._make_current(conn.uid, new)
            self.history.count("rotated")

    def close_abrupt(self) -> None:
        live = self.live()
        if live:
            self.rng.choice(live).close_abrupt()
            self.history.count("close-abrupt")

    def close_clean(self) -> None:
        live = self.live()
        if live:
            self.rng.choice(live).close_clean()
            self.history.count("close-clean")

    def deadline_race(self) -> None:
        """Connect, then register at 0.9-1.1 x the register timeout after `hello`."""
        if sum(t.is_alive() for t in self._helpers) >= 3:
            return
        free = [uid for uid in self.ids if not self.holders(uid)] or self.ids
        uid = self.rng.choice(free)
        delay = self.rng.uniform(0.9, 1.1) * self.settings.register_timeout
        server = self.rng.randrange(len(self.cluster.servers))
        thread = threading.Thread(target=self._race, args=(uid, delay, server), daemon=True)
        self._helpers.append(thread)
        thread.start()

    def _race(self, uid: str, delay: float, server: int) -> None:
        conn = self.open(server)
        if conn is None:
            return
        time.sleep(max(0.0, delay - (self.history.now() - conn.opened_at)))
        self.history.count("deadline-race")
        reply = self.register(conn, uid, retry=False)
        if reply is None:
            self.history.count(f"deadline-closed:{conn.close_code}")
        elif reply.get("type") == "registered":
            self.history.count("deadline-registered")

    # -- relays -----------------------------------------------------------------------

    def relay(self) -> None:
        live = self.live()
        if not live:
            return
        sender = self.rng.choice(live)
        held = sorted({c.uid for c in live})
        for _ in range(self.rng.randint(1, 3)):
            to = self.rng.choice(held if self.rng.random() < 0.8 else self.ids)
            kind = self.rng.choice(list(RELAY_FIELDS))
            self.send_relay(sender, to, kind)

    def send_relay(self, sender: Conn, to: str, kind: str, prefix: str = "r") -> str:
        rid = self.history.next_id(prefix)
        self.history.sent(Relay(rid, sender, to, self.history.now(), self.history.phase,
                                self.holders(to)))
        if sender.send({"type": kind, "to": to, RELAY_FIELDS[kind]: {"rid": rid},
                        "requestId": rid}):
            self.history.count("relay-sent" if prefix == "r" else "probe-sent")
        return rid


# --------------------------------------------------------------------------------------
# Checker


class Checker:
    """Registered connections on every server, covering its workers, that discover every
    ID and relay to every held one after a phase has settled."""

    def __init__(self, workload: Workload, per_server: int = 4, max_per_server: int = 10):
        self.workload = workload
        self.history = workload.history
        self.cluster = workload.cluster
        self.per_server = per_server
        self.max_per_server = max_per_server
        self.conns: list[Conn] = []
        self.coverage: dict[int, int] = {}  # server -> distinct worker pids covered
        self._phase_start = 0.0

    # -- checker connections ----------------------------------------------------------

    def ensure(self) -> None:
        """Replace closed checkers; on each server open more (bounded) until they sit on
        at least two workers."""
        self.conns = [c for c in self.conns if c.holds()]
        for server in range(len(self.cluster.servers)):
            mine = lambda: [c for c in self.conns if c.server == server]  # noqa: E731
            while len(mine()) < self.per_server:
                if not self._open_checker(server):
                    break
            while (self._workers_of(mine()) or 2) < 2 and len(mine()) < self.max_per_server:
                if not self._open_checker(server):
                    break
            self.coverage[server] = self._workers_of(mine())

    def _open_checker(self, server: int) -> bool:
        try:
            conn = Conn(self.history, server, self.cluster.urls[server], role="checker")
        except Exception:  # noqa: BLE001 - counted as a missing checker
            self.history.count("checker-open-failed")
            return False
        reply = self.workload.register(conn, f"chk{conn.n}@check")
        if reply is None or reply.get("type") != "registered":
            conn.close_abrupt()
            return False
        self.conns.append(conn)
        return True

    def _workers_of(self, conns: list[Conn]) -> int | None:
        """How many workers ``conns`` sit on, from the servers' logs (None: not known)."""
        deadline = time.monotonic() + 1.5  # the log line follows the reply closely
        while True:
            pids = worker_of(self.cluster.servers)
            found = {pids.get(c.uid) for c in conns}
            if None not in found or time.monotonic() > deadline:
                found.discard(None)
                return len(found) or None
            time.sleep(0.1)

    # -- the checks -------------------------------------------------------------------

    def check(self, phase: Phase) -> list[Violation]:
        """Everything about ``phase``, after it settled (the workload is idle)."""
        self.drain()
        found: list[Violation] = []
        found += self.check_holders(phase)
        found += self.check_presence(phase)
        found += self.check_probes(phase)
        found += self.check_closes(phase)
        found += self.check_relays(phase)
        self._phase_start = self.history.now()
        return found

    def violation(self, kind: str, phase: Phase, uid: str | None, detail: str) -> Violation:
        self.history.count(f"violation:{kind}")
        return Violation(kind, phase.name, uid, detail, self.history.seed)

    def drain(self) -> None:
        """A ping round trip on every open connection: a `session-replaced` or close the
        server queued before has been read, so no client's belief is stale."""
        open_conns = [c for c in self.history.conns
                      if c.closed_at is None and c.local_close_at is None]
        pendings = [c.start({"type": "ping"}) for c in open_conns]
        end = time.monotonic() + 5
        for pending in pendings:
            pending.event.wait(max(0.0, end - time.monotonic()))

    def held(self) -> dict[str, list[Conn]]:
        out: dict[str, list[Conn]] = defaultdict(list)
        for conn in self.workload.live():
            out[conn.uid].append(conn)
        return out

    def check_holders(self, phase: Phase) -> list[Violation]:
        """No two clients held one ID at once (beyond a takeover notice in flight, allowed
        for by the phase the second registration happened in, which the report names)."""
        found = []
        now = self.history.now()
        by_uid: dict[str, list[Conn]] = defaultdict(list)
        for conn in self.history.conns:
            if conn.role == "w" and conn.registered_at is not None:
                by_uid[conn.uid].append(conn)
        for uid, conns in by_uid.items():
            for a, b in itertools.combinations(sorted(conns, key=lambda c: c.registered_at), 2):
                start, end = b.registered_at, min(a.held_until() or now, b.held_until() or now)
                tolerance = self.workload.settings.overlap_tolerance(b.registered_in.quiet)
                if end - start > tolerance and (a.n, b.n) not in self.history.reported:
                    self.history.reported.add((a.n, b.n))
                    found.append(self.violation(
                        "double-holder", b.registered_in, uid,
                        f"both held it for {end - start:.1f}s from t={start:.2f}: "
                        f"{a.describe()} and {b.describe()}"))
        return found

    def discover_all(self, uids: Iterable[str]) -> dict[str, list[tuple[Conn, Any]]]:
        """Every checker discovers every ID (pipelined); `unavailable` is asked again."""
        answers: dict[str, list[tuple[Conn, Any]]] = defaultdict(list)
        for uid in uids:
            for conn in self.conns:
                answers[uid].append((conn, self._discover(conn, uid)))
        return answers

    def _discover(self, conn: Conn, uid: str) -> Any:
        for _ in range(4):
            reply = conn.request({"type": "discover", "userId": uid}, 5.0)
            if reply is None:
                return "no-reply"
            if reply.get("type") == "discover-response":
                return reply["online"]
            if reply.get("code") != "unavailable":
                return reply.get("code")
            time.sleep(0.3)
        return "unavailable"

    def check_presence(self, phase: Phase) -> list[Violation]:
        """Held IDs are online everywhere, others offline everywhere; a mismatch is asked
        once more after a second (a worker re-announcing late) before it counts."""
        self.ensure()
        mismatched = self._mismatches(self.workload.ids)
        if mismatched:
            time.sleep(1.0)
            self.drain()
            mismatched = self._mismatches(mismatched)
        found = []
        held = self.held()
        for uid, wrong in mismatched.items():
            kind = "lost-registration" if held.get(uid) else "ghost"
            seen = ", ".join(f"c{c.n}@s{c.server}:{answer}" for c, answer in wrong)
            holders = " ".join(c.describe() for c in held.get(uid, [])) or "nobody"
            found.append(self.violation(
                kind, phase, uid, f"held by {holders}; discover answered {seen}; "
                                  f"its clients this phase: {self._recent_text(uid)}"))
        self.history.count("presence-checks", len(self.workload.ids) * len(self.conns))
        return found

    def _mismatches(self, uids: Iterable[str]) -> dict[str, list[tuple[Conn, Any]]]:
        held = self.held()
        out = {}
        for uid, answers in self.discover_all(uids).items():
            want = bool(held.get(uid))
            wrong = [(c, a) for c, a in answers if a is not want]
            if wrong:
                out[uid] = wrong
        return out

    def _recent_text(self, uid: str) -> str:
        """The clients that asked for ``uid`` and were still around this phase."""
        return " ".join(c.describe() for c in self.history.conns if c.uid == uid and (
            c.held_until() or c.closed_at or self.history.now()) >= self._phase_start - 1) or "-"

    def check_probes(self, phase: Phase) -> list[Violation]:
        """A relay from a checker on each server reaches the one holder of each held ID."""
        targets = {uid: conns[0] for uid, conns in self.held().items() if len(conns) == 1}
        probes = []
        for uid, holder in targets.items():
            for server in range(len(self.cluster.servers)):
                senders = [c for c in self.conns if c.server == server and c.holds()]
                if senders:
                    sender = self.workload.rng.choice(senders)
                    probes.append((self.workload.send_relay(sender, uid, "offer", "p"),
                                   uid, holder, sender))
        end = time.monotonic() + 3
        while time.monotonic() < end and any(not self.history.deliveries.get(rid)
                                             for rid, *_ in probes):
            time.sleep(0.05)
        found = []
        for rid, uid, holder, sender in probes:
            got = [d.conn for d in self.history.deliveries.get(rid, [])]
            if got == [holder]:
                self.history.count("probe-delivered")
                continue
            error = self.history.relay_errors.get(rid)
            found.append(self.violation(
                "unreachable", phase, uid,
                f"probe {rid} from c{sender.n}@s{sender.server} reached "
                f"{[f'c{c.n}' for c in got]} (error: {error}); holder {holder.describe()}; "
                f"its clients this phase: {self._recent_text(uid)}"))
        return found

    def check_closes(self, phase: Phase) -> list[Violation]:
        """A holder the server closed was replaced by a same-key registration; nothing
        that got `registered` is closed for its register deadline."""
        found = []
        for conn in self.history.conns:
            if conn.role != "w" or conn.registered_at is None or conn.closed_at is None \
                    or conn.closed_at < self._phase_start or conn.local_close_at is not None:
                continue
            if conn.replaced_at is not None and conn.replaced_at <= conn.closed_at:
                continue
            if conn.close_code == 4000 and self._replacer(conn):
                continue
            self.history.count(f"holder-closed:{conn.close_code}")
            found.append(self.violation(
                "holder-closed-by-server", phase, conn.uid,
                f"{conn.describe()} got `registered`, then close {conn.close_code} "
                f"{conn.close_reason!r} with no registration of its ID elsewhere"))
        return found

    def _replacer(self, conn: Conn) -> Conn | None:
        """Another client registered ``conn``'s ID before it was closed (two holders at
        once is the double-holder check's business)."""
        return next((c for c in self.history.conns
                     if c is not conn and c.uid == conn.uid and c.registered_at is not None and c.registered_at <= conn.closed_at + 1
                     and c.registered_at >= conn.registered_at), None)

    def check_relays(self, phase: Phase) -> list[Violation]:
        found = []
        relays = [r for r in self.history.relays.values() if r.phase is phase]
        for relay in relays:
            found += self._check_delivery(relay, phase)
            if relay.rid.startswith("r"):
                found += self._account(relay, phase)
        return found

    def _check_delivery(self, relay: Relay, phase: Phase) -> list[Violation]:
        """Never to a client that does not hold the target, never twice, `from` right."""
        found = []
        deliveries = self.history.deliveries.get(relay.rid, [])
        if len(deliveries) > 1:
            found.append(self.violation(
                "duplicate-delivery", phase, relay.to,
                f"relay {relay.rid} from {relay.sender.describe()} arrived "
                f"{len(deliveries)} times: {[d.conn.describe() for d in deliveries]}"))
        for d in deliveries:
            if not d.conn.could_receive_for(relay.to, d.at):
                found.append(self.violation(
                    "misdelivered", phase, relay.to,
                    f"relay {relay.rid} (sent t={relay.sent_at:.2f}) reached "
                    f"{d.conn.describe()} at t={d.at:.2f}"))
            if d.message.get("from") != relay.sender.uid:
                found.append(self.violation(
                    "wrong-from", phase, relay.to,
                    f"relay {relay.rid} from {relay.sender.describe()} arrived "
                    f"with from={d.message.get('from')!r}"))
        return found

    def _account(self, relay: Relay, phase: Phase) -> list[Violation]:
        """A relay was delivered, or its sender was told, or one of the ends went away
        while it was in flight; only in quiet phases is anything else a violation."""
        outcome = self._outcome(relay)
        self.history.count(f"relay-{outcome}")
        # A failover may refuse a relay (`unavailable`), never lose it without a word.
        if outcome in ("lost", "refused") and phase.quiet \
                or outcome == "lost" and phase.kind == "failover":
            error = self.history.relay_errors.get(relay.rid)
            return [self.violation(
                "relay-lost" if outcome == "lost" else "relay-refused", phase, relay.to,
                f"relay {relay.rid} sent t={relay.sent_at:.2f} by {relay.sender.describe()} "
                f"(error {error}); holders when sent: "
                f"{[c.describe() for c in relay.holders] or 'none'}; "
                f"its clients this phase: {self._recent_text(relay.to)}")]
        return []

    def _outcome(self, relay: Relay) -> str:
        if self.history.deliveries.get(relay.rid):
            return "delivered"
        error = self.history.relay_errors.get(relay.rid)
        if error in RELAY_REPORTED:
            return "reported"
        key = (relay.sender.n, relay.to)
        if self.history.notices[key] > 0:
            with self.history.lock:
                self.history.notices[key] -= 1
            return "notified"
        if relay.sender.held_until() is not None:
            return "sender-closed"
        if any(c.local_close_at is not None
               and relay.sent_at - 1.0 <= c.local_close_at <= relay.sent_at + 2.0
               for c in relay.holders):
            # A frame the server had written when our client shut its socket is lost
            # without notice (docs/protocol.md section 9).
            return "target-closed"
        return "refused" if error else "lost"


# --------------------------------------------------------------------------------------
# Phases


def inject(cluster: Cluster, phase: Phase, workload: Workload) -> None:
    """Run the workload through ``phase``'s fault."""
    redis = cluster.redis
    if phase.kind == "quiet":
        workload.run_for(phase.seconds)
    elif phase.kind == "redis-stop":
        redis.stop()
        workload.run_for(phase.seconds)
        redis.start()  # empty: no persistence
        workload.run_for(1.0)
    elif phase.kind == "redis-restart":
        redis.restart_empty()
        workload.run_for(phase.seconds)
    elif phase.kind == "pause":
        sleeper = redis.pause(phase.seconds)
        workload.run_for(phase.seconds + 0.5)
        sleeper.join(phase.seconds + 10)
    elif phase.kind == "failover":
        failing = threading.Thread(target=fail_over, args=(redis,), daemon=True)
        failing.start()
        workload.run_for(phase.seconds)
        failing.join(60)
        workload.run_for(1.0)
    else:
        raise ValueError(phase.kind)


def fail_over(deployment) -> None:
    """Sentinel's FAILOVER, or a CLUSTER FAILOVER of every shard in turn
    (tests/redis_topologies.py)."""
    if hasattr(deployment, "shards"):
        for shard in deployment.shards():
            deployment.failover(shard["primary"])
    else:
        deployment.failover()


def settle(cluster: Cluster, phase: Phase, workload: Workload, settings: Settings) -> None:
    """Idle until the contract promises consistency: Redis answering, then the recovery
    window and a heartbeat (quiet phases: in-flight messages only)."""
    workload.wait_helpers()
    if phase.quiet:
        time.sleep(1.0)
        return
    cluster.wait_ready()
    time.sleep(settings.settle)


def ci_schedule(settings: Settings) -> list[Phase]:
    """Every fault once, pauses shorter and longer than the presence TTL."""
    kinds = [("quiet", 5.0), ("redis-stop", settings.ttl + 1.0), ("quiet", 3.0),
             ("redis-restart", 2.0), ("pause", 0.5 * settings.ttl), ("quiet", 3.0),
             ("pause", 1.5 * settings.ttl), ("quiet", 4.0)]
    return [Phase(i + 1, kind, seconds) for i, (kind, seconds) in enumerate(kinds)]


def failover_schedule() -> list[Phase]:
    """Quiet, a failover during the workload, quiet (Redis Cluster and Sentinel)."""
    kinds = [("quiet", 4.0), ("failover", 4.0), ("quiet", 3.0)]
    return [Phase(i + 1, kind, seconds) for i, (kind, seconds) in enumerate(kinds)]


def soak_schedule(rng: random.Random, settings: Settings, minutes: float) -> list[Phase]:
    """Random faults with a quiet phase after each, until about ``minutes`` of wall time
    (each phase costs its length plus its settle and check)."""
    phases: list[Phase] = []
    budget = minutes * 60
    while budget > 0:
        kind = rng.choice(["redis-stop", "redis-restart", "pause", "pause"])
        seconds = {"redis-stop": rng.uniform(1.0, 2.5) * settings.ttl,
                   "redis-restart": rng.uniform(1.0, 4.0),
                   "pause": rng.uniform(0.3, 1.8) * settings.ttl}[kind]
        quiet = rng.uniform(4.0, 10.0)
        phases += [Phase(len(phases) + 1, "quiet", quiet),
                   Phase(len(phases) + 2, kind, seconds)]
        budget -= quiet + seconds + 2 * (settings.settle + 4)
    return phases + [Phase(len(phases) + 1, "quiet", 5.0)]


@dataclasses.dataclass
class Report:
    seed: int
    violations: list[Violation]
    counts: Counter
    phases: list[dict[str, Any]]
    seconds: float

    def by_kind(self) -> Counter:
        return Counter(v.kind for v in self.violations)

    def describe(self, limit: int = 25) -> str:
        lines = [f"seed {self.seed}: {len(self.violations)} violations {dict(self.by_kind())}"]
        lines += [str(v) for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"... {len(self.violations) - limit} more")
        return "\n".join(lines)


PHASE_FIGURES = ("registered", "takeover-registered", "session-replaced", "collision-refused",
                 "burst", "rotated", "deadline-race", "deadline-registered", "relay-sent",
                 "relay-delivered", "relay-reported", "relay-notified", "relay-lost",
                 "register-unavailable")


def run(cluster: Cluster, settings: Settings, seed: int, schedule: list[Phase],
        clients: int = 24, ids: int = 26, log: Callable[[str], None] = print) -> Report:
    """The whole experiment; returns what the checker found."""
    history = History(seed)
    rng = random.Random(seed)
    workload = Workload(cluster, settings, history, rng, ids=ids, clients=clients)
    workload.immediate = []
    checker = Checker(workload)
    checker.ensure()
    violations: list[Violation] = []
    phases = []
    try:
        for phase in schedule:
            history.phase = phase
            started = history.now()
            inject(cluster, phase, workload)
            settle(cluster, phase, workload, settings)
            found = workload.immediate + checker.check(phase)
            workload.immediate = []
            violations += found
            figures = {k: history.phase_counts[phase.index][k] for k in PHASE_FIGURES}
            phases.append({"phase": phase.name, "started": round(started, 2),
                           "ended": round(history.now(), 2), "figures": figures,
                           "violations": dict(Counter(v.kind for v in found)),
                           "checker_workers": dict(checker.coverage)})
            log(f"phase {phase.name:22} t={started:6.1f}-{history.now():6.1f}s "
                + " ".join(f"{k}={v}" for k, v in figures.items() if v)
                + f" violations={len(found)}")
    finally:
        for conn in history.conns:
            if conn.closed_at is None:
                conn.close_abrupt()
    return Report(seed, violations, history.counts, phases, history.now())
