#!/usr/bin/env python
"""Drain bench: how long does a SIGTERM take to close every client, with Redis up or down?

Run from the repo root:  python bench/drain.py                        (10,000 connections, all modes)
                         python bench/drain.py --mode paused --connections 2000
                         python bench/drain.py --volli-ref 238f7aa    (an old commit)

For each mode it starts a private redis-server (tests/conftest.py's RedisServer: no
persistence, DEBUG SLEEP allowed from loopback) and Volli (gunicorn, one gevent worker,
relaybench's Server: permissive rate limits, no per-IP limits) with that Redis on free
127.0.0.1 ports, from the working tree or from a commit exported with --volli-ref, then:

1. opens --connections (10,000) lean registered connections (bench/rawws.py, unsigned,
   --concurrency handshakes in flight, from --sources 127.x source addresses);
2. makes Redis unreachable: `up` leaves it, `stopped` stops redis-server, `paused` sends
   DEBUG SLEEP --pause-seconds (60) so it accepts connections and answers nothing;
3. sends SIGTERM to the gunicorn master and, bounded by --limit (60 s), records when each
   client's connection ended and with which close code (a close frame's, or none), and
   when the gunicorn process exited.

Reports per mode: clients that got 1001, other endings, the time until every client got
its 1001 close frame (p50 and last), the time until the process exited, its exit code and
the worker's "drained:" log line; writes JSON to bench/results/<UTC>-drain.json. The
contract (issue 12): every client gets 1001 and the process exits well within gunicorn's
graceful_timeout (30 s) in every mode. Servers are stopped (SIGTERM, then SIGKILL, on
their process group) and redis-servers killed on exit, error and ^C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

import machine  # noqa: E402
import rawws  # noqa: E402
from conftest import RedisServer  # noqa: E402  (the tests' one: restart, DEBUG SLEEP)
from relaybench.servers import ROOT, Server, ServerConfig  # noqa: E402

MODES = ("up", "stopped", "paused")
GRACEFUL_TIMEOUT = 30.0  # gunicorn.conf.py


def pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * (len(values) - 1)))] if values else None


def run_mode(mode: str, args, log_dir: Path, config: ServerConfig) -> dict[str, Any]:
    redis: RedisServer | None = None
    server: Server | None = None
    result: dict[str, Any] = {"mode": mode, "connections": args.connections}
    try:
        redis = RedisServer(log_dir)  # started
        server = Server("redis-1w", log_dir, config, redis, name=f"drain-{mode}",
                        prefix="drain")
        result["command"] = server.command_line()
        result["env"] = {k: v for k, v in sorted(server.env.items())
                         if k.startswith("VOLLI_") or k == "WEB_CONCURRENCY"}
        result["log"] = str(server.log_path)
        print(f"[{mode}] starting: {server.command_line()} (port {server.port})", flush=True)
        server.start()
        pool = rawws.DrainPool(rawws.Target("volli", server.url, "ZHJhaW4="),
                               rawws.source_addresses(args.sources), args.concurrency, 30)
        ids = [f"drain{server.port}-{i}" for i in range(args.connections)]
        opened = pool.open(ids, time.monotonic() + args.open_limit)
        result["open"] = {**opened, "failures": dict(pool.failures)}
        online = server.health().get("online")
        print(f"[{mode}] {opened['opened']:,}/{args.connections:,} registered in "
              f"{opened['seconds']:.1f}s; /health online={online}", flush=True)
        if mode == "stopped":
            redis.stop()
        elif mode == "paused":
            redis.pause(args.pause_seconds)
        time.sleep(args.settle)
        term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        exited = None
        while time.monotonic() - term < args.limit:
            pool._poll(0.02)
            if exited is None and server.proc.poll() is not None:
                exited = time.monotonic() - term
            if not pool.conns and exited is not None:
                break
        still_open = len(pool.conns)
        pool.close_all(time.monotonic() + 2)
        codes: dict[str, int] = {}
        for _, code in pool.ended:
            codes[str(code)] = codes.get(str(code), 0) + 1
        closes = sorted(t - term for t, code in pool.ended if code == 1001)
        ends = sorted(t - term for t, _ in pool.ended)
        drained = re.findall(r"drained: .*", server.log())
        result.update({
            "registered": opened["opened"], "got_1001": len(closes), "codes": codes,
            "still_open_at_limit": still_open,
            "all_1001_s": closes[-1] if closes and len(closes) == opened["opened"] else None,
            "p50_1001_s": pct(closes, 0.5), "last_1001_s": closes[-1] if closes else None,
            "last_end_s": ends[-1] if ends else None,
            "exit_s": exited, "exit_code": server.proc.returncode,
            "drained_log": drained[-1] if drained else None,
            # gunicorn ends a drain that outlasts graceful_timeout by killing the worker.
            "worker_killed": exited is None or exited >= GRACEFUL_TIMEOUT - 1
            or "SIGKILL" in server.log() or "WORKER TIMEOUT" in server.log(),
            "tracebacks": server.log().count("Traceback"),
        })
    except Exception as exc:  # noqa: BLE001 - recorded, reported under PROBLEMS
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{mode}] FAILED: {result['failure']}", flush=True)
    finally:
        if server is not None:
            server.stop()
        if redis is not None and redis.proc is not None and redis.proc.poll() is None:
            redis.proc.kill()  # a paused redis-server would hold SIGTERM for the whole sleep
            redis.proc.wait(timeout=10)
    return result


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| Redis | connections | got 1001 | other endings | p50 1001 (s) | all got 1001 "
            "(s) | process exit (s) | exit code |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.get("failure"):
            rows.append(f"| {r['mode']} | {r['connections']:,} | run failed: {r['failure']} "
                        "| | | | | |")
            continue
        other = {c: n for c, n in r["codes"].items() if c != "1001"}
        if r["still_open_at_limit"]:
            other["open at the limit"] = r["still_open_at_limit"]
        rows.append(f"| {r['mode']} | {r['registered']:,} | {r['got_1001']:,} | "
                    f"{', '.join(f'{n:,} × {c}' for c, n in other.items()) or '–'} | "
                    f"{seconds(r['p50_1001_s'])} | {seconds(r['all_1001_s'])} | "
                    f"{seconds(r['exit_s'])} | {r['exit_code']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10000,
                    help="registered connections to drain (one worker)")
    ap.add_argument("--mode", choices=(*MODES, "all"), default="all",
                    help="Redis up, stopped or paused (DEBUG SLEEP) during the drain")
    ap.add_argument("--pause-seconds", type=float, default=60.0,
                    help="DEBUG SLEEP length in the paused mode")
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    ap.add_argument("--sources", type=int, default=4, help="127.x source addresses")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds between cutting Redis off and the SIGTERM")
    ap.add_argument("--open-limit", type=float, default=120.0,
                    help="bound on opening the connections (s)")
    ap.add_argument("--limit", type=float, default=60.0,
                    help="bound on waiting for the drain and the exit (s)")
    machine.add_run_options(ap, "drain")
    args = ap.parse_args(argv)
    if args.connections < 1:
        ap.error("--connections must be at least 1")
    os.chdir(ROOT)
    soft = rawws.raise_nofile(args.connections + 1000)
    notes: list[str] = []
    if soft < args.connections + 300:
        notes.append(f"RLIMIT_NOFILE is {soft}: {args.connections:,} connections may not fit "
                     "in the client or the server")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-drain-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tree, volli_commit, tree_before = machine.server_code(args.volli_ref, log_dir, notes)
    config = ServerConfig(tree=tree or ROOT,
                          nofile=soft if soft != resource.RLIM_INFINITY else 1 << 20)
    for note in notes:
        print(f"NOTE: {note}", flush=True)

    machine.interrupt_on_signals()
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for mode in (MODES if args.mode == "all" else (args.mode,)):
            results.append(run_mode(mode, args, log_dir, config))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", file=sys.stderr)
    elapsed = time.monotonic() - started

    problems: list[str] = []
    for r in results:
        if r.get("failure"):
            problems.append(f"{r['mode']}: run failed: {r['failure']}")
            continue
        if r["registered"] < args.connections:
            problems.append(f"{r['mode']}: only {r['registered']:,} of {args.connections:,} "
                            f"registered: {r['open']['failures']}")
        if r["got_1001"] < r["registered"]:
            problems.append(f"{r['mode']}: {r['registered'] - r['got_1001']:,} clients got no "
                            f"1001 close frame (endings {r['codes']})")
        if r["exit_s"] is None or r["exit_s"] > GRACEFUL_TIMEOUT / 2:
            problems.append(f"{r['mode']}: the process exited after {seconds(r['exit_s'])} s "
                            f"(graceful_timeout {GRACEFUL_TIMEOUT:.0f} s)")
        if r["worker_killed"]:
            problems.append(f"{r['mode']}: the drain outlasted gunicorn's graceful_timeout: "
                            "the worker was killed")
    md = table(results)
    print()
    print(f"Volli {args.volli_ref or 'working tree'}"
          f"{' = ' + volli_commit[:12] if volli_commit else ''}: SIGTERM to one worker "
          f"holding {args.connections:,} registered connections, Redis backend")
    print()
    print(md)
    for r in results:
        if r.get("drained_log"):
            print(f"- {r['mode']}: {r['drained_log']}")
    machine.print_report([], problems, elapsed, log_dir)
    machine.save_results(args, "drain", lambda: {
        **machine.describe(), "volli_ref": args.volli_ref,
        "volli_commit": volli_commit or "working tree", "volli_tree_before": tree_before,
        "args": vars(args), "elapsed_seconds": elapsed, "notes": notes,
        "table_markdown": md, "results": results, "problems": problems})
    if interrupted:
        return 130
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
