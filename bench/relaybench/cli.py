"""The command line of the relay bench (bench/relay.py): options, open-file limits, and
main(), which starts the load generators and the Redis, runs the rounds and reports."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine
import rawws

from . import __doc__ as package_doc
from .clients import CROSS_EXTRA
from .report import findings, main_values, print_redis_section, redis_table, table
from .runs import Loadgens, run_rounds
from .servers import (PEERJS_DIR, PEERJS_PKG, PEERJS_VERSION, REDIS_KINDS, ROOT, SCENARIOS,
                      ServerConfig, ensure_peerjs, start_redis)


def add_relay_options(ap: argparse.ArgumentParser) -> None:
    """The options of the relay phases (run_relay and its client processes); refcompare.py
    takes them too."""
    ap.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="throughput measurement window (s)")
    ap.add_argument("--latency-duration", type=float, default=8.0,
                    help="latency measurement window (s)")
    ap.add_argument("--warmup", type=float, default=1.5,
                    help="seconds of load before each measurement window")
    ap.add_argument("--window", type=int, default=16,
                    help="offers in flight per pair in the throughput run")
    ap.add_argument("--rate", type=float, default=5000.0,
                    help="total offered rate in the latency run (msg/s)")
    ap.add_argument("--max-messages", type=int, default=2_000_000,
                    help="cap on offers per sender (throughput) / per process (latency)")
    ap.add_argument("--sdp-size", type=int, default=1500, help="characters of SDP per offer")
    ap.add_argument("--procs", type=int, default=1, help="client processes")
    ap.add_argument("--connect-concurrency", type=int, default=50,
                    help="handshakes in flight per client process")
    ap.add_argument("--drain-grace", type=float, default=5.0,
                    help="seconds after a run to wait for in-flight messages")


def check_relay_options(ap: argparse.ArgumentParser, args) -> None:
    """Refuse values the relay phases (and --rounds) cannot run with."""
    for name in ("pairs", "procs", "window", "max_messages", "connect_concurrency", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.procs > args.pairs:
        ap.error("--procs must not exceed --pairs")
    if min(args.duration, args.latency_duration, args.rate) <= 0:
        ap.error("durations and --rate must be positive")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace,
                                                 list[str]]:
    """(the parser, for later errors; the checked options; notes for the run)."""
    ap = argparse.ArgumentParser(description=package_doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_relay_options(ap)
    ap.add_argument("--idle", default="5000,20000",
                    help="K1,K2,...: the connections phase opens K1 registered connections "
                         "as fast as it can (connections/s, server CPU per connection), reads "
                         "the RSS (memory per idle connection at K1), then the same up to K2; "
                         "0 = skip. K is capped below the open-file limit (see README)")
    ap.add_argument("--conn-procs", type=int, default=2,
                    help="lean client processes (bench/rawws.py) for the connections phase")
    ap.add_argument("--conn-concurrency", type=int, default=100,
                    help="handshakes in flight per lean client process")
    ap.add_argument("--handshake-timeout", type=float, default=20.0,
                    help="seconds from connect() to registered before a connection fails")
    ap.add_argument("--conn-open-timeout", type=float, default=300.0,
                    help="bound on the time to open one step of the connections phase (s)")
    ap.add_argument("--max-failures", type=int, default=500,
                    help="per lean client process: stop opening after this many failures")
    ap.add_argument("--throughput-client", choices=["lean", "websockets"], default="lean",
                    help="load generator of the throughput run: the lean epoll client "
                         "(bench/rawws.py) or python-websockets (the latency run always uses "
                         "python-websockets)")
    ap.add_argument("--rtt-count", type=int, default=5000,
                    help="sequential round trips of one pair (0 = skip)")
    ap.add_argument("--rtt-limit", type=float, default=60.0,
                    help="bound on the round-trip run's time (s)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait before reading RSS")
    ap.add_argument("--deflate", action="store_true",
                    help="clients offer permessage-deflate (and Volli accepts it)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds; the order alternates (V,B then B,V) and the table shows "
                         "medians")
    ap.add_argument("--only", choices=["volli", "baseline", "peerjs"],
                    help="run one of volli/baseline/peerjs only (--redis still adds its "
                         "servers)")
    ap.add_argument("--no-peerjs", action="store_true",
                    help=f"leave out peerjs-server (otherwise npm peer@{PEERJS_VERSION} is "
                         f"installed into bench/.peerjs/ if it is not there, and run)")
    ap.add_argument("--redis", action="store_true", default=True,
                    help="run Volli with the Redis backend too (the default; private "
                         "redis-server): one worker, and two workers with every pair "
                         "cross-worker; in the main table and against the single-worker "
                         "memory Volli in a second table")
    ap.add_argument("--redis-kinds", default=",".join(REDIS_KINDS),
                    help="which Redis the Redis servers use: single (one redis-server: "
                         "redis-1w, redis-2w), cluster (a 3-primary Redis Cluster: "
                         "cluster-2w), or both, comma-separated; the Redis table gets a "
                         "column per server")
    ap.add_argument("--no-redis", dest="redis", action="store_false",
                    help="leave out the Redis servers")
    machine.add_run_options(ap, "relay")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 10 pairs, 1 s windows, 500 msg/s, K=100 "
                         "(options given explicitly still win)")
    if ap.parse_known_args(argv)[0].quick:  # new defaults; explicit options still win
        ap.set_defaults(pairs=10, duration=1.0, latency_duration=1.0, warmup=0.3, rate=1000.0,
                        idle="500,2000", settle=0.3, drain_grace=2.0, rtt_count=200,
                        rtt_limit=10.0)
    args = ap.parse_args(argv)
    try:
        args.idle_ks = sorted({int(k) for k in str(args.idle).split(",") if int(k) > 0})
    except ValueError:
        ap.error("--idle takes K1,K2,... (integers)")
    check_relay_options(ap, args)
    kinds = args.redis_kinds.split(",")
    if any(k not in REDIS_KINDS for k in kinds):
        ap.error(f"--redis-kinds takes some of {','.join(REDIS_KINDS)}, comma-separated")
    args.redis_kinds = [k for k in REDIS_KINDS if k in kinds]
    if args.redis and args.only in ("baseline", "peerjs"):
        args.redis = False  # the Redis section reports against the volli run
    if args.no_peerjs and args.only == "peerjs":
        ap.error("--only peerjs contradicts --no-peerjs")
    notes: list[str] = []
    if args.redis and not (shutil.which("redis-server") or os.path.exists(
            "/usr/bin/redis-server")):
        args.redis = False
        notes.append("redis-server is not on PATH: the Redis servers were left out")
    if args.redis and "cluster" in args.redis_kinds and not shutil.which("redis-cli"):
        args.redis_kinds.remove("cluster")  # `redis-cli --cluster create` builds it
        notes.append("redis-cli is not on PATH: the Redis Cluster server was left out")
        args.redis = bool(args.redis_kinds)
    return ap, args, notes


def open_files(ap: argparse.ArgumentParser, args, notes: list[str]) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for the servers to inherit, cap K below it when it cannot be
    raised; returns (slots, nofile) for ServerConfig."""
    k_max = args.idle_ks[-1] if args.idle_ks else 0
    # Every server process inherits this process's RLIMIT_NOFILE; as root the hard limit can
    # usually be raised (not where CAP_SYS_RESOURCE is missing, e.g. in some containers).
    soft = rawws.raise_nofile(max(65536, k_max + 2000))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if args.idle_ks and soft < k_max + 500:
        capped = (soft - 500) // 100 * 100
        notes.append(f"K={k_max:,} was capped to {capped:,}: RLIMIT_NOFILE is {soft} "
                     f"(hard {hard}) and could not be raised, and each server process "
                     f"holds one descriptor per connection")
        args.idle_ks = sorted({min(k, capped) for k in args.idle_ks})
        k_max = capped
    slots = max(20000, k_max + 1000)
    nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
    need = 2 * args.pairs * (1 + 2 * CROSS_EXTRA if args.redis else 1) + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        ap.error(f"open-file limit {soft} is below the {need} this run needs")
    return slots, nofile


