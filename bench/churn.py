#!/usr/bin/env python
"""Churn bench: does registering and leaving keep memory forever?

Run from the repo root:  python bench/churn.py                       (20,000 registrations)
                         python bench/churn.py --volli-ref 238f7aa   (an old commit)
                         python bench/churn.py --quick               (2,000, about 30 seconds)

For the memory backend and (unless --no-redis) the Redis backend with a private
redis-server, it starts Volli (gunicorn, one gevent worker, relaybench's Server:
permissive rate limits, no per-IP limits) on a free 127.0.0.1 port, from the working tree
or from a commit exported with --volli-ref, then:

1. warm-up: --warmup (500) churned registrations, then --settle-before (1 s) idle;
2. baseline: the worker's VmRSS, GET /health (its "bindings" field where the server has
   one), and for Redis INFO memory's used_memory and the keys under the server's prefix
   (SCAN, counted by kind: presence:, key:, other);
3. churn: --registrations (20,000) distinct unsigned user IDs, each one WebSocket (lean
   client, bench/rawws.py): upgrade, read hello, send
   {"type":"register","userId":"<unique>","publicKey":"<--key-size (4000) characters of
   the base64 alphabet>"}, read registered, close (close frame, wait for the server's).
   --batch (500) connections are opened (--concurrency handshakes in flight, from several
   127.x source addresses) and then all closed, batch after batch; RSS (and used_memory)
   are sampled every --curve-every registrations;
4. after: --settle-after (2 s) idle, then the same readings as the baseline.

Reports baseline, after, after/baseline (the target for RSS is <= --rss-target, 1.10),
growth per registration, registrations per second, failures, server and client CPU, and
writes JSON to bench/results/<UTC>-churn.json. Every loop is bounded in count and time;
servers are stopped (SIGTERM, then SIGKILL, on their process group) on exit, error and ^C.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
import rawws  # noqa: E402
from relaybench.procfs import machine_cpu, other_cpu, other_cpu_delta, proc_rss_kb  # noqa: E402
from relaybench.report import NOISY_CORES  # noqa: E402
from relaybench.servers import ROOT, RedisServer, Server, ServerConfig, scan_log  # noqa: E402

BACKENDS = {"memory": "volli", "redis": "redis-1w"}  # backend -> relaybench SCENARIOS name
BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def make_key(size: int) -> str:
    """``size`` characters of the base64 alphabet (not a real key: the registration is
    unsigned, so the server only checks length and alphabet)."""
    return (BASE64_ALPHABET * (size // len(BASE64_ALPHABET) + 1))[:size]


# --------------------------------------------------------------------------------------------
# Readings


def proc_status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of one process, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


class RedisProbe:
    """used_memory and the keys under one prefix, through redis-py (a Volli dependency)."""

    def __init__(self, redis_server: RedisServer, prefix: str) -> None:
        import redis as redis_py

        self.prefix = prefix
        self.client = redis_py.Redis(host="127.0.0.1", port=redis_server.port,
                                     socket_timeout=10)

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def memory(self) -> dict[str, int]:
        """INFO memory's used_memory, and its dataset part (the keys, without client
        buffers and other overhead, which move with the connections' recent traffic)."""
        info = self.client.info("memory")
        return {k: int(info[k]) for k in ("used_memory", "used_memory_dataset",
                                          "used_memory_overhead", "used_memory_rss")
                if k in info}

    def keys(self, limit: int = 5_000_000) -> dict[str, int]:
        """{kind: count} of the keys under the prefix; kind is what follows the prefix up to
        the next ':' (presence, key, ...). Bounded by ``limit`` keys."""
        counts: dict[str, int] = {}
        cursor, seen = 0, 0
        pattern = self.prefix.replace("\\", "\\\\").replace("*", "\\*").replace(
            "?", "\\?").replace("[", "\\[") + "*"
        for _ in range(limit):  # SCAN calls; each returns up to COUNT keys
            cursor, batch = self.client.scan(cursor, match=pattern, count=1000)
            for raw in batch:
                rest = raw.decode(errors="replace")[len(self.prefix):]
                kind = rest.split(":", 1)[0] if ":" in rest else "other"
                counts[kind] = counts.get(kind, 0) + 1
            seen += len(batch)
            if cursor == 0 or seen >= limit:
                break
        return counts

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def snapshot(server: Server, probe: RedisProbe | None) -> dict[str, Any]:
    snap: dict[str, Any] = {"t": time.monotonic()}
    st = proc_status_kb(server.worker)
    snap["rss_kb"] = st.get("VmRSS")
    snap["hwm_kb"] = st.get("VmHWM")
    snap["rss_anon_kb"] = st.get("RssAnon")
    try:
        h = server.health()
        snap["health"] = h
        snap["bindings"] = h.get("bindings")
        snap["online"] = h.get("online")
        snap["connections"] = h.get("connections")
    except Exception as exc:  # noqa: BLE001 - recorded, reported under PROBLEMS
        snap["health_error"] = f"{type(exc).__name__}: {exc}"
    if probe is not None:
        mem = probe.memory()
        snap["redis_memory"] = mem
        snap["redis_used_memory"] = mem["used_memory"]
        snap["redis_used_memory_dataset"] = mem.get("used_memory_dataset")
        snap["redis_keys_by_kind"] = keys = probe.keys()
        snap["redis_keys"] = sum(keys.values())
    return snap


