"""The measured phases, driven from the parent: throughput and paced latency (also across
two workers with Redis), round trips, and connections (connections/s and idle memory);
then one round against one server, and the rounds of a run."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import rawws

from .aioclient import client_main
from .clients import CROSS_EXTRA, CROSS_STEPS, Clients, percentile, sleep_until, split
from .leanclient import raw_client_main
from .procfs import machine_cpu, other_cpu, other_cpu_delta
from .report import bottleneck, flatten_connections
from .servers import SCENARIOS, AnyRedis, Server, ServerConfig, make_server, scan_log

PHASE_SLACK = 30.0  # extra seconds the parent waits on a client process beyond a phase's plan


def place_cross_pairs(server: Server, clients: Clients, per_proc: list[int]) -> dict[str, Any]:
    """Have each client process register connections until it holds ``n`` on each of the
    two workers (read from the server log), then pair every sender with a receiver on the
    other worker, half of the pairs in each direction. Bounded: CROSS_STEPS rounds and
    CROSS_EXTRA x 2n extra connections per process."""
    w_a, w_b = server.workers
    nprocs = len(clients.conns)
    held: list[list[str]] = [[] for _ in range(nprocs)]
    want = [2 * n for n in per_proc]
    budget = [CROSS_EXTRA * 2 * n for n in per_proc]
    where: dict[str, int] = {}
    history: list[list[str]] = [[] for _ in range(nprocs)]  # per step: "+k -> a/b"
    for _ in range(CROSS_STEPS):
        asking = [i for i in range(nprocs) if want[i] > 0]
        if not asking:
            break
        for i in asking:
            clients.conns[i].send(("open", want[i]))
        new: list[str] = []
        for i in asking:
            ids = clients.recv(i, "opened", 120)
            held[i] += ids
            new += ids
        where.update(server.wait_registered(new, 15))
        for i, n in enumerate(per_proc):
            on_a = sum(1 for u in held[i] if where[u] == w_a)
            if want[i]:
                history[i].append(f"+{want[i]} -> {on_a}/{len(held[i]) - on_a}")
            minority = min(on_a, len(held[i]) - on_a)
            short = n - minority
            # The split is often uneven (and a small batch tends to land on one worker):
            # ask for what the split so far predicts, plus a quarter, at least 8.
            share = max(minority / len(held[i]), 0.05)
            guess = int(short / share * 1.25) + 1
            want[i] = min(max(guess, 8), budget[i]) if short > 0 else 0
            budget[i] -= want[i]
    strangers = {pid for pid in where.values() if pid not in (w_a, w_b)}
    chosen: list[list[tuple[str, str]]] = []
    for i, n in enumerate(per_proc):
        on_a = [u for u in held[i] if where[u] == w_a]
        on_b = [u for u in held[i] if where[u] == w_b]
        if strangers or min(len(on_a), len(on_b)) < n:
            # The caller restarts the client processes, which closes their connections.
            raise RuntimeError(
                f"could not place {n} cross-worker pairs in client process {i}: its "
                f"{len(held[i])} connections landed {len(on_a)} on worker {w_a} and "
                f"{len(on_b)} on worker {w_b}" +
                (f" (and on unknown pids {sorted(strangers)})" if strangers else "") +
                f"; steps (opened -> on {w_a}/{w_b}): {', '.join(history[i])}")
        half = (n + 1 - i % 2) // 2  # odd pair counts: alternate the extra one's direction
        chosen.append([(on_a[k], on_b[k]) for k in range(half)] +
                      [(on_b[k], on_a[k]) for k in range(half, n)])
    for c, pairs in zip(clients.conns, chosen):
        c.send(("pairs", pairs))
    opened = sum(len(h) for h in held)
    landed = {pid: sum(1 for pid2 in where.values() if pid2 == pid) for pid in (w_a, w_b)}
    for i, pairs in enumerate(chosen):  # by construction; checked once more
        assert all(where[snd] != where[rcv] for snd, rcv in pairs), i
    return {"opened": opened, "extra": opened - 2 * sum(per_proc), "landed": landed,
            "steps": history,
            "a_to_b": sum(1 for pairs in chosen for snd, _ in pairs if where[snd] == w_a),
            "b_to_a": sum(1 for pairs in chosen for snd, _ in pairs if where[snd] == w_b)}


def run_relay(server: Server, clients: Clients, kind: str, args, tag: str) -> dict[str, Any]:
    nprocs = len(clients.conns)
    per_proc = split(args.pairs, nprocs)
    cross = SCENARIOS[server.scenario]["cross"]
    for c, n in zip(clients.conns, per_proc):
        c.send((kind, server.target, tag, n, cross))
    placement = place_cross_pairs(server, clients, per_proc) if cross else None
    setup = clients.gather("ready", 120)
    if kind == "throughput":
        warm, dur = args.warmup, args.duration
    else:
        warm, dur = args.warmup, args.latency_duration
    t_start = time.monotonic() + 0.3
    t_a, t_b = t_start + warm, t_start + warm + dur
    clients.send_all(("go", t_start, t_a, t_b))
    redis = server.redis
    ours = {os.getpid(), server.proc.pid, *server.workers, *clients.pids()}
    if redis:
        ours.update(redis.pids)  # a cluster's every node
    try:
        sleep_until(t_a)
        cpu_a, mach_a, other_a = server.cpu_each(), machine_cpu(), other_cpu(ours)
        red_a = (redis.cpu_each(), redis.command_calls()) if redis else None
        sleep_until(t_b)
        cpu_b, mach_b, other_b = server.cpu_each(), machine_cpu(), other_cpu(ours)
        red_b = (redis.cpu_each(), redis.command_calls()) if redis else None
    except OSError:
        server.check_worker()  # raises, naming the change and with the log tail
        raise
    wall = t_b - t_a
    results = clients.gather("result", args.drain_grace + PHASE_SLACK)
    server.check_worker()
    samples = sorted(s for r in results for s in r["samples"])
    worker_cpu = [b - a for a, b in zip(cpu_a, cpu_b)]
    out = {
        "setup_seconds": max(setup),
        "window_seconds": wall,
        "workers": len(server.workers),
        "placement": placement,
        "sent": sum(r["sent"] for r in results),
        "received": sum(r["received"] for r in results),
        "in_window": sum(r["in_window"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "sender_errors": sum(r["sender_errors"] for r in results),
        "rejected": sum(r["rejected"] for r in results),
        "error_samples": [e for r in results for e in r["error_samples"]][:3],
        "unexpected": sum(r["unexpected"] for r in results),
        "bad_from": sum(r["bad_from"] for r in results),
        "connection_failures": [f for r in results for f in r["connection_failures"]][:5],
        "connection_failure_count": sum(r["connection_failure_count"] for r in results),
        "worker_cpu": worker_cpu,
        "server_cpu": sum(worker_cpu),
        # Per redis-server process (a cluster's nodes), and their sum.
        "redis_cpu_each": [b - a for a, b in zip(red_a[0], red_b[0])] if redis else None,
        "client_cpu": [r["client_cpu"] for r in results],
        "machine_busy_cores": (mach_b[0] - mach_a[0]) / wall,
        "machine_cores": (mach_b[1] - mach_a[1]) / wall,
    }
    # Offers sent and neither received nor answered with an error reply.
    out["lost"] = out["sent"] - out["received"] - out["rejected"]
    out["rate"] = out["in_window"] / wall
    out["worker_util"] = [c / wall for c in worker_cpu]
    out["server_util"] = out["server_cpu"] / wall
    out["client_util"] = [c / wall for c in out["client_cpu"]]
    out["client_util_sum"] = sum(out["client_util"])
    out["other_busy_cores"], out["other_top"] = other_cpu_delta(other_a, other_b, wall)
    out["redis_cpu"] = sum(out["redis_cpu_each"]) if redis else None
    out["total_cpu"] = out["server_cpu"] + (out["redis_cpu"] or 0.0)
    out["total_util"] = out["total_cpu"] / wall
    if redis:
        out["redis_util"] = out["redis_cpu"] / wall
        out["redis_util_each"] = [c / wall for c in out["redis_cpu_each"]]
        calls = {k: red_b[1].get(k, 0) - red_a[1].get(k, 0) for k in red_b[1]}
        out["redis_calls"] = {k: v for k, v in calls.items() if v}
        out["evalsha_per_msg"] = (calls.get("evalsha", 0) / out["in_window"]
                                  if out["in_window"] else float("nan"))
        # A cluster publishes to node channels with SPUBLISH (sharded pub/sub).
        out["publish_per_msg"] = ((calls.get("publish", 0) + calls.get("spublish", 0))
                                  / out["in_window"] if out["in_window"] else float("nan"))
    if kind == "latency":
        out.update({
            "offered_rate": args.rate,
            "samples": len(samples),
            "p50_ms": percentile(samples, 0.50) / 1e6,
            "p99_ms": percentile(samples, 0.99) / 1e6,
            "max_ms": (samples[-1] / 1e6) if samples else float("nan"),
            "pacer_lag_p99_ms": max(r["lag_p99"] for r in results) * 1e3,
            "pacer_lag_max_ms": max(r["lag_max"] for r in results) * 1e3,
        })
    # Per CPU-second of everything serving the relay: the workers, plus redis-server when
    # the server uses it (apart: per worker CPU-second). In the latency run every server
    # gets the same paced rate, so there the figure compares servers at equal load.
    out["msgs_per_cpu_s"] = (out["in_window"] / out["total_cpu"]
                             if out["total_cpu"] > 0 else float("nan"))
    out["msgs_per_worker_cpu_s"] = (out["in_window"] / out["server_cpu"]
                                    if out["server_cpu"] > 0 else float("nan"))
    out["bottleneck"], out["client_bound"] = bottleneck(out)
    return out


def run_connections(server: Server, raw: Clients, args, tag: str) -> dict[str, Any]:
    """Connections phase, with the lean client processes (bench/rawws.py): open K1 (e.g.
    5,000) registered connections as fast as --conn-concurrency handshakes in flight per
    process allow (connections per second, server CPU per connection), let them settle and
    read the server's RSS (memory per idle connection at K1); then the same up to K2 (e.g.
    20,000); then close all. The connections come from several source addresses."""
    ks = args.idle_ks
    nprocs = len(raw.conns)
    total = ks[-1]
    nsources = max(nprocs, math.ceil(total / 20_000))
    sources = rawws.source_addresses(nsources)
    steps_ids: list[list[list[str]]] = [[] for _ in range(nprocs)]
    prev = 0
    for k in ks:
        ids = [f"{tag}-c{i}" for i in range(prev, k)]
        for i in range(nprocs):
            steps_ids[i].append(ids[i::nprocs])
        prev = k
    for i, c in enumerate(raw.conns):
        c.send(("conns", server.target, steps_ids[i], sources[i::nprocs] or sources))
    ours = {os.getpid(), server.proc.pid, *server.workers, *raw.pids()}
    time.sleep(args.settle)
    rss0 = server.rss_kb()
    steps: list[dict[str, Any]] = []
    prev = 0
    try:
        for k in ks:
            cpu_a, other_a = server.cpu(), other_cpu(ours)
            mach_a = machine_cpu()
            raw.send_all(("go",))
            got = raw.gather("ready", args.conn_open_timeout + PHASE_SLACK)
            cpu_b, other_b = server.cpu(), other_cpu(ours)
            mach_b = machine_cpu()
            t0 = min(r["t_start"] for r in got)
            t1 = max(r["t_end"] for r in got)
            wall = max(t1 - t0, 1e-6)
            opened = sum(r["opened"] for r in got)
            failed = sum(r["failed"] for r in got)
            reasons: dict[str, int] = {}
            for r in got:
                for why, n in r["failures"].items():
                    reasons[why] = reasons.get(why, 0) + n
            time.sleep(args.settle)
            rss = server.rss_kb()
            online = None
            with contextlib.suppress(Exception):
                online = server.health().get("online")
            client_cpu = [r["client_cpu"] for r in got]
            step = {
                "k": k, "new": k - prev, "opened": opened, "failed": failed,
                "failure_reasons": reasons, "seconds": wall,
                "conn_per_s": opened / wall,
                "server_cpu": cpu_b - cpu_a,
                "server_util": (cpu_b - cpu_a) / wall,
                "server_cpu_ms_per_conn": (cpu_b - cpu_a) / opened * 1e3 if opened else None,
                "client_cpu": client_cpu, "client_util": [c / wall for c in client_cpu],
                "client_util_sum": sum(client_cpu) / wall,
                "machine_busy_cores": (mach_b[0] - mach_a[0]) / wall,
                "handshake_p50_ms": max((r["handshake_p50_ms"] or 0) for r in got),
                "handshake_p99_ms": max((r["handshake_p99_ms"] or 0) for r in got),
                "rss_kb": rss, "online_reported": online,
                "kb_per_conn": (rss - rss0) / k,
            }
            step["other_busy_cores"], step["other_top"] = other_cpu_delta(other_a, other_b,
                                                                          wall)
            steps.append(step)
            prev = k
            print(f"[{server.name}] connections: {opened:,} new in {wall:.1f}s = "
                  f"{step['conn_per_s']:,.0f}/s (server {step['server_util']:.0%} of a core, "
                  f"{step['server_cpu_ms_per_conn'] or 0:.2f} ms CPU/conn; clients "
                  f"{step['client_util_sum']:.0%}), {failed} failed; RSS "
                  f"{rss / 1024:.0f} MB at {k:,} = {step['kb_per_conn']:.1f} kB/conn"
                  + (f"; failures {reasons}" if reasons else ""), flush=True)
            if failed:
                break
    finally:
        raw.send_all(("close",))
        results = raw.gather("result", 120)
    time.sleep(args.settle)
    after_close = server.rss_kb()
    server.check_worker()
    dropped: dict[str, int] = {}
    for r in results:
        for why, n in r["held"]["dropped"].items():
            dropped[why] = dropped.get(why, 0) + n
    return {"ks": ks, "sources": sources, "rss_before_kb": rss0, "steps": steps,
            "rss_after_close_kb": after_close, "dropped": dropped,
            "forced_closes": sum(r["closed"]["forced"] for r in results),
            "close_seconds": max(r["closed"]["seconds"] for r in results)}


def run_rtt(server: Server, clients: Clients, args, tag: str) -> dict[str, Any]:
    """Round trips of one pair, from client process 0; server CPU over the same time."""
    cpu_a = server.cpu()
    t0 = time.monotonic()
    clients.conns[0].send(("rtt", server.target, tag, args.rtt_count, args.rtt_limit))
    r = clients.recv(0, "result", args.rtt_limit + PHASE_SLACK)
    wall = time.monotonic() - t0
    r["server_cpu"] = server.cpu() - cpu_a
    r["server_cpu_us_per_rt"] = (r["server_cpu"] / r["round_trips"] * 1e6
                                 if r["round_trips"] else None)
    r["client_util"] = r["client_cpu"] / r["wall_s"] if r["wall_s"] else None
    r["client_cpu_us_per_rt"] = (r["client_cpu"] / r["round_trips"] * 1e6
                                 if r["round_trips"] else None)
    r["server_util"] = r["server_cpu"] / wall
    server.check_worker()
    return r


def print_placement(name: str, phase: str, r: dict[str, Any]) -> None:
    pl = r.get("placement")
    if pl:
        print(f"[{name}] {phase} run, cross-worker pairs: opened {pl['opened']} connections "
              f"({pl['extra']} extra, {sum(len(h) for h in pl['steps'])} step(s)), landed " +
              ", ".join(f"{n} on worker {pid}" for pid, n in pl["landed"].items()) +
              f"; pairs {pl['a_to_b']} one way, {pl['b_to_a']} the other", flush=True)


def run_server(name: str, loadgens: Loadgens, args, log_dir: Path, config: ServerConfig,
               redis: AnyRedis | None = None) -> dict[str, Any]:
    """One round against one server: start it, warm up, connections (conn/s and memory at
    K1 and K2; not for the --redis servers), throughput, latency, round trips (not for the
    --redis servers), stop."""
    clients, raw, lean = loadgens.clients, loadgens.raw, loadgens.lean
    server = make_server(name, log_dir, config, redis)
    result: dict[str, Any] = {"command": server.command_line(), "log": str(server.log_path),
                              "label": SCENARIOS[name]["label"],
                              "env": {k: v for k, v in sorted(server.env.items())
                                      if k.startswith("VOLLI_") or k == "WEB_CONCURRENCY"}}
    print(f"[{name}] starting: {server.command_line()}  (port {server.port})", flush=True)
    try:
        server.start()
        result["worker_pids"] = server.workers
        tag = f"{name}{server.port}"
        clients.send_all(("warmup", server.target, tag + "w"))
        clients.gather("result", 30)
        if args.idle_ks and raw is not None and not SCENARIOS[name]["redis"]:
            result["connections"] = run_connections(server, raw, args, tag + "c")
            result["conn"] = flatten_connections(result["connections"])
        result["throughput"] = t = run_relay(server, lean or clients, "throughput", args,
                                             tag + "t")
        t["client"] = "lean (bench/rawws.py)" if lean else "python-websockets"
        print_placement(name, "throughput", t)
        extra = ""
        if server.redis is not None:
            extra = (f" (workers + redis-server; per worker CPU-s "
                     f"{t['msgs_per_worker_cpu_s']:.0f}; EVALSHA per msg "
                     f"{t['evalsha_per_msg']:.2f})")
        print(f"[{name}] throughput: {t['rate']:.0f} msg/s, {t['msgs_per_cpu_s']:.0f} msg per "
              f"server CPU-s{extra}, lost={t['lost']} errors={t['errors'] + t['sender_errors']};"
              f" {t['bottleneck']}", flush=True)
        result["latency"] = lat = run_relay(server, clients, "latency", args, tag + "l")
        print_placement(name, "latency", lat)
        print(f"[{name}] latency @ {args.rate:g} msg/s: p50 {lat['p50_ms']:.2f} ms, p99 "
              f"{lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms ({lat['samples']} samples, "
              f"achieved {lat['rate']:.0f} msg/s, lost={lat['lost']} "
              f"errors={lat['errors'] + lat['sender_errors']}; other processes "
              f"{lat['other_busy_cores']:.2f} cores)", flush=True)
        if args.rtt_count > 0 and not SCENARIOS[name]["redis"]:
            result["rtt"] = rt = run_rtt(server, clients, args, tag + "r")
            print(f"[{name}] round trips: {rt['round_trips']} in {rt['wall_s']:.1f}s, p50 "
                  f"{rt['p50_ms']:.3f} ms, p99 {rt['p99_ms']:.3f} ms, max {rt['max_ms']:.2f} ms;"
                  f" server {rt['server_cpu_us_per_rt']:.0f} us CPU per round trip; client "
                  f"{rt['client_util']:.0%} of a core" +
                  (f"; {rt['bad']} BAD replies, e.g. {rt['bad_sample']}" if rt["bad"] else ""),
                  flush=True)
        result["rss_end_kb"] = server.rss_kb()
    except Exception as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {result['failure']}", flush=True)
    finally:
        server.stop()
    result["log_findings"] = scan_log(server.log(), server.nworkers)
    return result


class Loadgens:
    """The run's client processes: python-websockets ones (warm-up, latency, round trips),
    and lean ones for the connections phase (raw) and the throughput run (lean), each
    None when its phase is left out."""

    def __init__(self, args, opts: dict[str, Any]) -> None:
        self.args, self.opts = args, opts
        self.start()

    def start(self) -> None:
        args, opts = self.args, self.opts
        self.clients = Clients(args.procs, opts, client_main)
        self.raw = (Clients(args.conn_procs, opts, raw_client_main, "raw-client")
                    if args.idle_ks else None)
        self.lean = (Clients(args.procs, opts, raw_client_main, "lean-client")
                     if args.throughput_client == "lean" else None)

    def stop(self) -> None:
        for group in (self.clients, self.raw, self.lean):
            if group is not None:
                group.stop()


def run_rounds(results: dict[str, list[dict[str, Any]]], loadgens: Loadgens, args,
               log_dir: Path, config: ServerConfig, redis: dict[str, AnyRedis]) -> None:
    """Every server of ``results`` (its keys) once per round, the order alternating; fills
    ``results`` as it goes, so an interrupted run still reports what it measured."""
    names = list(results)
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"--- round {rnd + 1}/{args.rounds}", flush=True)
        for name in (names if rnd % 2 == 0 else names[::-1]):
            kind = SCENARIOS[name]["redis"]
            results[name].append(run_server(name, loadgens, args, log_dir, config,
                                            redis[kind] if kind else None))
            if results[name][-1].get("failure"):
                # A client process may still be in the failed phase: start afresh.
                loadgens.stop()
                loadgens.start()
