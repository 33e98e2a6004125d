"""The python-websockets client process (asyncio): the paced latency run (and the
throughput run with --throughput-client websockets), the warm-up, and, on two blocking raw
connections, the round trips."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import time
from typing import Any

from .clients import CROSS_STEPS, pair_totals, wait_parent
from .leanclient import rtt_phase
from .protocol import PROTOCOLS, Protocol, Target, loads, make_sdp


class Pair:
    __slots__ = ("sender", "receiver", "sender_id", "receiver_id", "prefix", "suffix", "sent",
                 "received", "in_window", "event", "errors", "unexpected", "bad_from",
                 "samples", "sender_done", "failure", "sender_errors", "rejected",
                 "error_sample", "proto")

    def __init__(self, sender, receiver, sender_id, receiver_id, sdp, proto: Protocol) -> None:
        self.sender, self.receiver = sender, receiver
        self.sender_id, self.receiver_id = sender_id, receiver_id
        self.proto = proto
        self.prefix, self.suffix = proto.offer_parts(receiver_id, sdp)
        self.sent = self.received = self.in_window = 0
        self.errors = self.unexpected = self.bad_from = 0
        # Error replies on the sender's connection, and how many offers they account for
        # (an "undelivered" notice names a count; any other error reply stands for one).
        self.sender_errors = self.rejected = 0
        self.error_sample: str | None = None
        self.event = asyncio.Event()
        self.samples: list[int] = []
        self.sender_done = False
        self.failure: str | None = None


async def _open_registered(target: Target, user_id: str, opts: dict[str, Any],
                           sem: asyncio.Semaphore):
    async with sem:
        return await PROTOCOLS[target[0]].open(target[1], user_id, opts)


async def _open_many(target: Target, ids: list[str], opts: dict[str, Any]) -> list:
    sem = asyncio.Semaphore(opts["connect_concurrency"])
    results = await asyncio.gather(*(_open_registered(target, u, opts, sem) for u in ids),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    socks = [r for r in results if not isinstance(r, BaseException)]
    if errors:
        await _close_all(socks)
        raise RuntimeError(f"{len(errors)} of {len(ids)} connections failed; first: "
                           f"{errors[0]!r}")
    return socks


async def _close_all(socks: list) -> None:
    async def close(ws):
        with contextlib.suppress(Exception):
            await ws.close()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(20):
            await asyncio.gather(*(close(ws) for ws in socks))


async def _make_pairs(target: Target, idx: int, n: int, tag: str,
                      opts: dict[str, Any]) -> list[Pair]:
    sids = [f"{tag}-p{idx}-s{i}" for i in range(n)]
    rids = [f"{tag}-p{idx}-r{i}" for i in range(n)]
    socks = await _open_many(target, sids + rids, opts)
    sdp = make_sdp(opts["sdp_size"])
    proto = PROTOCOLS[target[0]]
    return [Pair(socks[i], socks[n + i], sids[i], rids[i], sdp, proto) for i in range(n)]


async def _make_cross_pairs(conn, target: Target, idx: int, tag: str,
                            opts: dict[str, Any]) -> list[Pair]:
    """Register connections as the parent asks ("open", k), report their ids, and pair
    them as the parent decides ("pairs", [(sender, receiver), ...]) once it has read from
    the server log which worker holds each. Unpaired connections are closed."""
    socks: dict[str, Any] = {}
    try:
        for _ in range(CROSS_STEPS + 1):
            msg = wait_parent(conn, ("open", "pairs"), 120)
            if msg[0] == "open":
                ids = [f"{tag}-p{idx}-c{len(socks) + i}" for i in range(msg[1])]
                socks.update(zip(ids, await _open_many(target, ids, opts)))
                conn.send(("opened", ids))
                continue
            chosen = msg[1]
            used = {u for pair in chosen for u in pair}
            await _close_all([ws for u, ws in socks.items() if u not in used])
            sdp = make_sdp(opts["sdp_size"])
            proto = PROTOCOLS[target[0]]
            return [Pair(socks[s], socks[r], s, r, sdp, proto) for s, r in chosen]
        raise RuntimeError(f"no pairs from the parent after {CROSS_STEPS} rounds")
    except BaseException:
        await _close_all(list(socks.values()))
        raise


async def _receiver(p: Pair, t_a: float, t_b: float, t_a_ns: int, t_b_ns: int,
                    record: bool, deadline: float, limit: int) -> None:
    ws = p.receiver
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    expected_from = p.sender_id
    offer_type, from_key, sent_at = p.proto.offer_type, p.proto.from_key, p.proto.sent_at
    error_types = p.proto.error_types
    async with asyncio.timeout_at(deadline):
        for _ in range(limit):  # no sender sends more than max_messages
            data = await ws.recv()
            now_ns = monotonic_ns()
            now = monotonic()
            msg = loads(data)
            kind = msg.get("type")
            if kind == offer_type:
                if msg.get(from_key) != expected_from:
                    p.bad_from += 1
                p.received += 1
                p.event.set()
                if t_a <= now <= t_b:
                    p.in_window += 1
                if record:
                    t = sent_at(msg)
                    if t_a_ns <= t <= t_b_ns:
                        p.samples.append(now_ns - t)
            elif kind in error_types:
                p.errors += 1
            else:
                p.unexpected += 1


async def _sender_reader(p: Pair, deadline: float, limit: int) -> None:
    """Error replies on the sender's own connection (peer-offline, unavailable, ...): each
    stands for offers that will not arrive, so the closed loop does not wait for them."""
    error_types = p.proto.error_types
    async with asyncio.timeout_at(deadline):
        for _ in range(limit):
            msg = loads(await p.sender.recv())
            if msg.get("type") in error_types:
                p.sender_errors += 1
                p.rejected += p.proto.rejected(msg)
                if p.error_sample is None:
                    p.error_sample = f"to sender {p.sender_id}: {json.dumps(msg)[:300]}"
                p.event.set()
            else:
                p.unexpected += 1


async def _throughput_sender(p: Pair, t_b: float, window: int, max_count: int) -> None:
    ws, prefix, suffix = p.sender, p.prefix, p.suffix
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    try:
        while p.sent < max_count and monotonic() < t_b:
            if p.sent - p.received - p.rejected >= window:
                p.event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await p.event.wait()
                continue
            await ws.send(prefix + str(monotonic_ns()) + suffix)
            p.sent += 1
    except Exception as exc:  # the connection died: record it, the others go on
        p.failure = f"sender {p.sender_id}: {exc!r}"
    finally:
        p.sender_done = True


async def _paced_sender(pairs: list[Pair], t_start: float, t_b: float, rate: float,
                        max_count: int, t_a: float, lags: list[float]) -> None:
    """Open loop: message i is due at t_start + i/rate, round-robin over the senders."""
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    n = len(pairs)
    i = 0
    try:
        while i < max_count:
            now = monotonic()
            if now >= t_b or all(p.failure for p in pairs):
                break
            due = t_start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            # Send everything due now (bounded by max_count and the end of the window).
            while i < max_count and t_start + i / rate <= now:
                p = pairs[i % n]
                i += 1
                if p.failure:
                    continue
                if t_a <= now:
                    lags.append(now - (t_start + (i - 1) / rate))
                try:
                    await p.sender.send(p.prefix + str(monotonic_ns()) + p.suffix)
                except Exception as exc:
                    p.failure = f"sender {p.sender_id}: {exc!r}"
                    continue
                p.sent += 1
    finally:
        for p in pairs:
            p.sender_done = True


async def _cpu_sampler(t_a: float, t_b: float, out: dict[str, float]) -> None:
    await asyncio.sleep(max(0.0, t_a - time.monotonic()))
    out["a"] = sum(os.times()[:2])
    await asyncio.sleep(max(0.0, t_b - time.monotonic()))
    out["b"] = sum(os.times()[:2])


async def _relay_phase(conn, target: Target, idx: int, kind: str, n: int, tag: str, cross: bool,
                       opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    if cross:
        pairs = await _make_cross_pairs(conn, target, idx, tag, opts)
    else:
        pairs = await _make_pairs(target, idx, n, tag, opts)
    tasks: list[asyncio.Task] = []
    failures: list[str] = []
    lags: list[float] = []
    cpu: dict[str, float] = {}
    try:
        conn.send(("ready", time.monotonic() - t0))
        _, t_start, t_a, t_b = wait_parent(conn, "go", 60)
        # A full collection in the client stalls its loop for milliseconds, which would
        # show up as relay latency: collect now, then not until the phase is over.
        gc.collect()
        gc.disable()
        t_a_ns, t_b_ns = int(t_a * 1e9), int(t_b * 1e9)
        deadline = t_b + opts["drain_grace"]
        record = kind == "latency"
        limit = opts["max_messages"] + 1000
        receivers = [asyncio.create_task(_receiver(p, t_a, t_b, t_a_ns, t_b_ns, record,
                                                   deadline, limit)) for p in pairs]
        readers = [asyncio.create_task(_sender_reader(p, deadline, limit)) for p in pairs]
        sampler = asyncio.create_task(_cpu_sampler(t_a, t_b, cpu))
        tasks = receivers + readers + [sampler]
        await asyncio.sleep(max(0.0, t_start - time.monotonic()))
        if kind == "throughput":
            await asyncio.gather(*(_throughput_sender(p, t_b, opts["window"],
                                                      opts["max_messages"]) for p in pairs))
        else:
            await _paced_sender(pairs, t_start, t_b, opts["rate"] / opts["procs"],
                                opts["max_messages"], t_a, lags)
        # Drain: wait (bounded) until every live receiver has what its sender sent, and
        # the CPU sampler has taken its reading at t_b.
        while time.monotonic() < deadline and (not sampler.done() or any(
                p.received + p.rejected < p.sent and not receivers[i].done()
                for i, p in enumerate(pairs))):
            await asyncio.sleep(0.01)
        for p, task in zip(pairs, receivers):
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                why = ("nothing more before the deadline" if isinstance(exc, TimeoutError)
                       else repr(exc))
                failures.append(f"receiver {p.receiver_id}: {why}")
        for p, task in zip(pairs, readers):  # a reader times out only at the deadline
            if task.done() and not task.cancelled() and not isinstance(
                    task.exception(), (TimeoutError, type(None))):
                failures.append(f"sender {p.sender_id} (reading): {task.exception()!r}")
        failures += [p.failure for p in pairs if p.failure]
    finally:
        gc.enable()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # also retrieves exceptions
        await _close_all([s for p in pairs for s in (p.sender, p.receiver)])
    samples = [s for p in pairs for s in p.samples]
    lags.sort()
    return {
        **pair_totals(pairs, failures, cpu),
        "samples": samples,
        "lag_p99": lags[int(0.99 * (len(lags) - 1))] if lags else 0.0,
        "lag_max": lags[-1] if lags else 0.0,
    }


async def _warmup_phase(target: Target, idx: int, tag: str,
                        opts: dict[str, Any]) -> dict[str, Any]:
    """A few relays through the server, so lazily loaded code is loaded before measuring."""
    pairs = await _make_pairs(target, idx, 2, tag, opts)
    try:
        for p in pairs:
            for _ in range(5):
                await p.sender.send(p.prefix + str(time.monotonic_ns()) + p.suffix)
        async with asyncio.timeout(10):
            for p in pairs:
                for _ in range(5):
                    msg = loads(await p.receiver.recv())
                    if msg.get("type") != p.proto.offer_type:
                        raise RuntimeError(f"warm-up got {msg!r}")
    finally:
        await _close_all([s for p in pairs for s in (p.sender, p.receiver)])
    return {"ok": True}


def client_main(conn, idx: int, opts: dict[str, Any]) -> None:
    """A client process: runs the phases the parent asks for, one at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    for _ in range(10_000):  # commands; a run sends a handful per server and round
        if not conn.poll(900):
            return
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        try:
            name, target, tag = cmd[0], cmd[1], cmd[2]
            if name == "warmup":
                result = asyncio.run(_warmup_phase(target, idx, tag, opts))
            elif name == "rtt":
                result = rtt_phase(target, tag, cmd[3], cmd[4], opts)
            else:
                result = asyncio.run(_relay_phase(conn, target, idx, name, cmd[3], tag, cmd[4],
                                                  opts))
            conn.send(("result", result))
        except BaseException as exc:  # report, then keep serving (the parent decides)
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