# --------------------------------------------------------------------------------------------
# Churn


def churn(server: Server, target: rawws.Target, ids: list[str], args,
          probe: RedisProbe | None, curve: list[dict[str, Any]] | None,
          deadline: float) -> dict[str, Any]:
    """Register and close every id, ``args.batch`` connections at a time (a fresh Pool per
    batch: open all, then close all). Samples RSS every ``args.curve_every``."""
    sources = rawws.source_addresses(args.sources)
    failures: dict[str, int] = {}
    dropped: dict[str, int] = {}
    unexpected, forced, opened = 0, 0, 0
    unexpected_sample = None
    handshakes: list[float] = []
    next_sample = args.curve_every
    cpu0 = sum(os.times()[:2])
    t0 = time.monotonic()
    done = 0
    for start in range(0, len(ids), args.batch):
        if time.monotonic() >= deadline:
            failures["not started: the run's deadline passed"] = \
                failures.get("not started: the run's deadline passed", 0) + len(ids) - start
            break
        batch = ids[start:start + args.batch]
        pool = rawws.Pool(target, sources, args.concurrency, args.handshake_timeout)
        try:
            r = pool.open(batch, min(deadline, time.monotonic() + args.batch_timeout))
        finally:
            closed = pool.close_all(time.monotonic() + 20)
        st = pool.stats()
        opened += r["opened"]
        for why, n in pool.failures.items():
            failures[why] = failures.get(why, 0) + n
        for why, n in pool.dropped.items():
            dropped[why] = dropped.get(why, 0) + n
        unexpected += pool.unexpected
        unexpected_sample = unexpected_sample or st["unexpected_sample"]
        forced += closed["forced"]
        handshakes += pool.handshake_ms
        done += len(batch)
        if curve is not None and done >= next_sample:
            point = {"registrations": done, "rss_kb": proc_rss_kb(server.worker)}
            if probe is not None:
                point["redis_used_memory"] = probe.used_memory()
            curve.append(point)
            next_sample += args.curve_every
        if sum(failures.values()) > args.max_failures:
            failures["not started: too many failures"] = len(ids) - done
            break
    wall = time.monotonic() - t0
    client_cpu = sum(os.times()[:2]) - cpu0
    handshakes.sort()

    def pct(q: float) -> float | None:
        return handshakes[min(len(handshakes) - 1, int(q * (len(handshakes) - 1)))] \
            if handshakes else None

    return {"asked": len(ids), "registered": opened, "failed": sum(failures.values()),
            "failures": failures, "dropped": dropped, "unexpected": unexpected,
            "unexpected_sample": unexpected_sample, "forced_closes": forced,
            "seconds": wall, "per_s": opened / wall if wall > 0 else None,
            "client_cpu": client_cpu, "client_util": client_cpu / wall if wall > 0 else None,
            "handshake_p50_ms": pct(0.5), "handshake_p99_ms": pct(0.99),
            "sources": sources}


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def run_backend(backend: str, args, log_dir: Path, config: ServerConfig, key: str,
                deadline: float) -> dict[str, Any]:
    name = BACKENDS[backend]
    redis: RedisServer | None = None
    server: Server | None = None
    probe: RedisProbe | None = None
    result: dict[str, Any] = {"backend": backend}
    try:
        if backend == "redis":
            redis = RedisServer(log_dir)
            print(f"[{backend}] redis: {redis.command_line()}", flush=True)
            redis.start()
            result["redis_command"] = redis.command_line()
        server = Server(name, log_dir, config, redis, name=f"churn-{backend}", prefix="churn")
        result["command"] = server.command_line()
        result["env"] = {k: v for k, v in sorted(server.env.items())
                         if k.startswith("VOLLI_") or k == "WEB_CONCURRENCY"}
        result["log"] = str(server.log_path)
        print(f"[{backend}] starting: {server.command_line()} (port {server.port})", flush=True)
        server.start()
        result["worker_pid"] = server.worker
        if redis is not None:
            probe = RedisProbe(redis, server.env["VOLLI_REDIS_PREFIX"])
        target = rawws.Target("volli", server.url, key)
        tag = f"churn{server.port}"
        result["boot"] = snapshot(server, probe)
        warm = churn(server, target, [f"{tag}-w{i}" for i in range(args.warmup)], args, None,
                     None, deadline)
        result["warmup"] = warm
        time.sleep(args.settle_before)
        result["baseline"] = base = snapshot(server, probe)
        ours = {os.getpid(), server.proc.pid, *server.workers}
        if redis is not None:
            ours.add(redis.pid)
        cpu_a, other_a, mach_a = server.cpu(), other_cpu(ours), machine_cpu()
        red_a = redis.cpu() if redis else None
        curve: list[dict[str, Any]] = [{"registrations": 0, "rss_kb": base["rss_kb"],
                                        **({"redis_used_memory": base["redis_used_memory"]}
                                           if probe else {})}]
        print(f"[{backend}] baseline after {warm['registered']} warm-up registrations: RSS "
              f"{base['rss_kb'] / 1024:.1f} MB" +
              (f", used_memory {base['redis_used_memory'] / 2**20:.2f} MiB, "
               f"{base['redis_keys']} keys" if probe else "") +
              (f", bindings {base['bindings']}" if base.get("bindings") is not None else ""),
              flush=True)
        c = churn(server, target, [f"{tag}-{i}" for i in range(args.registrations)], args,
                  probe, curve, deadline)
        cpu_b, other_b, mach_b = server.cpu(), other_cpu(ours), machine_cpu()
        red_b = redis.cpu() if redis else None
        wall = max(c["seconds"], 1e-6)
        c["server_cpu"] = cpu_b - cpu_a
        c["server_util"] = c["server_cpu"] / wall
        c["server_cpu_ms_per_registration"] = (c["server_cpu"] / c["registered"] * 1e3
                                               if c["registered"] else None)
        c["redis_util"] = (red_b - red_a) / wall if redis else None
        c["machine_busy_cores"] = (mach_b[0] - mach_a[0]) / wall
        c["other_busy_cores"], c["other_top"] = other_cpu_delta(other_a, other_b, wall)
        result["churn"] = c
        result["curve"] = curve
        print(f"[{backend}] churned {c['registered']:,}/{c['asked']:,} registrations in "
              f"{c['seconds']:.1f}s = {c['per_s'] or 0:,.0f}/s, {c['failed']} failed; server "
              f"{c['server_util']:.0%} of a core ({c['server_cpu_ms_per_registration'] or 0:.2f}"
              f" ms CPU/registration), client {c['client_util']:.0%}, other processes "
              f"{c['other_busy_cores']:.2f} cores" +
              (f"; failures {c['failures']}" if c["failures"] else ""), flush=True)
        time.sleep(args.settle_after)
        result["after"] = after = snapshot(server, probe)
        server.check_worker()
        n = max(c["registered"], 1)
        figs: dict[str, Any] = {
            "rss_baseline_kb": base["rss_kb"], "rss_after_kb": after["rss_kb"],
            "rss_ratio": ratio(after["rss_kb"], base["rss_kb"]),
            "rss_bytes_per_registration": (after["rss_kb"] - base["rss_kb"]) * 1024 / n,
            "rss_target": args.rss_target,
            "rss_pass": (after["rss_kb"] / base["rss_kb"]) <= args.rss_target,
            "bindings_baseline": base.get("bindings"), "bindings_after": after.get("bindings"),
            "online_after": after.get("online"),
            "registrations": c["registered"], "registrations_per_s": c["per_s"],
            "failures": c["failed"],
        }
        if probe is not None:
            figs.update({
                "redis_used_memory_baseline": base["redis_used_memory"],
                "redis_used_memory_after": after["redis_used_memory"],
                "redis_used_memory_ratio": ratio(after["redis_used_memory"],
                                                 base["redis_used_memory"]),
                "redis_bytes_per_registration":
                    (after["redis_used_memory"] - base["redis_used_memory"]) / n,
                "redis_dataset_baseline": base["redis_used_memory_dataset"],
                "redis_dataset_after": after["redis_used_memory_dataset"],
                "redis_dataset_ratio": ratio(after["redis_used_memory_dataset"],
                                             base["redis_used_memory_dataset"]),
                "redis_dataset_bytes_per_registration":
                    (after["redis_used_memory_dataset"] -
                     base["redis_used_memory_dataset"]) / n
                    if after["redis_used_memory_dataset"] is not None and
                    base["redis_used_memory_dataset"] is not None else None,
                "redis_keys_baseline": base["redis_keys"],
                "redis_keys_after": after["redis_keys"],
                "redis_keys_by_kind_after": after["redis_keys_by_kind"],
                "redis_keys_added_per_registration":
                    (after["redis_keys"] - base["redis_keys"]) / n,
            })
        result["figures"] = figs
        print(f"[{backend}] after {args.settle_after:g}s: RSS {after['rss_kb'] / 1024:.1f} MB "
              f"(x{figs['rss_ratio']:.3f}, {figs['rss_bytes_per_registration']:.0f} B per "
              f"registration)" +
              (f", used_memory {after['redis_used_memory'] / 2**20:.2f} MiB "
               f"(x{figs['redis_used_memory_ratio']:.3f}), {after['redis_keys']} keys "
               f"{after['redis_keys_by_kind']}" if probe else "") +
              (f", bindings {after['bindings']}" if after.get("bindings") is not None else ""),
              flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, the other backend still runs
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{backend}] FAILED: {result['failure']}", flush=True)
    finally:
        if probe is not None:
            probe.close()
        if server is not None:
            server.stop()
            result["log_findings"] = scan_log(server.log(), server.nworkers)
        if redis is not None:
            redis.stop()
    return result


