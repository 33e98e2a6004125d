"""The lean client process (bench/rawws.py, one epoll loop): the closed-loop throughput
run, the connections phase (open, hold and close thousands of registered connections), and
the blocking round trips of one pair."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import time
from typing import Any

import rawws

from .clients import CROSS_STEPS, pair_totals, percentile, sleep_until, wait_parent
from .protocol import PROTOCOLS, Target, loads, make_sdp


class PairRoundTrip:
    """One pair on two blocking raw connections (bench/rawws.py, TCP_NODELAY): A sends an
    offer to B; B, on receipt, answers A. The same thread plays both ends, so a round trip
    includes B's parse-and-answer (a few microseconds of Python) but no scheduling between
    processes."""

    def __init__(self, target: Target, tag: str, sdp_size: int, timeout: float = 5.0) -> None:
        proto, url = target
        tgt = rawws.Target(proto, url)
        self.a_id, self.b_id = a_id, b_id = f"{tag}-a", f"{tag}-b"
        self.a = rawws.BlockingWS(tgt, a_id)
        try:
            self.b = rawws.BlockingWS(tgt, b_id)
        except BaseException:
            self.a.close()
            raise
        sdp = make_sdp(sdp_size)
        if proto == "peerjs":
            self.offer_head = ('{"type":"OFFER","dst":' + json.dumps(b_id) +
                               ',"payload":{"type":"offer","sdp":' + json.dumps(sdp) + ',"i":')
            self.answer_head = ('{"type":"ANSWER","dst":' + json.dumps(a_id) +
                                ',"payload":{"type":"answer","sdp":' + json.dumps(sdp) + ',"i":')
            self.kinds, self.from_key, self.body = ("OFFER", "ANSWER"), "src", "payload"
        else:
            self.offer_head = ('{"type":"offer","to":' + json.dumps(b_id) +
                               ',"offer":{"type":"offer","sdp":' + json.dumps(sdp) + ',"i":')
            self.answer_head = ('{"type":"answer","to":' + json.dumps(a_id) +
                                ',"answer":{"type":"answer","sdp":' + json.dumps(sdp) + ',"i":')
            self.kinds, self.from_key, self.body = ("offer", "answer"), "from", None
        for s in (self.a.sock, self.b.sock):
            s.settimeout(timeout)

    def one(self, i: int) -> tuple[int, str | None]:
        """One round trip: (nanoseconds, None), or (nanoseconds, what was wrong)."""
        t = time.perf_counter_ns()
        self.a.send_text((self.offer_head + str(i) + "}}").encode())
        got = loads(self.b.recv_text())
        ok = got.get("type") == self.kinds[0] and got.get(self.from_key) == self.a_id and \
            got[self.body or "offer"]["i"] == i
        self.b.send_text((self.answer_head + str(i) + "}}").encode())
        back = loads(self.a.recv_text())
        dt = time.perf_counter_ns() - t
        ok = ok and back.get("type") == self.kinds[1] and back.get(self.from_key) == self.b_id \
            and back[self.body or "answer"]["i"] == i
        return dt, None if ok else f"{json.dumps(got)[:150]} / {json.dumps(back)[:150]}"

    def close(self) -> None:
        self.a.close()
        self.b.close()


def rtt_phase(target: Target, tag: str, count: int, limit_s: float,
              opts: dict[str, Any]) -> dict[str, Any]:
    """Sequential round trips of one ``PairRoundTrip``; A's time from its send to the
    answer's arrival is one sample. 50 unrecorded round trips first; bounded by ``count``
    and ``limit_s``."""
    pair = PairRoundTrip(target, tag, opts["sdp_size"])
    samples: list[int] = []
    bad = 0
    bad_sample = None
    end = time.monotonic() + limit_s
    gc.collect()
    gc.disable()
    cpu0 = sum(os.times()[:2])
    t0 = time.monotonic()
    try:
        for i in range(-50, count):
            if time.monotonic() > end:
                break
            dt, wrong = pair.one(i)
            if wrong:
                bad += 1
                bad_sample = bad_sample or wrong
            if i >= 0:
                samples.append(dt)
        wall = time.monotonic() - t0
        cpu = sum(os.times()[:2]) - cpu0
    finally:
        gc.enable()
        pair.close()
    samples.sort()
    return {"round_trips": len(samples), "asked": count, "bad": bad, "bad_sample": bad_sample,
            "wall_s": wall, "client_cpu": cpu,
            "p50_ms": percentile(samples, 0.50) / 1e6, "p99_ms": percentile(samples, 0.99) / 1e6,
            "max_ms": samples[-1] / 1e6 if samples else float("nan"),
            "mean_ms": sum(samples) / len(samples) / 1e6 if samples else float("nan")}


class LeanPair:
    __slots__ = ("sender", "receiver", "sender_id", "receiver_id", "sent", "received",
                 "in_window", "rejected", "errors", "sender_errors", "unexpected", "bad_from",
                 "failure", "error_sample")

    def __init__(self, sender, receiver, sender_id: str, receiver_id: str) -> None:
        self.sender, self.receiver = sender, receiver
        self.sender_id, self.receiver_id = sender_id, receiver_id
        self.sent = self.received = self.in_window = self.rejected = 0
        self.errors = self.sender_errors = self.unexpected = self.bad_from = 0
        self.failure: str | None = None
        self.error_sample: str | None = None


def _lean_open_pairs(conn, pool: rawws.Pool, idx: int, n: int, tag: str,
                     cross: bool) -> list[tuple[Any, Any, str, str]]:
    """Register the pairs' connections on the lean pool: n senders and n receivers, or, for
    cross-worker pairs, as the parent asks ("open"/"pairs", see aioclient._make_cross_pairs)."""
    deadline = time.monotonic() + 120

    def by_uid() -> dict[str, Any]:
        return {c.uid: c for c in pool.conns.values() if c.state == rawws.OPEN}

    def open_ids(ids: list[str]) -> None:
        r = pool.open(ids, deadline)
        if r["failed"]:
            raise RuntimeError(f"{r['failed']} of {len(ids)} connections failed: "
                               f"{pool.stats()['failures']}")

    if not cross:
        sids = [f"{tag}-p{idx}-s{i}" for i in range(n)]
        rids = [f"{tag}-p{idx}-r{i}" for i in range(n)]
        open_ids(sids + rids)
        conns = by_uid()
        return [(conns[a], conns[b], a, b) for a, b in zip(sids, rids)]
    held: list[str] = []
    for _ in range(CROSS_STEPS + 1):
        msg = wait_parent(conn, ("open", "pairs"), 120)
        if msg[0] == "open":
            ids = [f"{tag}-p{idx}-c{len(held) + i}" for i in range(msg[1])]
            open_ids(ids)
            held += ids
            conn.send(("opened", ids))
            continue
        conns = by_uid()
        used = {u for pair in msg[1] for u in pair}
        frame = rawws.client_frame(rawws.CLOSE_1000, rawws.OP_CLOSE)
        for u, c in conns.items():  # unpaired: close frame now, the pool reaps them later
            if u not in used:
                c.state = rawws.CLOSING
                pool._send(c, frame)
        return [(conns[a], conns[b], a, b) for a, b in msg[1]]
    raise RuntimeError(f"no pairs from the parent after {CROSS_STEPS} rounds")


def _lean_throughput(conn, target: Target, idx: int, n: int, tag: str, cross: bool,
                     opts: dict[str, Any]) -> dict[str, Any]:
    """The throughput run on the lean client (bench/rawws.py): the same closed loop as
    aioclient's _relay_phase (each pair keeps at most --window offers in flight; offers
    counted at the receivers inside the window) in one epoll loop, with about a third of
    python-websockets' CPU per message."""
    import random
    import select as sel

    t0 = time.monotonic()
    proto_name, url = target
    proto = PROTOCOLS[proto_name]
    pool = rawws.Pool(rawws.Target(proto_name, url), ["127.0.0.1"], opts["conn_concurrency"],
                      opts["handshake_timeout"])
    failures: list[str] = []
    cpu: dict[str, float] = {}
    pairs: list[LeanPair] = []
    try:
        pairs = [LeanPair(*x) for x in _lean_open_pairs(conn, pool, idx, n, tag, cross)]
        conn.send(("ready", time.monotonic() - t0))
        _, t_start, t_a, t_b = wait_parent(conn, "go", 60)
        window, max_count = opts["window"], opts["max_messages"]
        sdp = make_sdp(opts["sdp_size"])
        parts = {p: tuple(x.encode() for x in proto.offer_parts(p.receiver_id, sdp))
                 for p in pairs}
        offer_type, from_key = proto.offer_type, proto.from_key
        error_types = proto.error_types
        ep = sel.epoll()
        fd_map: dict[int, tuple[LeanPair, int]] = {}
        for p in pairs:
            for role, c in ((0, p.sender), (1, p.receiver)):
                fd_map[c.fd] = (p, role)
                ep.register(c.fd, sel.EPOLLIN)
        monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
        getrandbits = random.getrandbits
        client_frame, send_or_queue = rawws.client_frame, rawws.send_or_queue
        IN, OUT = sel.EPOLLIN, sel.EPOLLOUT

        def send_offer(p: LeanPair) -> None:
            prefix, suffix = parts[p]
            payload = prefix + str(monotonic_ns()).encode() + suffix
            # getrandbits: a mask key without a syscall per offer (os.urandom's default)
            frame = client_frame(payload, key=getrandbits(32).to_bytes(4, "little"))
            p.sent += 1
            send_or_queue(ep, p.sender, frame)

        sleep_until(t_start)
        gc.collect()
        gc.disable()
        for p in pairs:
            for _ in range(min(window, max_count)):
                send_offer(p)
        deadline = t_b + opts["drain_grace"]
        sending = True
        for _ in range(100_000_000):
            now = monotonic()
            if "a" not in cpu and now >= t_a:
                cpu["a"] = sum(os.times()[:2])
            if now >= t_b:
                if "b" not in cpu:
                    cpu["b"] = sum(os.times()[:2])
                    sending = False
                if now >= deadline or all(p.received + p.rejected >= p.sent or p.failure
                                          for p in pairs):
                    break
            for fd, ev in ep.poll(0.01):
                p, role = fd_map[fd]
                if p.failure:
                    continue
                c = p.receiver if role else p.sender
                try:
                    if ev & OUT and c.out:
                        k = c.sock.send(c.out)
                        c.out = c.out[k:]
                        if not c.out:
                            ep.modify(c.fd, IN)
                    if not ev & (IN | sel.EPOLLHUP | sel.EPOLLERR):
                        continue
                    data = c.sock.recv(262144)
                    if not data:
                        raise ConnectionError("EOF")
                    now = monotonic()
                    for op, payload in c.reader.feed(data):
                        if op == rawws.OP_TEXT:
                            msg = loads(payload)
                            kind = msg.get("type")
                            if role:
                                if kind == offer_type:
                                    p.received += 1
                                    if msg.get(from_key) != p.sender_id:
                                        p.bad_from += 1
                                    if t_a <= now <= t_b:
                                        p.in_window += 1
                                elif kind in error_types:
                                    p.errors += 1
                                else:
                                    p.unexpected += 1
                            elif kind in error_types:
                                p.sender_errors += 1
                                p.rejected += proto.rejected(msg)
                                if p.error_sample is None:
                                    p.error_sample = (f"to sender {p.sender_id}: "
                                                      f"{payload[:300].decode(errors='replace')}")
                            else:
                                p.unexpected += 1
                        elif op == rawws.OP_PING:
                            c.sock.sendall(rawws.client_frame(payload, rawws.OP_PONG))
                        elif op == rawws.OP_CLOSE:
                            raise ConnectionError(f"closed by the server: {payload[:2].hex()}")
                    if sending:
                        while p.sent - p.received - p.rejected < window and \
                                p.sent < max_count:
                            send_offer(p)
                except (OSError, ConnectionError, rawws.ProtocolError, ValueError) as exc:
                    p.failure = f"{'receiver' if role else 'sender'} {c.uid}: {exc!r}"
                    failures.append(p.failure)
        ep.close()
    finally:
        gc.enable()
        pool.close_all(time.monotonic() + 20)
    return {**pair_totals(pairs, failures, cpu), "samples": [], "lag_p99": 0.0, "lag_max": 0.0}


