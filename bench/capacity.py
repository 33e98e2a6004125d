#!/usr/bin/env python
"""Capacity bench: many concurrent registered WebSockets on Volli with Redis, /health polled.

Run from the repo root:  python bench/capacity.py               (100,000 connections, 2 workers)
                         python bench/capacity.py --quick       (5,000 connections)

It starts a private redis-server and Volli (gunicorn, --workers gevent workers,
VOLLI_REDIS_URL, VOLLI_MAX_CONNECTIONS high so gunicorn.conf.py's worker_connections follows)
on free 127.0.0.1 ports, then opens --connections WebSockets from --procs lean client
processes (bench/rawws.py: raw non-blocking sockets on epoll, the HTTP upgrade without
permessage-deflate, a masked register frame, read until "registered"), spread over the
source addresses 127.0.0.2, 127.0.0.3, ... (bind before connect). GET /health is polled
every --health-interval seconds throughout. All connections are held idle for --hold
seconds (pings answered), then closed; everything it started is stopped on exit or ^C.

Reports: connections opened, registered, failed (with reasons), time taken, server RSS per
worker and total, RSS per connection, open fds per worker against its RLIMIT_NOFILE, the
/health latency (max, p99) and any /health failure, and writes JSON to bench/results/.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import re
import resource
import signal
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
from relaybench.clients import stop_process  # noqa: E402
from relaybench.procfs import proc_children, proc_cpu_seconds, proc_rss_kb  # noqa: E402
from relaybench.servers import ROOT, RedisServer, Server, ServerConfig, scan_log  # noqa: E402

PORTS_PER_SOURCE = 20_000  # of the ~28k ephemeral ports, leave room for TIME_WAIT etc.
FDS_PER_CLIENT = 15_000  # connections per client process (under a 20k RLIMIT_NOFILE)


# --------------------------------------------------------------------------------------------
# Client process


def client_main(conn, idx: int, url: str, ids: list[str], sources: list[str],
                concurrency: int, open_deadline_s: float, hold_deadline_s: float,
                max_failures: int, handshake_timeout: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    rawws.raise_nofile(len(ids) + 200)
    pool = rawws.Pool(rawws.Target("volli", url), sources, concurrency, handshake_timeout)
    cpu0 = sum(os.times()[:2])
    try:
        last = [0.0]

        def progress() -> None:
            now = time.monotonic()
            if now - last[0] >= 2.0:
                conn.send(("progress", idx, pool.opened, sum(pool.failures.values())))
                last[0] = now

        opened = pool.open(ids, time.monotonic() + open_deadline_s, progress, max_failures)
        opened["cpu_s"] = sum(os.times()[:2]) - cpu0
        opened.update(pool.stats())
        conn.send(("opened", idx, opened))
        # Hold: answer pings until the parent says close (bounded).
        end = time.monotonic() + hold_deadline_s
        while time.monotonic() < end and not conn.poll(0):
            pool.service(time.monotonic() + 0.2)
        held = pool.stats()
        closed = pool.close_all(time.monotonic() + 60)
        closed["held"] = held
        closed["cpu_s_total"] = sum(os.times()[:2]) - cpu0
        conn.send(("closed", idx, closed))
    except BaseException as exc:  # report; the parent decides
        with contextlib.suppress(Exception):
            conn.send(("failed", idx, f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------------------
# Health poller (parent, a thread)


class HealthPoller(threading.Thread):
    def __init__(self, port: int, interval: float, limit_s: float) -> None:
        super().__init__(daemon=True, name="health-poller")
        self.url = f"http://127.0.0.1:{port}/health"
        self.interval = interval
        self.limit_s = limit_s
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, float, str]] = []  # (t, latency s, "ok"/error)
        self.t0 = time.monotonic()

    def run(self) -> None:
        end = self.t0 + self.limit_s
        n_max = int(self.limit_s / self.interval) + 10
        for _ in range(n_max):
            if self.stop_event.is_set() or time.monotonic() > end:
                return
            t = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    body = json.loads(r.read())
                status = "ok" if body.get("status") == "ok" else f"status {body.get('status')}"
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                status = f"{type(exc).__name__}: {exc}"[:200]
            self.samples.append((t - self.t0, time.monotonic() - t, status))
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def summary(self, phases: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
        """Overall figures; with ``phases`` ({name: (start, end)} in monotonic time) also
        per phase, by the time each poll started."""
        out = self._summary(self.samples)
        if phases:
            out["phases"] = {
                name: self._summary([s for s in self.samples
                                     if a - self.t0 <= s[0] < b - self.t0], brief=True)
                for name, (a, b) in phases.items()}
            out["timeline"] = [(round(t, 2), round(lat * 1e3, 1), st if st != "ok" else "")
                               for t, lat, st in self.samples]
        return out

    @staticmethod
    def _summary(samples: list[tuple[float, float, str]], brief: bool = False) -> dict[str, Any]:
        lats = sorted(s[1] for s in samples if s[2] == "ok")
        fails = [s for s in samples if s[2] != "ok"]
        worst = max(samples, key=lambda s: s[1]) if samples else None
        if brief:
            return {"polls": len(samples), "failures": len(fails),
                    "max_ms": worst[1] * 1e3 if worst else None,
                    "p50_ms": lats[len(lats) // 2] * 1e3 if lats else None}
        return {
            "polls": len(samples), "ok": len(lats), "failures": len(fails),
            "failure_samples": [f"t={s[0]:.1f}s: {s[2]}" for s in fails[:5]],
            "max_ms": worst[1] * 1e3 if worst else None,
            "max_at_s": worst[0] if worst else None,
            "p50_ms": lats[len(lats) // 2] * 1e3 if lats else None,
            "p99_ms": lats[min(len(lats) - 1, int(0.99 * (len(lats) - 1)))] * 1e3 if lats else None,
        }


# --------------------------------------------------------------------------------------------
# Helpers


def fd_count(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return None


def nofile_of(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return "/".join(line.split()[3:5])
    return None


def worker_snapshot(server: Server) -> dict[str, Any]:
    out = {}
    for w in server.workers:
        with contextlib.suppress(OSError, RuntimeError):
            out[str(w)] = {"rss_kb": proc_rss_kb(w), "fds": fd_count(w),
                           "cpu_s": proc_cpu_seconds(w)}
    return out


def server_gone(server: Server) -> None:
    """Raise if the gunicorn master or a worker went away during the run (e.g. a signal from
    outside the bench), quoting the log's signal lines."""
    kids = sorted(proc_children(server.proc.pid)) if server.proc.poll() is None else []
    if kids != sorted(server.workers):
        lines = [ln for ln in server.log().splitlines()
                 if re.search(r"Handling signal|Worker exiting|exited|TIMEOUT|Shutting down", ln)]
        raise RuntimeError(f"the server changed during the run: master "
                           f"{'alive' if server.proc.poll() is None else 'exited'}, workers "
                           f"{sorted(server.workers)} -> {kids}; log: " + " | ".join(lines[:4]))