def client_options(args) -> dict[str, Any]:
    """What the client processes read (they get it once, when they start)."""
    return {"deflate": args.deflate, "sdp_size": args.sdp_size, "window": args.window,
            "rate": args.rate, "procs": args.procs, "max_messages": args.max_messages,
            "connect_concurrency": args.connect_concurrency, "drain_grace": args.drain_grace,
            "conn_concurrency": args.conn_concurrency,
            "handshake_timeout": args.handshake_timeout,
            "open_timeout": args.conn_open_timeout, "max_failures": args.max_failures}


def servers_to_run(args) -> tuple[list[str], dict[str, Any]]:
    """(SCENARIOS names in the order of a round, what became of peerjs-server)."""
    names = [n for n in ("volli", "baseline", "peerjs") if not args.only or n == args.only]
    peerjs_info: dict[str, Any] = {}
    if "peerjs" in names and args.no_peerjs:  # (--only volli --no-peerjs is fine)
        names.remove("peerjs")
    elif "peerjs" in names:
        try:
            peerjs_info = {"package": f"peer@{PEERJS_VERSION}", "dir": str(PEERJS_DIR),
                           "node": ensure_peerjs()}
            print(f"[peerjs] using npm peer@{PEERJS_VERSION} from {PEERJS_DIR} "
                  f"(node {peerjs_info['node']})", flush=True)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            peerjs_info = {"failure": str(exc)}
            names.remove("peerjs")
            print(f"[peerjs] SKIPPED, could not install or run it: {exc}", file=sys.stderr,
                  flush=True)
    if args.redis:
        names += [n for n, spec in SCENARIOS.items() if spec["redis"] in args.redis_kinds]
    return names, peerjs_info