def raw_client_main(conn, idx: int, opts: dict[str, Any]) -> None:
    """A lean client process (bench/rawws.py, epoll): opens, holds and closes many registered
    connections for the connections phase, one step at a time as the parent asks:
    ("conns", target, [ids per step], sources) -> per step it waits for ("go",), opens that
    step's connections, reports ("ready", stats) and keeps answering pings until the next
    ("go",) or ("close",); then closes all and reports ("result", ...)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for _ in range(10_000):
        if not conn.poll(900):
            return
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        if cmd[0] == "throughput":  # (kind, target, tag, n, cross), as for client_main
            try:
                result = _lean_throughput(conn, cmd[1], idx, cmd[3], cmd[2], cmd[4], opts)
                conn.send(("result", result))
            except BaseException as exc:
                conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            continue
        pool = None
        try:
            _, (proto, url), steps, sources = cmd
            rawws.raise_nofile(sum(len(ids) for ids in steps) + 200)
            pool = rawws.Pool(rawws.Target(proto, url), sources, opts["conn_concurrency"],
                              opts["handshake_timeout"])
            step_results = []
            msg = wait_parent(conn, ("go", "close"), 300)
            for ids in steps:
                if msg[0] == "close":
                    break
                cpu0 = sum(os.times()[:2])
                r = pool.open(ids, time.monotonic() + opts["open_timeout"],
                              max_failures=opts["max_failures"])
                r["client_cpu"] = sum(os.times()[:2]) - cpu0
                r.update(pool.stats())
                step_results.append(r)
                conn.send(("ready", r))
                end = time.monotonic() + 600
                while not conn.poll(0) and time.monotonic() < end:
                    pool.service(time.monotonic() + 0.05)
                msg = wait_parent(conn, ("go", "close"), 1)
            if msg[0] != "close":
                wait_parent(conn, "close", 600)
            held = pool.stats()
            closed = pool.close_all(time.monotonic() + 30)
            pool = None
            conn.send(("result", {"steps": step_results, "held": held, "closed": closed}))
        except BaseException as exc:
            if pool is not None:
                with contextlib.suppress(Exception):
                    pool.close_all(time.monotonic() + 5)
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