def registered_per_worker(log_text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in re.finditer(r"\[(\d+)\] \[INFO\] volli\.hub: registered user=", log_text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


_CAPACITY_PATTERNS = [
    ("too many open files (EMFILE)", re.compile(r"Too many open files|EMFILE")),
    ("refused at VOLLI_MAX_CONNECTIONS", re.compile(r"max-connections|connection limit")),
    ("traceback", re.compile(r"Traceback")),
    ("error lines", re.compile(r"\[(ERROR|CRITICAL)\]")),
    ("worker timeout/restart", re.compile(r"WORKER TIMEOUT|Worker \(pid:\d+\) (was sent|exited)")),
    ("volli warnings", re.compile(r"\[WARNING\] volli")),
]


def scan_capacity_log(text: str) -> dict[str, Any]:
    found = {}
    lines = text.splitlines()
    for label, pattern in _CAPACITY_PATTERNS:
        hits = [i for i, line in enumerate(lines) if pattern.search(line)]
        if hits:
            found[label] = {"count": len(hits),
                            "first": "\n".join(lines[hits[0]:hits[0] + 6])[:1500]}
    return found


# --------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers (WEB_CONCURRENCY)")
    ap.add_argument("--quick", action="store_true", help="5,000 connections")
    ap.add_argument("--procs", type=int, default=0,
                    help=f"client processes (0: one per {FDS_PER_CLIENT:,} connections, "
                         f"at least 2)")
    ap.add_argument("--concurrency", type=int, default=100,
                    help="handshakes in flight per client process")
    ap.add_argument("--sources", type=int, default=0,
                    help=f"source addresses 127.0.0.2... (0: one per {PORTS_PER_SOURCE:,} "
                         f"connections, at least one per client process)")
    ap.add_argument("--max-connections", type=int, default=0,
                    help="VOLLI_MAX_CONNECTIONS per worker (0: --connections, so any worker "
                         "may take them all)")
    ap.add_argument("--hold", type=float, default=10.0,
                    help="seconds to hold all connections idle")
    ap.add_argument("--health-interval", type=float, default=0.5)
    ap.add_argument("--max-failures", type=int, default=2000,
                    help="stop starting new connections after this many failures (all client "
                         "processes together); the rest count as failed")
    ap.add_argument("--handshake-timeout", type=float, default=20.0,
                    help="seconds from connect() to 'registered' before a connection fails")
    ap.add_argument("--open-timeout", type=float, default=900.0,
                    help="bound on the time to open all connections (s)")
    ap.add_argument("--json", metavar="PATH",
                    help="results file (default bench/results/<UTC>-capacity.json)")
    ap.add_argument("--log-dir", metavar="DIR")
    ap.add_argument("--volli-ref", metavar="REF",
                    help="run the Volli server as committed at this git ref (exported with "
                         "git archive into the log directory) instead of the working tree")
    args = ap.parse_args(argv)
    if args.quick and "--connections" not in " ".join(argv or sys.argv):
        args.connections = 5_000
    if args.connections < 1 or args.workers < 1 or args.concurrency < 1:
        ap.error("--connections, --workers and --concurrency must be at least 1")
    n = args.connections
    procs = args.procs or max(2, math.ceil(n / FDS_PER_CLIENT))
    nsources = args.sources or max(procs, math.ceil(n / PORTS_PER_SOURCE))
    max_conn = args.max_connections or n
    os.chdir(ROOT)

    # File descriptors: the servers started below inherit this process's limit.
    per_worker_need = max_conn + 300
    soft = rawws.raise_nofile(max(per_worker_need, n // procs + 500, 65536))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    notes: list[str] = []
    expected_per_worker = math.ceil(n / args.workers)
    if soft < expected_per_worker + 100:
        notes.append(
            f"RLIMIT_NOFILE is {soft} (hard {hard}) and could not be raised (no "
            f"CAP_SYS_RESOURCE here, or fs.nr_open): each gunicorn worker inherits it, so "
            f"one worker can hold at most about {soft - 100} WebSockets, and "
            f"{n:,} connections over {args.workers} worker(s) need at least "
            f"{expected_per_worker:,} per worker. Expect the run to stop short; "
            f"--workers {math.ceil(n / (soft - 2000))} or more would fit under this limit.")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-capacity-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.json) if args.json else machine.default_result_path("capacity")
    volli_commit = None
    tree_before = None if args.volli_ref else machine.server_tree_state()
    if tree_before and tree_before["dirty"]:
        notes.append(f"Volli ran from the working tree with uncommitted changes "
                     f"({', '.join(tree_before['dirty'][:5])}); use --volli-ref HEAD to "
                     f"measure a commit")
    tree = log_dir / "volli-tree" if args.volli_ref else ROOT
    if args.volli_ref:
        volli_commit = machine.export_tree(args.volli_ref, tree)
        print(f"Volli server code: {args.volli_ref} = {volli_commit} (exported to {tree})",
              flush=True)
    # VOLLI_MAX_CONNECTIONS is slots - 100 (gunicorn.conf.py adds the 100 back).
    config = ServerConfig(tree=tree, slots=max_conn + 100)
    sources = rawws.source_addresses(nsources)
    print(f"capacity: {n:,} connections, {args.workers} worker(s), {procs} client process(es)"
          f" x {args.concurrency} handshakes in flight, sources {sources[0]}..{sources[-1]}, "
          f"RLIMIT_NOFILE {soft}/{hard}, logs in {log_dir}", flush=True)
    for note in notes:
        print(f"NOTE: {note}", flush=True)

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)

    phases: dict[str, tuple[float, float]] = {}
    result: dict[str, Any] = {"kind": "capacity", **machine.describe(),
                              "args": vars(args), "client_processes": procs,
                              "volli_tree": str(config.tree),
                              "volli_commit": volli_commit or "working tree",
                              "source_addresses": sources, "notes": notes}
    redis = RedisServer(log_dir)
    server: Server | None = None
    clients: list[tuple[mp.Process, Any]] = []
    poller: HealthPoller | None = None
    interrupted = False
    failure: str | None = None
    started = time.monotonic()
    try:
        print(f"[redis] {redis.command_line()}", flush=True)
        redis.start()
        server = Server("redis-2w", log_dir, config, redis, name="capacity",
                        workers=args.workers, prefix="capacity")
        print(f"[volli] VOLLI_MAX_CONNECTIONS={max_conn} {server.command_line()} "
              f"(port {server.port})", flush=True)
        server.start(deadline=60)
        result["server"] = {"command": server.command_line(), "workers": server.workers,
                            "env": {k: v for k, v in sorted(server.env.items())
                                    if k.startswith("VOLLI_") or k == "WEB_CONCURRENCY"},
                            "worker_nofile": {str(w): nofile_of(w) for w in server.workers},
                            "log": str(server.log_path)}
        before = worker_snapshot(server)
        redis_rss0 = proc_rss_kb(redis.pid)
        poller = HealthPoller(server.port, args.health_interval,
                              args.open_timeout + args.hold + 300)
        poller.start()
        ctx = mp.get_context("spawn")
        ids = [f"cap-{i}" for i in range(n)]
        per = [ids[i::procs] for i in range(procs)]
        src_per = [sources[i::procs] or sources for i in range(procs)]
        url = server.url
        t_open0 = time.monotonic()
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, daemon=True, name=f"capacity-client-{i}",
                            args=(child, i, url, per[i], src_per[i], args.concurrency,
                                  args.open_timeout, args.open_timeout + args.hold + 120,
                                  max(1, args.max_failures // procs), args.handshake_timeout))
            p.start()
            clients.append((p, parent))
        progress = {i: (0, 0) for i in range(procs)}
        opened: dict[int, dict[str, Any]] = {}
        last_print = time.monotonic()
        end = t_open0 + args.open_timeout + 60
        while len(opened) < procs and time.monotonic() < end:
            for i, (p, c) in enumerate(clients):
                while i not in opened and c.poll(0):
                    msg = c.recv()
                    if msg[0] == "progress":
                        progress[i] = (msg[2], msg[3])
                    elif msg[0] == "opened":
                        opened[i] = msg[2]
                        progress[i] = (msg[2]["opened"], msg[2]["failed"])
                    elif msg[0] == "failed":
                        raise RuntimeError(f"client process {i} failed: {msg[2]}")
                if i not in opened and not p.is_alive():
                    raise RuntimeError(f"client process {i} died (exit {p.exitcode})")
            if time.monotonic() - last_print >= 5:
                snap = worker_snapshot(server)
                h = poller.summary()
                print(f"  t={time.monotonic() - t_open0:5.0f}s registered "
                      f"{sum(v[0] for v in progress.values()):,} failed "
                      f"{sum(v[1] for v in progress.values()):,}; workers " +
                      ", ".join(f"{w}: {s['rss_kb'] / 1024:.0f} MB {s['fds']} fds"
                                for w, s in snap.items()) +
                      f"; /health max {h['max_ms'] or 0:.0f} ms, failures {h['failures']}",
                      flush=True)
                last_print = time.monotonic()
            time.sleep(0.1)
        if len(opened) < procs:
            raise RuntimeError(f"client processes {sorted(set(range(procs)) - set(opened))} "
                               f"did not finish opening in time")
        server_gone(server)
        t_open1 = max(o["t_end"] for o in opened.values())
        t_hold0 = time.monotonic()
        t_open_start = min(o["t_start"] for o in opened.values())
        registered = sum(o["opened"] for o in opened.values())
        failed = sum(o["failed"] for o in opened.values())
        reasons: dict[str, int] = {}
        for o in opened.values():
            for why, k in o["failures"].items():
                reasons[why] = reasons.get(why, 0) + k
        after_open = worker_snapshot(server)
        print(f"opened: {registered:,} registered, {failed:,} failed in "
              f"{t_open1 - t_open_start:.1f}s" +
              (f"; failures: {reasons}" if reasons else ""), flush=True)
        # Hold, idle (the clients answer pings), /health still polled.
        time.sleep(args.hold / 2)
        online = None
        with contextlib.suppress(Exception):
            online = server.health()
        time.sleep(args.hold / 2)
        server_gone(server)
        held = worker_snapshot(server)
        redis_rss1 = proc_rss_kb(redis.pid)
        kids = sorted(proc_children(server.proc.pid))
        t_close0 = time.monotonic()
        for p, c in clients:
            c.send(("close",))
        closed: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + 120
        while len(closed) < procs and time.monotonic() < end:
            for i, (p, c) in enumerate(clients):
                if i not in closed and c.poll(0):
                    msg = c.recv()
                    if msg[0] == "closed":
                        closed[i] = msg[2]
                    elif msg[0] == "failed":
                        closed[i] = {"failure": msg[2]}
            time.sleep(0.05)
        t_closed = time.monotonic()
        phases = {"open": (t_open0, t_hold0), "hold": (t_hold0, t_close0),
                  "close": (t_close0, t_closed)}
        time.sleep(1.0)
        after_close = worker_snapshot(server)
        dropped: dict[str, int] = {}
        for cl in closed.values():
            for why, k in (cl.get("held") or {}).get("dropped", {}).items():
                dropped[why] = dropped.get(why, 0) + k
        rss_before = sum(s["rss_kb"] for s in before.values())
        rss_held = sum(s["rss_kb"] for s in held.values())
        cpu_open = sum(after_open[w]["cpu_s"] - before[w]["cpu_s"] for w in before
                       if w in after_open)
        client_cpu_open = sum(o["cpu_s"] for o in opened.values())
        result.update({
            "connections_asked": n,
            "registered": registered,
            "failed": failed,
            "failure_reasons": reasons,
            "open_seconds": t_open1 - t_open_start,
            "connections_per_s": registered / (t_open1 - t_open_start)
            if t_open1 > t_open_start else None,
            "handshake_p50_ms": max((o["handshake_p50_ms"] or 0) for o in opened.values()),
            "handshake_p99_ms": max((o["handshake_p99_ms"] or 0) for o in opened.values()),
            "server_cpu_open_s": cpu_open,
            "server_cpu_ms_per_conn": cpu_open / registered * 1e3 if registered else None,
            "client_cpu_open_s": client_cpu_open,
            "client_cpu_per_process_open_s": [o["cpu_s"] for o in opened.values()],
            "client_util_open_cores": client_cpu_open / (t_open1 - t_open_start)
            if t_open1 > t_open_start else None,
            "health_online_during_hold": online,
            "dropped_during_hold": dropped,
            "still_open_at_close": sum((cl.get("held") or {}).get("open_now", 0)
                                       for cl in closed.values()),
            "workers_before": before, "workers_after_open": after_open,
            "workers_held": held, "workers_after_close": after_close,
            "workers_changed": kids != sorted(server.workers),
            "rss_total_before_mb": rss_before / 1024,
            "rss_total_held_mb": rss_held / 1024,
            "rss_per_worker_held_mb": {w: s["rss_kb"] / 1024 for w, s in held.items()},
            "rss_kb_per_conn": (rss_held - rss_before) / registered if registered else None,
            "redis_rss_mb": [redis_rss0 / 1024, redis_rss1 / 1024],
            "close_seconds": t_closed - t_open1 - args.hold,
            "closed": closed,
        })
    except KeyboardInterrupt:
        interrupted = True
        failure = "interrupted"
        print("interrupted", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - report and clean up
        failure = f"{type(exc).__name__}: {exc}"
        print(f"FAILED: {failure}", file=sys.stderr, flush=True)
    finally:
        if poller is not None:
            poller.stop_event.set()
            poller.join(timeout=10)
        for p, c in clients:
            with contextlib.suppress(Exception):
                c.send(("close",))
        for p, _ in clients:
            stop_process(p, grace=30)
        if server is not None:
            server.stop()
        redis.stop()
    result["failure"] = failure
    result["elapsed_seconds"] = time.monotonic() - started
    if tree_before:
        tree_after = machine.server_tree_state()
        result["volli_tree_before"], result["volli_tree_after"] = tree_before, tree_after
        if tree_after["digest"] != tree_before["digest"]:
            result["notes"].append("Volli's files in the working tree changed during the run")
    if poller is not None:
        result["health"] = poller.summary(phases)
    if server is not None:
        text = server.log()
        result["registered_per_worker_from_log"] = registered_per_worker(text)
        result["log_findings"] = scan_capacity_log(text)
        result["log_findings_relay"] = {k: v for k, v in scan_log(text, args.workers).items()
                                        if k != "close codes (volli log)"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str))
    print_report(result)
    print(f"results written to {out_path}")
    if interrupted:
        return 130
    return 0 if not failure and result.get("failed") == 0 and \
        result.get("registered") == n else 1


def print_report(r: dict[str, Any]) -> None:
    print()
    n = r["args"]["connections"]
    rows = [
        ("connections asked", f"{n:,}"),
        ("registered", f"{r.get('registered', 0):,}"),
        ("failed", f"{r.get('failed', 'n/a')}" + (f" {r.get('failure_reasons')}"
                                                  if r.get("failure_reasons") else "")),
        ("time to open all (s)", _f(r.get("open_seconds"), ".1f")),
        ("connections/s", _f(r.get("connections_per_s"), ",.0f")),
        ("handshake p50 / p99 (ms, worst client process)",
         f"{_f(r.get('handshake_p50_ms'), '.0f')} / {_f(r.get('handshake_p99_ms'), '.0f')}"),
        ("server CPU per connection (ms, workers, open phase)",
         _f(r.get("server_cpu_ms_per_conn"), ".2f")),
        ("client CPU, open phase (s, all processes; cores)",
         f"{_f(r.get('client_cpu_open_s'), '.1f')}; "
         f"{_f(r.get('client_util_open_cores'), '.2f')}"),
        ("server RSS per worker, held (MB)",
         ", ".join(f"{w}: {v:.0f}" for w, v in (r.get("rss_per_worker_held_mb") or {}).items())
         or "n/a"),
        ("open fds per worker, held",
         ", ".join(f"{w}: {s['fds']}" for w, s in (r.get("workers_held") or {}).items())
         or "n/a"),
        ("worker RLIMIT_NOFILE (soft/hard)",
         ", ".join(f"{v}" for v in ((r.get("server") or {}).get("worker_nofile") or {}).values())
         or "n/a"),
        ("registered per worker (server log)", str(r.get("registered_per_worker_from_log"))),
        ("server RSS total before -> held (MB)",
         f"{_f(r.get('rss_total_before_mb'), '.0f')} -> {_f(r.get('rss_total_held_mb'), '.0f')}"),
        ("RSS per connection (kB)", _f(r.get("rss_kb_per_conn"), ".1f")),
        ("redis-server RSS before -> held (MB)",
         " -> ".join(f"{v:.0f}" for v in r.get("redis_rss_mb") or []) or "n/a"),
        ("dropped by the server during the hold", str(r.get("dropped_during_hold") or 0)),
        ("/health polls, failures", f"{(r.get('health') or {}).get('polls')}, "
                                    f"{(r.get('health') or {}).get('failures')}"),
        ("/health latency max / p99 / p50 (ms)",
         f"{_f((r.get('health') or {}).get('max_ms'), '.0f')} / "
         f"{_f((r.get('health') or {}).get('p99_ms'), '.0f')} / "
         f"{_f((r.get('health') or {}).get('p50_ms'), '.1f')}"),
    ]
    print("| figure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    h = r.get("health") or {}
    for name, ph in (h.get("phases") or {}).items():
        print(f"/health while {name}: {ph['polls']} polls, {ph['failures']} failed, max "
              f"{_f(ph['max_ms'], '.0f')} ms, p50 {_f(ph['p50_ms'], '.1f')} ms")
    if h.get("failure_samples"):
        print("/health failures, e.g.: " + "; ".join(h["failure_samples"]))
    for label, f in (r.get("log_findings") or {}).items():
        print(f"server log: {label} x{f['count']}, first:\n    " +
              f["first"].replace("\n", "\n    "))
    for note in r.get("notes") or []:
        print(f"NOTE: {note}")
    if r.get("failure"):
        print(f"FAILED: {r['failure']}")


def _f(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
