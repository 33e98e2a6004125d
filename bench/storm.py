#!/usr/bin/env python
"""Reconnect storm (issue 16): N registered clients lose their connections at once and
reconnect with the JS client's backoff; how long until every one is registered again,
what failed meanwhile, and how /health answered during the storm.

Run from the repo root:  python bench/storm.py                 (19,500 clients, 3 servers)
                         python bench/storm.py --clients 2000 --quick
                         python bench/storm.py --servers volli redis-2w

For each server of --servers (default: Volli with one worker and the memory backend;
Volli with two workers and Redis; peerjs-server), in one run:

1. start it (relaybench's servers: gunicorn from the working tree or --volli-ref, a private
   redis-server, npm's peerjs-server), and open --clients registered connections from
   --procs lean client processes (bench/rawws.py), several loopback source addresses;
2. the storm: at one instant every client resets its connection (SO_LINGER 0: a network
   blip or a load balancer failing over) and reconnects as volli-signaling.js does: attempt
   k waits base/2 + random(base/2) with base = min(--max-delay, --first-delay * 2^k)
   ("equal jitter"), and a failed attempt (refused, closed, user-id-taken because the
   server has not seen the old connection go yet, no answer within --handshake-timeout)
   is the next attempt; a
   client that has not registered after --give-up seconds is given up;
3. meanwhile the parent asks the server's health URL every 50 ms (Volli's /health,
   peerjs's /<path>/ — its cheapest HTTP answer), with a 5 s timeout, and Volli's /health
   on its probe port (VOLLI_HEALTH_PORT); and an established pair that the storm does not
   touch makes one offer -> answer round trip every 50 ms;
4. reported: the time from the reset until the last client registered again (and until
   50%, 90%, 99%), attempts per client, failures by reason, clients given up, health
   latency p50/p99/max and failures during the storm (both ports), the established
   pair's round trips, and the server's CPU over the storm.

Every loop is bounded in count and time, load goes to loopback only, and every server is
stopped (SIGTERM, then SIGKILL, on its process group) on exit, on error and on ^C. Results
go to bench/results/<UTC>-storm.json.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
import rawws  # noqa: E402
from relaybench.leanclient import PairRoundTrip  # noqa: E402
from relaybench.protocol import PEERJS_PATH  # noqa: E402
from relaybench.servers import (SCENARIOS, ServerConfig, ensure_peerjs,  # noqa: E402
                                free_port, make_server, start_redis)

DEFAULT_SERVERS = ("volli", "redis-2w", "peerjs")
OPEN_CONCURRENCY = 100  # handshakes in flight per client process while setting up


class StormPool(rawws.Pool):
    """A Pool whose clients, once reset, reconnect on their own schedule with backoff."""

    def __init__(self, *args, first_delay: float, max_delay: float, jitter: str,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_delay, self.max_delay, self.jitter = first_delay, max_delay, jitter
        self.storming = False
        self.attempts: dict[str, int] = {}
        self.due: list[tuple[float, str]] = []  # (when, uid), a heap
        self.registered_at: list[float] = []

    def reset_all(self) -> int:
        """Every open connection ends with a TCP reset, at once."""
        n = 0
        linger = struct.pack("ii", 1, 0)
        for c in list(self.conns.values()):
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
            self._drop(c)
            n += 1
        return n

    def schedule(self, uid: str, now: float) -> None:
        k = self.attempts.get(uid, 0)
        base = min(self.max_delay, self.first_delay * 2 ** k)
        self.attempts[uid] = k + 1
        delay = base * random.random() if self.jitter == "full" else \
            base / 2 + random.random() * base / 2
        heapq.heappush(self.due, (now + delay, uid))

    def storm(self, uids: list[str], t_reset: float, give_up: float) -> dict[str, Any]:
        self.storming = True
        self.failures.clear()
        self.dropped.clear()
        for uid in uids:
            self.schedule(uid, t_reset)
        end = t_reset + give_up
        while (self.due or self.pending) and time.monotonic() < end:
            now = time.monotonic()
            while self.due and self.due[0][0] <= now and self.pending < self.concurrency:
                _, uid = heapq.heappop(self.due)
                before = len(self.conns)
                self._start(uid, now)
                if len(self.conns) == before:  # failed at once (no socket, no port)
                    self.schedule(uid, now)
            wait = min(0.05, max(0.0, self.due[0][0] - now)) if self.due else 0.05
            self._poll(wait)
            self._expire(time.monotonic())
        given_up = len(self.due) + self.pending
        registered = sorted(t - t_reset for t in self.registered_at)
        return {"clients": len(uids), "registered": len(registered),
                "registered_at": registered, "given_up": given_up,
                "attempts": sum(self.attempts.values()),
                "failures": dict(self.failures.most_common(12)),
                "dropped_after_registering": dict(self.dropped.most_common(6))}

    def _fail(self, c, why: str) -> None:
        super()._fail(c, why)
        if self.storming:
            self.schedule(c.uid, time.monotonic())

    def _on_readable(self, c) -> None:
        was = c.state
        super()._on_readable(c)
        if self.storming and was < rawws.OPEN and c.state == rawws.OPEN:
            self.registered_at.append(c.t_reg)
        elif self.storming and was == rawws.OPEN and c.fd not in self.conns:
            self.schedule(c.uid, time.monotonic())  # the server closed it: reconnect


def client_main(conn, idx: int, opts: dict[str, Any]) -> None:
    """A client process: ("open", target, uids, sources) -> ("opened", stats);
    ("storm", t_reset) -> ("result", stats); ("quit",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pool = uids = None
    for _ in range(100):
        if not conn.poll(1800):
            return
        cmd = conn.recv()
        try:
            if cmd[0] == "quit":
                return
            if cmd[0] == "open":
                _, (proto, url), uids, sources = cmd
                rawws.raise_nofile(len(uids) + 200)
                # Before the storm: registered at a pace the servers take without timeouts.
                pool = StormPool(rawws.Target(proto, url,
                                              browser_headers=opts["browser_headers"]),
                                 sources, OPEN_CONCURRENCY,
                                 opts["handshake_timeout"], first_delay=opts["first_delay"],
                                 max_delay=opts["max_delay"], jitter=opts["jitter"])
                r = pool.open(uids, time.monotonic() + opts["open_timeout"])
                pool.concurrency = opts["concurrency"]
                conn.send(("opened", {**r, **pool.stats()}))
            elif cmd[0] == "hold":  # answer pings until told to storm
                end = time.monotonic() + 60
                while not conn.poll(0) and time.monotonic() < end:
                    pool.service(time.monotonic() + 0.05)
            elif cmd[0] == "storm":
                t_reset = cmd[1]
                while time.monotonic() < t_reset:
                    pool.service(min(t_reset, time.monotonic() + 0.05))
                reset = pool.reset_all()
                cpu0 = sum(os.times()[:2])
                r = pool.storm(uids, t_reset, opts["give_up"])
                r.update(reset=reset, client_cpu=sum(os.times()[:2]) - cpu0)
                conn.send(("result", r))
                pool.close_all(time.monotonic() + 10)
                pool = None
        except BaseException as exc:  # reported to the parent
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            return


class Probe(threading.Thread):
    """``sample(i)`` (milliseconds; raises when it fails) every 50 ms until stopped; a
    probe with ``stop_on_failure`` ends at its first failure."""

    stop_on_failure = False

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.failed, self.broken = 0, None
        self._stop_event = threading.Event()

    def sample(self, i: int) -> float:
        raise NotImplementedError

    def run(self) -> None:
        for i in range(100_000):
            if self._stop_event.is_set():
                return
            t0 = time.monotonic()
            try:
                self.samples.append(self.sample(i))
            except Exception as exc:  # noqa: BLE001 - a failed probe is the figure
                self.failed += 1
                self.broken = f"{type(exc).__name__}: {exc}"
                if self.stop_on_failure:
                    return
            self._stop_event.wait(max(0.0, 0.05 - (time.monotonic() - t0)))

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(10)
        s = sorted(self.samples)
        return {"probes": len(s), "failed": self.failed, "p50_ms": pct(s, 0.5),
                "p99_ms": pct(s, 0.99), "max_ms": s[-1] if s else None}


class HealthProbe(Probe):
    """GET ``url`` (5 s timeout)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def sample(self, i: int) -> float:
        t0 = time.monotonic()
        with urllib.request.urlopen(self.url, timeout=5) as r:
            r.read()
        return (time.monotonic() - t0) * 1e3


class PairProbe(Probe):
    """An established pair that the storm does not touch: one offer -> answer round trip
    (relaybench's ``PairRoundTrip``, 200-character SDP, 5 s timeout). How responsive the
    server stays for users already connected; the first failure breaks the pair."""

    stop_on_failure = True

    def __init__(self, target, tag: str) -> None:
        super().__init__()
        self.pair = PairRoundTrip(target, tag, 200)
        self.wrong = 0

    def sample(self, i: int) -> float:
        ns, wrong = self.pair.one(i)
        self.wrong += wrong is not None
        return ns / 1e6

    def stop(self) -> dict[str, Any]:
        result = super().stop()
        self.pair.close()
        return {**result, "wrong": self.wrong, "broken": self.broken}


def pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * (len(values) - 1)))] if values else None


def gather(conns, kind: str, timeout: float) -> list[dict[str, Any]]:
    out = []
    for c in conns:
        if not c.poll(timeout):
            raise RuntimeError(f"a client process sent no {kind!r} in {timeout:.0f}s")
        msg = c.recv()
        if msg[0] == "failed":
            raise RuntimeError(f"a client process failed: {msg[1]}")
        out.append(msg[1])
    return out


def health_url(server) -> str:
    if server.scenario == "peerjs":
        return f"http://127.0.0.1:{server.port}{PEERJS_PATH}/"
    return f"http://127.0.0.1:{server.port}/health"


def run_one(name: str, args, log_dir: Path, config: ServerConfig) -> dict[str, Any]:
    redis = None
    if SCENARIOS[name]["redis"]:
        redis = start_redis(SCENARIOS[name]["redis"], log_dir)
    server = make_server(name, log_dir, config, redis)
    probe_port = None
    if SCENARIOS[name]["app"] == "volli":
        if args.backlog:
            server.env["GUNICORN_CMD_ARGS"] = f"--backlog {args.backlog}"
        probe_port = free_port()
        server.env["VOLLI_HEALTH_PORT"] = str(probe_port)
    result: dict[str, Any] = {"server": name, "label": SCENARIOS[name]["label"],
                              "command": server.command_line(), "backlog": args.backlog}
    procs, conns = [], []
    try:
        server.start()
        opts = {k: getattr(args, k) for k in ("concurrency", "handshake_timeout",
                                              "first_delay", "max_delay", "give_up",
                                              "open_timeout", "jitter",
                                              "browser_headers")}
        for i in range(args.procs):
            parent, child = multiprocessing.Pipe()
            p = multiprocessing.Process(target=client_main, args=(child, i, opts),
                                        name=f"storm-client-{i}", daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        sources = rawws.source_addresses(max(args.procs, args.clients // 20_000 + 1))
        uids = [f"storm{server.port}-{i}" for i in range(args.clients)]
        for i, c in enumerate(conns):
            c.send(("open", server.target, uids[i::args.procs], sources[i::args.procs]
                    or sources))
        opened = gather(conns, "opened", args.open_timeout + 30)
        result["opened"] = sum(r["opened"] for r in opened)
        result["open_seconds"] = max(r["seconds"] for r in opened)
        print(f"[{name}] {result['opened']:,} of {args.clients:,} registered in "
              f"{result['open_seconds']:.1f}s; storm in 2 s", flush=True)
        if result["opened"] < 0.99 * args.clients:
            raise RuntimeError(f"only {result['opened']} of {args.clients} registered: "
                               f"{[r['failures'] for r in opened]}")
        # The few that failed to open (peerjs resets some under load) join the storm as
        # clients still trying: every one of --clients must end registered.
        for c in conns:
            c.send(("hold",))
        time.sleep(1.0)
        probe = HealthProbe(health_url(server))
        probe.start()
        probe2 = None
        if probe_port:
            probe2 = HealthProbe(f"http://127.0.0.1:{probe_port}/health")
            probe2.start()
        pair = PairProbe(server.target, f"storm{server.port}-established")
        pair.start()
        time.sleep(0.5)
        t_reset = time.monotonic() + 0.5
        cpu0 = server.cpu()
        for c in conns:
            c.send(("storm", t_reset))
        got = gather(conns, "result", args.give_up + 60)
        result["server_cpu_s"] = server.cpu() - cpu0
        result["health"] = probe.stop()
        result["health_port"] = probe2.stop() if probe2 else None
        result["established"] = pair.stop()
        times = sorted(t for r in got for t in r["registered_at"])
        failures: dict[str, int] = {}
        for r in got:
            for why, n in r["failures"].items():
                failures[why] = failures.get(why, 0) + n
        result.update({
            "reset": sum(r["reset"] for r in got), "registered": len(times),
            "given_up": sum(r["given_up"] for r in got),
            "attempts": sum(r["attempts"] for r in got),
            "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:12]),
            "all_seconds": times[-1] if len(times) == args.clients else None,
            "p50_seconds": pct(times, 0.5), "p90_seconds": pct(times, 0.9),
            "p99_seconds": pct(times, 0.99), "last_seconds": times[-1] if times else None,
            "client_cpu_s": sum(r["client_cpu"] for r in got)})
        h, e = result["health"], result["established"]
        print(f"[{name}] storm: {result['registered']:,} of {args.clients:,} registered again, "
              f"last after {fmt(result['last_seconds'])} s (50% {fmt(result['p50_seconds'])}, "
              f"90% {fmt(result['p90_seconds'])}, 99% {fmt(result['p99_seconds'])}); "
              f"{result['attempts']:,} attempts, {result['given_up']} given up; failures "
              f"{result['failures']}; health p50 {fmt(h['p50_ms'])} ms, p99 {fmt(h['p99_ms'])} "
              f"ms, max {fmt(h['max_ms'])} ms, {h['failed']} failed of "
              f"{h['probes'] + h['failed']}; {probe_line(result['health_port'])}established pair round trip p50 "
              f"{fmt(e['p50_ms'])} ms, p99 {fmt(e['p99_ms'])} ms, max {fmt(e['max_ms'])} ms, "
              f"{e['probes']} done, broken: {e['broken']}; "
              f"server CPU {result['server_cpu_s']:.1f} s", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded; the next server still runs
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {result['failure']}", flush=True)
    finally:
        for c in conns:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
        server.stop()
        if redis is not None:
            redis.stop()
    return result


def probe_line(h: dict[str, Any] | None) -> str:
    if not h:
        return ""
    return (f"VOLLI_HEALTH_PORT /health p50 {fmt(h['p50_ms'])} ms, p99 {fmt(h['p99_ms'])} ms, "
            f"max {fmt(h['max_ms'])} ms, {h['failed']} failed of {h['probes'] + h['failed']}; ")


def fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--servers", nargs="+", default=list(DEFAULT_SERVERS),
                    choices=[k for k in SCENARIOS if k != "baseline"])
    # 20,000 open files per process here (the hard limit, not raisable in this container):
    # a Volli worker keeps 256 in reserve, so one worker holds at most 19,744 clients.
    ap.add_argument("--clients", type=int, default=19_500)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=20_000,
                    help="handshakes in flight per client process (clients are independent)")
    ap.add_argument("--first-delay", type=float, default=0.5,
                    help="the JS client's reconnectDelay (s)")
    ap.add_argument("--max-delay", type=float, default=30.0,
                    help="the JS client's maxReconnectDelay (s)")
    ap.add_argument("--jitter", choices=("equal", "full"), default="equal",
                    help="attempt k waits base/2 + random(base/2) (equal) or random(base) "
                         "(full), base = min(max delay, first delay * 2^k)")
    ap.add_argument("--give-up", type=float, default=120.0,
                    help="seconds after the reset a client stops trying")
    # volli-signaling.js sets no timeout of its own on opening a socket: a browser waits
    # for TCP and the HTTP upgrade. Past this, the bench's client gives up and retries.
    ap.add_argument("--handshake-timeout", type=float, default=60.0)
    ap.add_argument("--open-timeout", type=float, default=180.0)
    ap.add_argument("--backlog", type=int, default=0,
                    help="gunicorn's listen backlog for Volli (0: its default, 2048)")
    ap.add_argument("--browser-headers", action="store_true",
                    help="upgrades carry a browser's headers as nginx forwards them (15 "
                         "lines, bench/rawws.py BROWSER_HEADERS) instead of the 5 needed")
    ap.add_argument("--volli-ref", help="run Volli from this git ref (default: working tree)")
    ap.add_argument("--quick", action="store_true", help="2,000 clients, give up after 60 s")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-save", action="store_true")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(clients=2000, give_up=60.0)
    args = ap.parse_args(argv)
    os.chdir(machine.ROOT)
    soft = rawws.raise_nofile(args.clients + 1000)
    if soft < args.clients // args.procs + 500:
        ap.error(f"the open-file limit ({soft}) is too low for {args.clients} clients")
    log_dir = Path(tempfile.mkdtemp(prefix="volli-storm-"))
    tree, commit = machine.ROOT, "working tree"
    if args.volli_ref:
        tree = log_dir / "tree"
        commit = machine.export_tree(args.volli_ref, tree)
    config = ServerConfig(tree=tree, nofile=soft, slots=args.clients + 1000)
    if "peerjs" in args.servers:
        ensure_peerjs()
    machine.interrupt_on_signals()
    started = time.monotonic()
    results = []
    try:
        for name in args.servers:
            results.append(run_one(name, args, log_dir, config))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    elapsed = time.monotonic() - started
    print()
    print(f"{args.clients:,} clients reset at once, reconnecting with {args.jitter} jitter from "
          f"{args.first_delay:g} s (max {args.max_delay:g} s); Volli from {commit}")
    print()
    print("| server | all registered again (s) | 50% / 90% / 99% (s) | attempts per client "
          "| given up | health p50 / p99 / max (ms), failed "
          "| established pair round trip p50 / p99 / max (ms) | server CPU (s) |")
    print("|---|---:|---|---:|---:|---|---|---:|")
    for r in results:
        if r.get("failure"):
            print(f"| {r['label']} | failed: {r['failure'][:80]} | | | | | | |")
            continue
        h, e = r["health"], r["established"]
        print(f"| {r['label']} | {fmt(r['all_seconds'])} | {fmt(r['p50_seconds'])} / "
              f"{fmt(r['p90_seconds'])} / {fmt(r['p99_seconds'])} | "
              f"{r['attempts'] / r['registered'] if r['registered'] else 0:.2f} | "
              f"{r['given_up']} | {fmt(h['p50_ms'])} / {fmt(h['p99_ms'])} / "
              f"{fmt(h['max_ms'])}, {h['failed']} | {fmt(e['p50_ms'])} / {fmt(e['p99_ms'])} / "
              f"{fmt(e['max_ms'])}{', broken' if e['broken'] else ''} | "
              f"{r['server_cpu_s']:.1f} |")
    print(f"\ntotal {elapsed:.0f}s; logs in {log_dir}")
    machine.save_results(args, "storm", lambda: {
        **machine.describe(), "commit": commit, "args": vars(args), "elapsed_seconds": elapsed,
        "results": results})
    return 1 if any(r.get("failure") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