# --------------------------------------------------------------------------------------------
# Report


def mb(kb: Any) -> str:
    return "n/a" if kb is None else f"{kb / 1024:,.1f} MB"


def mib(b: Any) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.2f} MiB"


def num(v: Any, spec: str = ",") -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: dict[str, dict[str, Any]], args) -> str:
    rows = ["| backend | figure | baseline | after | after/baseline | growth per registration |",
            "|---|---|---:|---:|---:|---:|"]
    for backend, r in results.items():
        f = r.get("figures")
        if not f:
            rows.append(f"| {backend} | FAILED: {r.get('failure', '?')} | | | | |")
            continue
        verdict = "ok" if f["rss_pass"] else "OVER"
        rows.append(f"| {backend} | worker RSS (target <= {args.rss_target:.2f}: {verdict}) | "
                    f"{mb(f['rss_baseline_kb'])} | {mb(f['rss_after_kb'])} | "
                    f"{f['rss_ratio']:.3f} | {f['rss_bytes_per_registration']:,.0f} B |")
        if f.get("bindings_baseline") is not None or f.get("bindings_after") is not None:
            rows.append(f"| {backend} | /health bindings | {num(f['bindings_baseline'])} | "
                        f"{num(f['bindings_after'])} | | |")
        if "redis_used_memory_baseline" in f:
            rows.append(f"| {backend} | redis used_memory | "
                        f"{mib(f['redis_used_memory_baseline'])} | "
                        f"{mib(f['redis_used_memory_after'])} | "
                        f"{f['redis_used_memory_ratio']:.3f} | "
                        f"{f['redis_bytes_per_registration']:,.0f} B |")
            if f.get("redis_dataset_baseline") is not None:
                rows.append(f"| {backend} | redis used_memory_dataset (keys only) | "
                            f"{mib(f['redis_dataset_baseline'])} | "
                            f"{mib(f['redis_dataset_after'])} | "
                            f"{num(f['redis_dataset_ratio'], '.3f')} | "
                            f"{num(f['redis_dataset_bytes_per_registration'], ',.0f')} B |")
            kinds = ", ".join(f"{k} {v:,}" for k, v in
                              sorted(f["redis_keys_by_kind_after"].items())) or "none"
            rows.append(f"| {backend} | redis keys under the prefix (after: {kinds}) | "
                        f"{f['redis_keys_baseline']:,} | {f['redis_keys_after']:,} | | "
                        f"{f['redis_keys_added_per_registration']:.3f} keys |")
        c = r["churn"]
        rows.append(f"| {backend} | registrations/s ({c['registered']:,} of {c['asked']:,}, "
                    f"{c['failed']} failed) | | {c['per_s'] or 0:,.0f} | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--registrations", type=int, default=20_000,
                    help="distinct unsigned user IDs churned after the baseline")
    ap.add_argument("--warmup", type=int, default=500,
                    help="churned registrations before the baseline")
    ap.add_argument("--key-size", type=int, default=4000,
                    help="characters of the publicKey each registration carries")
    ap.add_argument("--batch", type=int, default=500,
                    help="connections opened, then all closed, at a time")
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    ap.add_argument("--sources", type=int, default=4,
                    help="client source addresses (127.0.0.2, ...)")
    ap.add_argument("--handshake-timeout", type=float, default=20.0,
                    help="seconds from connect() to registered before a connection fails")
    ap.add_argument("--batch-timeout", type=float, default=60.0,
                    help="bound on opening one batch (s)")
    ap.add_argument("--max-failures", type=int, default=1000,
                    help="stop churning after this many failures")
    ap.add_argument("--settle-before", type=float, default=1.0,
                    help="idle seconds between the warm-up and the baseline reading")
    ap.add_argument("--settle-after", type=float, default=2.0,
                    help="idle seconds between the churn and the after reading")
    ap.add_argument("--curve-every", type=int, default=2000,
                    help="sample RSS (and used_memory) every this many registrations")
    ap.add_argument("--rss-target", type=float, default=1.10,
                    help="after/baseline RSS ratio a fixed server stays under")
    ap.add_argument("--time-limit", type=float, default=900.0,
                    help="bound on the whole run's churning (s)")
    ap.add_argument("--no-redis", dest="redis", action="store_false",
                    help="memory backend only")
    machine.add_run_options(ap, "churn")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2,000 registrations, 200 warm-up (explicit options win)")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(registrations=2000, warmup=200, batch=200, curve_every=500,
                        settle_before=0.5, settle_after=1.0)
    args = ap.parse_args(argv)
    for opt in ("registrations", "warmup", "batch", "concurrency", "sources", "key_size",
                "curve_every"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be at least 1")
    notes: list[str] = []
    if args.redis and not shutil.which("redis-server") and not os.path.exists(
            "/usr/bin/redis-server"):
        args.redis = False
        notes.append("redis-server is not on PATH: the Redis backend was left out")
    os.chdir(ROOT)
    soft = rawws.raise_nofile(max(65536, args.batch + 1000))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-churn-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tree, volli_commit, tree_before = machine.server_code(args.volli_ref, log_dir, notes)
    config = ServerConfig(tree=tree or ROOT,
                          nofile=soft if soft != resource.RLIM_INFINITY else 1 << 20)
    key = make_key(args.key_size)
    print(f"churn bench: {args.registrations:,} registrations (+{args.warmup} warm-up), "
          f"publicKey {len(key)} characters, batches of {args.batch}, {args.concurrency} "
          f"handshakes in flight, {args.sources} source address(es); load average "
          f"{os.getloadavg()[0]:.2f}; logs in {log_dir}", flush=True)
    for note in notes:
        print(f"NOTE: {note}", flush=True)

    machine.interrupt_on_signals()
    started = time.monotonic()
    deadline = started + args.time_limit
    results: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        for backend in (["memory", "redis"] if args.redis else ["memory"]):
            results[backend] = run_backend(backend, args, log_dir, config, key, deadline)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", file=sys.stderr)
    elapsed = time.monotonic() - started
    tree_after = None if args.volli_ref else machine.server_tree_state()

    problems: list[str] = []
    noise: list[str] = []
    if tree_before and tree_after and tree_after["digest"] != tree_before["digest"]:
        problems.append("Volli's files in the working tree changed during the run: the two "
                        "backends may have run different code; use --volli-ref")
    for backend, r in results.items():
        if r.get("failure"):
            problems.append(f"{backend}: run failed: {r['failure']}")
        for phase in ("warmup", "churn"):
            c = r.get(phase) or {}
            if c.get("failed"):
                problems.append(f"{backend} {phase}: {c['failed']} of {c['asked']} "
                                f"registrations failed: {c['failures']}")
            if c.get("dropped"):
                problems.append(f"{backend} {phase}: the server closed registered "
                                f"connections: {c['dropped']}")
            if c.get("unexpected"):
                problems.append(f"{backend} {phase}: {c['unexpected']} unexpected frames, "
                                f"e.g. {c['unexpected_sample']}")
            if c.get("forced_closes"):
                problems.append(f"{backend} {phase}: {c['forced_closes']} connections not "
                                f"closed by the server within 20 s of our close frame")
            if c.get("other_busy_cores", 0) > NOISY_CORES:
                noise.append(f"{backend} {phase}: other processes kept "
                             f"{c['other_busy_cores']:.2f} cores busy (top: "
                             f"{', '.join(c.get('other_top') or []) or '?'})")
        for snap in ("baseline", "after"):
            s = r.get(snap) or {}
            if s.get("health_error"):
                problems.append(f"{backend} {snap}: GET /health failed: {s['health_error']}")
        after = r.get("after") or {}
        if after.get("online") not in (None, 0):
            problems.append(f"{backend}: /health reports {after['online']} online after every "
                            f"connection closed")
        problems += machine.log_problems(backend, r.get("log_findings"))

    print()
    print(f"Volli {args.volli_ref or 'working tree'}"
          f"{' = ' + volli_commit[:12] if volli_commit else ''}: {args.registrations:,} "
          f"churned unsigned registrations, publicKey {args.key_size} characters")
    print()
    md = table(results, args)
    print(md)
    for backend, r in results.items():
        if r.get("curve"):
            pts = ", ".join(f"{p['registrations']:,}: {p['rss_kb'] / 1024:.0f}" +
                            (f"/{p['redis_used_memory'] / 2**20:.0f}"
                             if "redis_used_memory" in p else "") for p in r["curve"])
            print(f"- {backend} RSS MB" + (" / redis used_memory MiB" if backend == "redis"
                                           else "") + f" by registrations: {pts}")
    machine.print_report(noise, problems, elapsed, log_dir)
    machine.save_results(args, "churn", lambda: {
        **machine.describe(), "volli_ref": args.volli_ref,
        "volli_commit": volli_commit or "working tree", "volli_tree_before": tree_before,
        "volli_tree_after": tree_after, "args": vars(args), "elapsed_seconds": elapsed,
        "notes": notes, "figures": {b: r.get("figures") for b, r in results.items()},
        "table_markdown": md, "results": results, "problems": problems, "noise": noise})
    if interrupted:
        return 130
    return 1 if any(r.get("failure") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