def main(argv: list[str] | None = None) -> int:
    ap, args, notes = parse_args(argv)
    os.chdir(ROOT)
    slots, nofile = open_files(ap, args, notes)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tree, volli_commit, tree_before = machine.server_code(args.volli_ref, log_dir, notes)
    config = ServerConfig(tree=tree or ROOT, slots=slots, nofile=nofile, deflate=args.deflate)
    for note in notes:
        print(f"NOTE: {note}", flush=True)
    started = time.monotonic()
    print(f"relay bench: {args.pairs} pairs, {args.procs} client process(es), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, logs in {log_dir}",
          flush=True)
    # SIGTERM (and ^C) unwind through the finally blocks that stop servers and clients.
    machine.interrupt_on_signals()
    loadgens = Loadgens(args, client_options(args))
    names, peerjs_info = servers_to_run(args)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    redis: dict[str, Any] = {}  # kind -> its running Redis
    interrupted = False
    try:
        for kind in sorted({SCENARIOS[n]["redis"] for n in names} - {None}):
            redis[kind] = start_redis(kind, log_dir)
        run_rounds(results, loadgens, args, log_dir, config, redis)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", file=sys.stderr)
    except RuntimeError as exc:  # a Redis did not start
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        loadgens.stop()
        for server in redis.values():
            server.stop()
    elapsed = time.monotonic() - started

    print()
    print(table(results, args))
    print()
    if args.redis:
        print_redis_section(results, args)
    problems: list[str] = []
    tree_after = None if args.volli_ref else machine.server_tree_state()
    if tree_before and tree_after and tree_after["digest"] != tree_before["digest"]:
        problems.append(f"Volli's files in the working tree changed during the run (now "
                        f"uncommitted: {', '.join(tree_after['dirty'][:5]) or 'none'}): "
                        f"servers started at different times ran different code; use "
                        f"--volli-ref to pin one commit")
    if peerjs_info.get("failure"):
        problems.append(f"peerjs: not run: {peerjs_info['failure']}")
    found, noise = findings(results, args)
    problems += found
    machine.print_report(noise, problems, elapsed, log_dir)
    machine.save_results(args, "relay", lambda: {
        **machine.describe(PEERJS_PKG), "volli_ref": args.volli_ref,
        "volli_commit": volli_commit or "working tree", "volli_tree_before": tree_before,
        "volli_tree_after": tree_after, "args": vars(args), "elapsed_seconds": elapsed,
        "notes": notes, "peerjs": peerjs_info, "figures": main_values(results, args),
        "redis": {kind: server.command_line() for kind, server in redis.items()},
        "table_markdown": table(results, args),
        "redis_table_markdown": redis_table(results, args) if args.redis else None,
        "results": results, "problems": problems, "noise": noise})
    if interrupted:
        return 130
    return 1 if peerjs_info.get("failure") or any(
        r.get("failure") for rs in results.values() for r in rs) else 0
