"""What a run found: the CPU verdict of each window, the main and Redis tables (medians
over rounds, ratios), and the NOISE and PROBLEMS lines."""

from __future__ import annotations

import os
from typing import Any

import machine

NOISY_CORES = 0.35  # CPU use by other processes in a window above which a run is flagged
# The Redis table's columns after the reference (1 worker, memory), those that ran.
REDIS_COLUMNS = {"redis-1w": "1 worker, Redis (all local)",
                 "redis-2w": "2 workers, Redis, all cross-worker",
                 "cluster-2w": "2 workers, Redis Cluster (3 primaries), all cross-worker"}


def usage(r: dict[str, Any]) -> str:
    """Who used how much CPU in a window, in cores."""
    ws = r["worker_util"]
    parts = [("server worker " if len(ws) == 1 else "server workers ") +
             "/".join(f"{w:.0%}" for w in ws) + " of a core"]
    if r.get("redis_util") is not None:
        each = r.get("redis_util_each") or [r["redis_util"]]
        parts.append(("redis-server " if len(each) == 1 else "redis-servers ") +
                     "/".join(f"{u:.0%}" for u in each))
    parts += ["clients " + "/".join(f"{c:.0%}" for c in r["client_util"]),
              f"machine {r['machine_busy_cores']:.2f}/{r['machine_cores']:.0f} cores busy "
              f"(other processes {r['other_busy_cores']:.2f})"]
    return ", ".join(parts)


def bottleneck(r: dict[str, Any]) -> tuple[str, bool]:
    """(verdict with the CPU figures, whether the load generator limited the figure)."""
    ws, cli = r["worker_util"], r["client_util"]
    # Each redis-server is single-threaded: a cluster saturates when one node does.
    reds = r.get("redis_util_each") or ([r["redis_util"]] if r.get("redis_util") else [])
    red = max(reds, default=0.0)
    busy = r["machine_busy_cores"]
    used = sum(ws) + sum(cli) + red + r["other_busy_cores"]
    client_bound = False
    if max(ws) >= 0.9:
        verdict = "a server worker (one core) saturated"
    elif red >= 0.9:
        verdict = "redis-server (single-threaded) saturated"
    elif cli and max(cli) >= 0.9:
        verdict = "a client process saturated (client-bound: the load generator limits it)"
        client_bound = True
    elif max(busy, used) >= 0.85 * r["machine_cores"]:
        verdict = (f"machine CPU saturated (server, clients and other processes share the "
                   f"cores; the load generator took {sum(cli):.2f} of them)")
        # The client's share is CPU the server could have used: with more cores than
        # server processes plus the client this would not limit the server.
        client_bound = len(ws) + len(reds) + len(cli) > r["machine_cores"] + 0.5
    else:
        verdict = "nothing CPU-saturated (window/latency-bound)"
    return f"{verdict}: " + usage(r), client_bound


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def ratio(a: Any, b: Any) -> str:
    try:
        if a is None or b is None or b == 0 or a != a or b != b:
            return "n/a"
        return f"{a / b:.2f}"
    except TypeError:
        return "n/a"


def lookup(r: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = r
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def median(vals: list[float]) -> float | None:
    vals = sorted(v for v in vals if v is not None and v == v)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def total_over(res: dict[str, list[dict[str, Any]]], name: str, key: str) -> int | None:
    """Sum of a count over both relay phases of every round ("errors": error replies on
    either side of a pair)."""
    keys = ("errors", "sender_errors") if key == "errors" else (key,)
    rounds = res.get(name, [])
    vals = [lookup(r, (ph, k)) for r in rounds for ph in ("throughput", "latency")
            for k in keys]
    return sum(vals) if rounds and all(v is not None for v in vals) else None


def redis_table(res: dict[str, list[dict[str, Any]]], args) -> str:
    """The --redis section: each Redis server that ran against the single-worker memory
    Volli, a column and a ratio each."""
    names = ["volli"] + [n for n in REDIS_COLUMNS if n in res]

    def get(name: str, *path: str) -> Any:
        return median([lookup(r, path) for r in res.get(name, [])])

    rows = [
        ("relay throughput (msg/s, at receivers)", ("throughput", "rate"), ",.0f", True),
        ("server CPU used: workers (s, in window, sum)", ("throughput", "server_cpu"), ".2f",
         True),
        ("server CPU used: redis-server(s) (s, in window, sum)", ("throughput", "redis_cpu"),
         ".2f", False),
        ("server CPU utilisation: workers + redis (cores)", ("throughput", "total_util"),
         ".2f", True),
        ("msgs per server CPU-second (workers + redis-server)",
         ("throughput", "msgs_per_cpu_s"), ",.0f", True),
        ("msgs per worker CPU-second (workers only)", ("throughput", "msgs_per_worker_cpu_s"),
         ",.0f", True),
        ("Redis EVALSHA per relayed msg", ("throughput", "evalsha_per_msg"), ".3f", False),
        ("Redis PUBLISH + SPUBLISH per relayed msg", ("throughput", "publish_per_msg"), ".3f",
         False),
        ("client CPU utilisation, throughput run (cores)", ("throughput", "client_util_sum"),
         ".2f", True),
        (f"latency p50 (ms) @ {args.rate:g} msg/s", ("latency", "p50_ms"), ".2f", True),
        (f"latency p99 (ms) @ {args.rate:g} msg/s", ("latency", "p99_ms"), ".2f", True),
        (f"latency max (ms) @ {args.rate:g} msg/s", ("latency", "max_ms"), ".2f", True),
        ("latency run: achieved rate (msg/s)", ("latency", "rate"), ",.0f", True),
        ("latency run: server CPU, workers + redis (cores)", ("latency", "total_util"), ".2f",
         True),
        ("latency run: msgs per server CPU-second (same rate for all)",
         ("latency", "msgs_per_cpu_s"), ",.0f", True),
        ("lost messages (throughput + latency, all rounds)", None, "d", False),
        ("error replies received (all rounds)", None, "d", False),
    ]
    for rs in res.values():  # derived figure used above
        for r in rs:
            t = r.get("throughput")
            if t:
                t["client_util_sum"] = sum(t["client_util"])
    lines = ["| figure | 1 worker, memory | " +
             "".join(f"{REDIS_COLUMNS[n]} | ratio | " for n in names[1:]).rstrip(),
             "|---|---:|" + "---:|---:|" * (len(names) - 1)]
    for label, path, spec, with_ratio in rows:
        if path is None:
            key = "lost" if label.startswith("lost") else "errors"
            v = [total_over(res, n, key) for n in names]
            cells = [f"{fmt(x, spec)} | -" for x in v[1:]]
        else:
            v = [get(n, *path) for n in names]
            cells = [f"{fmt(x, spec)} | {ratio(x, v[0]) if with_ratio else '-'}"
                     for x in v[1:]]
        lines.append(f"| {label} | {fmt(v[0], spec)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flatten_connections(c: dict[str, Any]) -> dict[str, Any]:
    """The connections phase's figures by step number (1 = K1, 2 = K2), for the table."""
    out: dict[str, Any] = {"failed": sum(st["failed"] for st in c["steps"])}
    for i, st in enumerate(c["steps"], 1):
        out.update({f"k{i}": st["k"], f"conn_per_s_{i}": st["conn_per_s"],
                    f"server_ms_per_conn_{i}": st["server_cpu_ms_per_conn"],
                    f"server_util_{i}": st["server_util"],
                    f"client_util_{i}": st["client_util_sum"],
                    f"handshake_p99_{i}": st["handshake_p99_ms"],
                    f"kb_per_conn_{i}": st["kb_per_conn"], f"rss_mb_{i}": st["rss_kb"] / 1024})
    return out


def main_rows(args) -> list[tuple[str, str, tuple[str, ...] | None, str, str]]:
    """(key, label, path into a result, format, which servers): the main table's figures.
    "which" is "all" (Volli, baseline, peerjs), or "redis": the Volli column is the 2-worker
    Redis server (every pair cross-worker), the peerjs column peerjs's single process."""
    ks = args.idle_ks or [0, 0]
    k1, k2 = ks[0], ks[-1]
    r = f"{args.rate:g}"
    rows = [
        ("throughput", "1. relay throughput at saturation (msg/s, at receivers)",
         ("throughput", "rate"), ",.0f", "all"),
        ("throughput_server_cores", "   server CPU used, throughput run (cores)",
         ("throughput", "server_util"), ".2f", "all"),
        ("msgs_per_server_cpu_s", "   **msgs relayed per server CPU-second**",
         ("throughput", "msgs_per_cpu_s"), ",.0f", "all"),
        ("throughput_client_cores", "   load generator CPU, throughput run (cores)",
         ("throughput", "client_util_sum"), ".2f", "all"),
        ("latency_p50_ms", f"2. latency p50 (ms) @ {r} msg/s offered", ("latency", "p50_ms"),
         ".2f", "all"),
        ("latency_p99_ms", f"   latency p99 (ms) @ {r} msg/s", ("latency", "p99_ms"), ".2f",
         "all"),
        ("latency_max_ms", f"   latency max (ms) @ {r} msg/s", ("latency", "max_ms"), ".2f",
         "all"),
        ("latency_rate", "   achieved rate (msg/s)", ("latency", "rate"), ",.0f", "all"),
        ("latency_server_cores", "   server CPU, latency run (cores)",
         ("latency", "server_util"), ".2f", "all"),
        ("latency_msgs_per_server_cpu_s", "   msgs per server CPU-second at that rate",
         ("latency", "msgs_per_cpu_s"), ",.0f", "all"),
        ("latency_client_cores", "   load generator CPU, latency run (cores)",
         ("latency", "client_util_sum"), ".2f", "all"),
        ("latency_pacer_lag_p99_ms", "   load generator pacer lag p99 (ms)",
         ("latency", "pacer_lag_p99_ms"), ".2f", "all"),
        ("rtt_p50_ms", f"3. round trip offer->answer p50 (ms), 1 pair, {args.rtt_count} "
         f"sequential", ("rtt", "p50_ms"), ".3f", "all"),
        ("rtt_p99_ms", "   round trip p99 (ms)", ("rtt", "p99_ms"), ".3f", "all"),
        ("rtt_max_ms", "   round trip max (ms)", ("rtt", "max_ms"), ".2f", "all"),
        ("rtt_server_us", "   server CPU per round trip (us, 2 relays)",
         ("rtt", "server_cpu_us_per_rt"), ",.0f", "all"),
        ("rtt_client_us", "   load generator CPU per round trip (us, both ends, in the RTT)",
         ("rtt", "client_cpu_us_per_rt"), ",.0f", "all"),
        ("kb_per_conn_k1", f"4. server RSS per idle registered conn at K={k1:,} (kB)",
         ("conn", "kb_per_conn_1"), ".1f", "all"),
        ("kb_per_conn_k2", f"   server RSS per idle registered conn at K={k2:,} (kB)",
         ("conn", "kb_per_conn_2"), ".1f", "all"),
        ("rss_mb_k2", f"   server RSS with K={k2:,} idle conns (MB)", ("conn", "rss_mb_2"),
         ".0f", "all"),
        ("conn_per_s", f"5. connections accepted+registered per second (first {k1:,})",
         ("conn", "conn_per_s_1"), ",.0f", "all"),
        ("conn_server_ms", "   server CPU per connection (ms)",
         ("conn", "server_ms_per_conn_1"), ".2f", "all"),
        ("conn_server_cores", "   server CPU, connections run (cores)",
         ("conn", "server_util_1"), ".2f", "all"),
        ("conn_client_cores", "   load generator CPU, connections run (cores, lean client)",
         ("conn", "client_util_1"), ".2f", "all"),
        ("conn_handshake_p99_ms", "   connect->registered p99 (ms)",
         ("conn", "handshake_p99_1"), ".0f", "all"),
        ("conn_per_s_k2", f"   connections per second ({k1:,} -> {k2:,})",
         ("conn", "conn_per_s_2"), ",.0f", "all"),
    ]
    # Figure 6 is redis-2w (one Redis); the Cluster server is in the Redis table only.
    if args.redis and "single" in args.redis_kinds:
        rows += [
            ("redis2w_throughput", "6. Redis, 2 workers, all pairs cross-worker: throughput "
             "(msg/s)", ("throughput", "rate"), ",.0f", "redis"),
            ("redis2w_msgs_per_server_cpu_s", "   msgs per server CPU-second (workers + "
             "redis-server)", ("throughput", "msgs_per_cpu_s"), ",.0f", "redis"),
            ("redis2w_server_cores", "   server CPU, throughput run (cores, workers + redis)",
             ("throughput", "total_util"), ".2f", "redis"),
            ("redis2w_client_cores", "   load generator CPU, throughput run (cores)",
             ("throughput", "client_util_sum"), ".2f", "redis"),
            ("redis2w_latency_p50_ms", f"   latency p50 (ms) @ {r} msg/s", ("latency", "p50_ms"),
             ".2f", "redis"),
            ("redis2w_latency_p99_ms", f"   latency p99 (ms) @ {r} msg/s", ("latency", "p99_ms"),
             ".2f", "redis"),
            ("redis2w_latency_rate", "   achieved rate (msg/s)", ("latency", "rate"), ",.0f",
             "redis"),
            ("redis2w_latency_msgs_per_server_cpu_s", "   msgs per server CPU-second at that "
             "rate", ("latency", "msgs_per_cpu_s"), ",.0f", "redis"),
        ]
    return rows


def main_values(res: dict[str, list[dict[str, Any]]], args) -> dict[str, dict[str, Any]]:
    """{row key: {"volli": v, "baseline": b, "peerjs": p, "ratio_volli_peerjs": ...,
    "ratio_volli_baseline": ...}}, medians over rounds."""
    def get(name: str, path: tuple[str, ...]) -> Any:
        return median([lookup(r, path) for r in res.get(name, [])])

    def rat(a: Any, b: Any) -> float | None:
        try:
            return a / b if a is not None and b and a == a and b == b else None
        except TypeError:
            return None

    out: dict[str, dict[str, Any]] = {}
    for key, _label, path, _spec, which in main_rows(args):
        if which == "redis":
            v, b, pj = get("redis-2w", path), None, get("peerjs", path)
        else:
            v, b, pj = (get(n, path) for n in ("volli", "baseline", "peerjs"))
        out[key] = {"volli": v, "baseline": b, "peerjs": pj,
                    "ratio_volli_baseline": rat(v, b), "ratio_volli_peerjs": rat(v, pj)}
    for key in ("lost", "errors"):
        out[key] = {n: total_over(res, n, key) for n in res}
    return out


def table(res: dict[str, list[dict[str, Any]]], args) -> str:
    """Each figure is the median over rounds (one round: the value itself)."""
    vals = main_values(res, args)
    lines = ["| figure | Volli | peerjs | ratio Volli/peerjs | baseline | "
             "ratio Volli/baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label, _path, spec, which in main_rows(args):
        row = vals[key]
        lines.append(f"| {label} | {fmt(row['volli'], spec)} | {fmt(row['peerjs'], spec)} | "
                     f"{fmt(row['ratio_volli_peerjs'], '.2f')} | "
                     f"{fmt(row['baseline'], spec) if which == 'all' else '-'} | "
                     f"{fmt(row['ratio_volli_baseline'], '.2f') if which == 'all' else '-'} |")
    for key, label in (("lost", "lost messages (all relay runs)"),
                       ("errors", "error replies received (all relay runs)")):
        v = vals[key]
        lines.append(f"| {label} | {fmt(v.get('volli'), 'd')} | {fmt(v.get('peerjs'), 'd')} "
                     f"| - | {fmt(v.get('baseline'), 'd')} | - |")
    conn_failed = {n: median([lookup(r, ("conn", "failed")) for r in res.get(n, [])])
                   for n in ("volli", "peerjs", "baseline")}
    lines.append(f"| connections failed (connections run) | "
                 f"{fmt(conn_failed['volli'], '.0f')} | {fmt(conn_failed['peerjs'], '.0f')} | - "
                 f"| {fmt(conn_failed['baseline'], '.0f')} | - |")
    return "\n".join(lines)


def print_redis_section(res: dict[str, list[dict[str, Any]]], args) -> None:
    """The Redis table with what it compares and how to read it."""
    print("Redis backend: single-worker memory Volli (the reference) against a single "
          "worker with Redis\nand two workers where every pair is cross-worker, on one "
          "Redis and on a 3-primary Redis Cluster\n(those that ran); ratios are against "
          "the first column. A cluster's CPU and commands are summed\nover its nodes.\n")
    print(redis_table(res, args))
    print()
    cores = os.cpu_count() or 1
    if cores < 2 + 1 + args.procs:
        print(f"CAVEAT: {cores} CPUs. In the 2-worker runs the two workers, redis-server(s) "
              f"and {args.procs} client process(es) share them, so their throughput is "
              f"bounded by the machine, not by Volli; compare msgs per server CPU-second, "
              f"not msg/s. The 1-worker runs have about a core each for server and "
              f"client.")
    print("Per-message CPU falls as a worker gets busier (more work per wake-up): the "
          "throughput run compares a\nsaturated single worker with two unsaturated "
          "ones, which favours the single worker; the latency run's\nmsgs per server "
          "CPU-second compares them all at the same paced rate.\n")


def findings(res: dict[str, list[dict[str, Any]]], args) -> tuple[list[str], list[str]]:
    """(PROBLEMS, NOISE) lines of every round of every server; prints each window's CPU
    verdict and the LOAD GENERATOR lines on the way."""
    problems: list[str] = []
    noise: list[str] = []
    for name, rounds in res.items():
        for i, r in enumerate(rounds):
            where = f"{name}" + (f" round {i + 1}" if len(rounds) > 1 else "")
            _round_findings(where, r, args, problems, noise)
    return problems, noise


def relay_findings(where: str, p: dict[str, Any], problems: list[str],
                   noise: list[str]) -> None:
    """PROBLEMS and NOISE lines of one relay window (run_relay's result)."""
    for key in ("lost", "errors", "sender_errors", "unexpected", "bad_from"):
        if p.get(key):
            problems.append(f"{where}: {key}={p[key]}")
    if p.get("error_samples"):
        problems.append(f"{where}: error replies, e.g. {'; '.join(p['error_samples'])}")
    if p.get("connection_failure_count"):
        problems.append(f"{where}: {p['connection_failure_count']} client connections "
                        f"failed, e.g. {p['connection_failures']}")
    if p.get("other_busy_cores", 0) > NOISY_CORES:
        noise.append(f"{where}: other processes kept {p['other_busy_cores']:.2f} cores busy "
                     f"(top: {', '.join(p.get('other_top') or []) or '?'})")


def _round_findings(where: str, r: dict[str, Any], args, problems: list[str],
                    noise: list[str]) -> None:
    t = r.get("throughput") or {}
    if t.get("bottleneck"):
        print(f"- {where} throughput run: {t['bottleneck']}")
    if t.get("client_bound"):
        print(f"  LOAD GENERATOR: in the {where} throughput run the client used "
              f"{sum(t['client_util']):.2f} of the {t['machine_cores']:.0f} cores "
              f"that the server processes needed too, so its msg/s is bound by the "
              f"shared machine, not by the server alone; compare its msgs per server "
              f"CPU-second instead")
    lat = r.get("latency") or {}
    if lat:
        print(f"- {where} latency run: {usage(lat)}, pacer lag "
              f"p99 {lat['pacer_lag_p99_ms']:.2f} ms / max {lat['pacer_lag_max_ms']:.2f} "
              f"ms (how late the client sent; the stamp is taken at the real send)")
        if lat["rate"] < 0.95 * args.rate:
            print(f"  LOAD GENERATOR or SERVER: the {where} latency run achieved only "
                  f"{lat['rate']:.0f} of {args.rate:g} msg/s")
    if r.get("failure"):
        problems.append(f"{where}: run failed: {r['failure']}")
    for phase in ("throughput", "latency"):
        relay_findings(f"{where} {phase}", r.get(phase) or {}, problems, noise)
    c = r.get("connections") or {}
    for st in c.get("steps") or []:
        if st["failed"]:
            problems.append(f"{where} connections: {st['failed']} of {st['new']} "
                            f"failed: {st['failure_reasons']}")
        if st.get("online_reported") not in (None, st["k"]) and not st["failed"]:
            problems.append(f"{where} connections: server reported "
                            f"{st['online_reported']} online, expected {st['k']}")
        if st.get("other_busy_cores", 0) > NOISY_CORES:
            noise.append(f"{where} connections to {st['k']}: other processes kept "
                         f"{st['other_busy_cores']:.2f} cores busy (top: "
                         f"{', '.join(st.get('other_top') or []) or '?'})")
        if max(st["client_util"] or [0]) >= 0.9:
            print(f"  LOAD GENERATOR: in the {where} connections run to {st['k']:,} a "
                  f"lean client process used {max(st['client_util']):.0%} of a core")
    if c.get("dropped"):
        problems.append(f"{where} connections: the server closed idle connections: "
                        f"{c['dropped']}")
    if c.get("forced_closes"):
        problems.append(f"{where} connections: {c['forced_closes']} connections "
                        f"not closed by the server within 30 s of our close frame")
    rt = r.get("rtt") or {}
    if rt.get("bad"):
        problems.append(f"{where} round trips: {rt['bad']} wrong replies, e.g. "
                        f"{rt['bad_sample']}")
    if rt and rt.get("round_trips", 0) < rt.get("asked", 0):
        problems.append(f"{where} round trips: only {rt['round_trips']} of "
                        f"{rt['asked']} within {args.rtt_limit:g}s")
    problems.extend(machine.log_problems(where, r.get("log_findings")))
