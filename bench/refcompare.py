#!/usr/bin/env python
"""Relay hot-path cost of two git refs of Volli, in one run, as a ratio.

Run from the repo root:  python bench/refcompare.py                          (238f7aa vs HEAD)
                         python bench/refcompare.py --ref-a 238f7aa --ref-b main
                         python bench/refcompare.py --quick                  (about a minute)
                         python bench/refcompare.py --ref-a HEAD --ref-b HEAD   (noise floor)
                         python bench/refcompare.py --ref-a HEAD --ref-b HEAD \
                             --protocol-b volli-sealed      (sealed relays against plaintext)

Each ref is exported with git archive (bench/machine.py's export_tree: volli/, wsgi.py,
gunicorn.conf.py) into the log directory, so every server runs exactly one commit while the
working tree changes. For --rounds rounds, alternating the order (A,B then B,A, ...), each
ref's server is started fresh (relaybench's Server: gunicorn, one gevent worker, memory
backend, permissive rate limits) and measured with relay.py's own phases (run_relay):

1. throughput: --pairs sender/receiver pairs on the lean client (bench/rawws.py), each
   keeping at most --window 1.5 KB offers in flight (closed loop), --warmup then --duration
   seconds; relayed messages per server CPU-second (worker utime+stime over the window);
2. latency (unless --no-latency): the same pairs paced at --rate msg/s in total
   (python-websockets client), one-way p50/p99, and msgs per server CPU-second at that
   rate (the same load for both refs).

Offers are relay.py's ({"type":"offer","to":...,"offer":{"type":"offer","sdp":...,"t":...}}),
checked at start to be compact JSON (what browsers' JSON.stringify writes). With
--protocol-a/--protocol-b volli-sealed, that ref's clients send sealed offers instead
({"type":"offer","to":...,"sealed":{"enc":...,"ct":...},"requestId":<t>}, docs/protocol.md
5e) of the same frame size: the server's cost of a sealed relay against a plaintext one. Reports per ref
the median over rounds, the ratio B/A of the medians and the per-round ratios (their
spread), the load generator's CPU and the bottleneck of every window (so a client-bound run
shows), and writes JSON to bench/results/<UTC>-refcompare.json. Every loop is bounded; servers
are stopped (SIGTERM, then SIGKILL, on their process group) on exit, error and ^C.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
import rawws  # noqa: E402
from relaybench.aioclient import client_main  # noqa: E402
from relaybench.cli import add_relay_options, check_relay_options  # noqa: E402
from relaybench.clients import Clients  # noqa: E402
from relaybench.leanclient import raw_client_main  # noqa: E402
from relaybench.protocol import PROTOCOLS, make_sdp  # noqa: E402
from relaybench.report import NOISY_CORES, relay_findings, usage  # noqa: E402
from relaybench.runs import run_relay  # noqa: E402
from relaybench.servers import ROOT, Server, ServerConfig, scan_log  # noqa: E402

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a Volli dependency
    orjson = None


WORKTREE = "WORKTREE"  # --ref-a/--ref-b value: the working tree as it is, not a commit


def check_compact(sdp_size: int, protocol: str = "volli") -> dict[str, Any]:
    """The offer frames relay.py's clients send (both the lean and the websockets client take
    them from Protocol.offer_parts) must be compact JSON: what JSON.stringify writes, and
    what a server that keeps compact text as it is (and re-encodes any other) sees from a
    browser. Raises if not."""
    prefix, suffix = PROTOCOLS[protocol].offer_parts("peer-1", make_sdp(sdp_size))
    frame = prefix + str(time.monotonic_ns()) + suffix
    compact = json.dumps(json.loads(frame), separators=(",", ":"), ensure_ascii=False)
    ok = frame == compact
    out = {"frame_bytes": len(frame.encode()), "compact_json": ok,
           "excerpt": frame[:80] + " ... " + frame[-40:]}
    if orjson is not None:
        out["orjson_identical"] = orjson.dumps(orjson.loads(frame)) == frame.encode()
        ok = ok and out["orjson_identical"]
    if not ok:
        raise RuntimeError(f"relay.py's offers are not compact JSON: {out}")
    return out


def median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None and v == v]
    return statistics.median(vals) if vals else None


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b or a != a or b != b:
        return None
    return a / b


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def run_one(label: str, config: ServerConfig, commit: str, clients: Clients, lean: Clients,
            args, log_dir: Path, protocol: str = "volli") -> dict[str, Any]:
    """One server at one ref (``config.tree``): start, warm up, throughput, latency, stop."""
    tree = config.tree
    server = Server("volli", log_dir, config)
    server.protocol = protocol
    result: dict[str, Any] = {"ref": label, "commit": commit, "protocol": protocol,
                              "command": server.command_line(),
                              "cwd": str(tree), "log": str(server.log_path),
                              "env": {k: v for k, v in sorted(server.env.items())
                                      if k.startswith("VOLLI_") or k == "WEB_CONCURRENCY"}}
    who = f"{label} {commit[:9]}"
    print(f"[{who}] starting from {tree} (port {server.port})", flush=True)
    try:
        server.start()
        result["worker_pids"] = server.workers
        tag = f"rc{server.port}"
        clients.send_all(("warmup", server.target, tag + "w"))
        clients.gather("result", 30)
        t = run_relay(server, lean, "throughput", args, tag + "t")
        result["throughput"] = t
        print(f"[{who}] throughput: {t['rate']:,.0f} msg/s, {t['msgs_per_cpu_s']:,.0f} msg per "
              f"server CPU-s, lost={t['lost']} errors={t['errors'] + t['sender_errors']}; "
              f"{t['bottleneck']}", flush=True)
        if args.latency:
            lat = run_relay(server, clients, "latency", args, tag + "l")
            result["latency"] = lat
            print(f"[{who}] latency @ {args.rate:g} msg/s: p50 {lat['p50_ms']:.2f} ms, p99 "
                  f"{lat['p99_ms']:.2f} ms ({lat['samples']} samples, achieved "
                  f"{lat['rate']:,.0f} msg/s), {lat['msgs_per_cpu_s']:,.0f} msg per server "
                  f"CPU-s; lost={lat['lost']} errors={lat['errors'] + lat['sender_errors']}; "
                  f"{usage(lat)}", flush=True)
        result["rss_end_kb"] = server.rss_kb()
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on with fresh clients
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{who}] FAILED: {result['failure']}", flush=True)
    finally:
        server.stop()
    result["log_findings"] = scan_log(server.log(), server.nworkers)
    return result


ROWS: list[tuple[str, str, tuple[str, str], str]] = [
    # (key, label, (phase, field), format)
    ("mpcs", "**msgs relayed per server CPU-second** (throughput run)",
     ("throughput", "msgs_per_cpu_s"), ",.0f"),
    ("rate", "throughput (msg/s at the receivers)", ("throughput", "rate"), ",.0f"),
    ("server_util", "server worker CPU, throughput run (cores)",
     ("throughput", "server_util"), ".2f"),
    ("client_util", "load generator CPU, throughput run (cores)",
     ("throughput", "client_util_sum"), ".2f"),
    ("other", "other processes, throughput run (cores)",
     ("throughput", "other_busy_cores"), ".2f"),
    ("lat_mpcs", "msgs per server CPU-second at the paced rate", ("latency", "msgs_per_cpu_s"),
     ",.0f"),
    ("lat_util", "server worker CPU at the paced rate (cores)", ("latency", "server_util"),
     ".2f"),
    ("p50", "latency p50 (ms) at the paced rate", ("latency", "p50_ms"), ".2f"),
    ("p99", "latency p99 (ms) at the paced rate", ("latency", "p99_ms"), ".2f"),
    ("lat_rate", "achieved paced rate (msg/s)", ("latency", "rate"), ",.0f"),
    ("lat_client", "load generator CPU, latency run (cores)", ("latency", "client_util_sum"),
     ".2f"),
]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row: each ref's values over rounds, medians, the ratio of medians B/A, and the
    per-round ratios (round i of B against round i of A)."""
    out: dict[str, Any] = {}
    for key, _label, (phase, field), _spec in ROWS:
        vals = {ref: [(r.get(phase) or {}).get(field) for r in rs] for ref, rs in runs.items()}
        if not any(v is not None for vs in vals.values() for v in vs):
            continue
        med = {ref: median(vs) for ref, vs in vals.items()}
        per_round = [ratio(b, a) for a, b in zip(vals["A"], vals["B"])]
        pr = [x for x in per_round if x is not None]
        # A round is clean for this phase when neither A's nor B's window had other
        # processes above NOISY_CORES (the NOISE threshold).
        clean = [all(((rs[i].get(phase) or {}).get("other_busy_cores") or 0.0)
                     <= NOISY_CORES for rs in runs.values())
                 for i in range(len(per_round))]
        cr = [x for x, ok in zip(per_round, clean) if ok and x is not None]
        out[key] = {"values": vals, "median": med, "ratio_b_a": ratio(med["B"], med["A"]),
                    "round_ratios": per_round,
                    "round_ratio_min": min(pr) if pr else None,
                    "round_ratio_max": max(pr) if pr else None,
                    "round_ratio_median": median(pr),
                    "clean_rounds": clean,
                    "clean_ratio_median": median(cr), "clean_count": len(cr)}
    return out


def table(summary: dict[str, Any], refs: dict[str, dict[str, str]]) -> str:
    a, b = refs["A"], refs["B"]
    rows = [f"| figure | A: {a['ref']} ({a['commit'][:9]}, {a.get('protocol', 'volli')}) | "
            f"B: {b['ref']} ({b['commit'][:9]}, {b.get('protocol', 'volli')}) "
            f"| ratio B/A (of medians) | median of per-round B/A | the same, clean rounds "
            f"only | per-round B/A (min .. max) | A per round | B per round |",
            "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for key, label, _, spec in ROWS:
        s = summary.get(key)
        if not s:
            continue
        rr = s["round_ratios"]
        rows.append(
            f"| {label} | {fmt(s['median']['A'], spec)} | {fmt(s['median']['B'], spec)} | "
            f"{fmt(s['ratio_b_a'], '.3f')} | {fmt(s['round_ratio_median'], '.3f')} | "
            f"{fmt(s['clean_ratio_median'], '.3f')} ({s['clean_count']} of {len(rr)}) | "
            f"{', '.join(fmt(x, '.3f') for x in rr)}"
            f"{' (' + fmt(s['round_ratio_min'], '.3f') + ' .. ' + fmt(s['round_ratio_max'], '.3f') + ')' if len(rr) > 1 else ''} | "
            f"{', '.join(fmt(x, spec) for x in s['values']['A'])} | "
            f"{', '.join(fmt(x, spec) for x in s['values']['B'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ref-a", default="238f7aa",
                    help=f"the reference (denominator): a git ref, or {WORKTREE} for the "
                         f"working tree as it is")
    ap.add_argument("--ref-b", default="HEAD",
                    help=f"the candidate (numerator): a git ref, or {WORKTREE}")
    for key in ("a", "b"):
        ap.add_argument(f"--protocol-{key}", default="volli",
                        choices=[p for p in PROTOCOLS if p.startswith("volli")],
                        help=f"what ref {key.upper()}'s clients send: plaintext offers "
                             "(volli) or sealed ones of the same frame size (volli-sealed)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; the order alternates (A,B then B,A); medians are reported")
    add_relay_options(ap)
    ap.add_argument("--no-latency", dest="latency", action="store_false",
                    help="throughput only")
    ap.add_argument("--json", metavar="PATH",
                    help="results file (default bench/results/<UTC>-refcompare.json)")
    ap.add_argument("--no-save", action="store_true", help="write no JSON unless --json")
    ap.add_argument("--log-dir", metavar="DIR",
                    help="where gunicorn logs and the exported trees go (default: a new "
                         "directory under $TMPDIR)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 10 pairs, 2 s windows, 1,000 msg/s (explicit "
                         "options win)")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(rounds=1, pairs=10, duration=2.0, warmup=0.5, latency_duration=1.5,
                        rate=1000.0, drain_grace=2.0)
    args = ap.parse_args(argv)
    check_relay_options(ap, args)
    # What run_relay and its client processes read from args / opts.
    args.deflate = False
    os.chdir(ROOT)
    soft = rawws.raise_nofile(65536)
    nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-refcompare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    refs: dict[str, dict[str, str]] = {}
    trees: dict[str, Path] = {}
    notes: list[str] = []
    tree_before = None
    for key, ref in (("A", args.ref_a), ("B", args.ref_b)):
        if ref == WORKTREE:
            trees[key] = ROOT
            refs[key] = {"ref": ref, "commit": "working tree"}
            tree_before = machine.server_tree_state()
            print(f"{key}: the working tree {ROOT}", flush=True)
            if tree_before["dirty"]:
                notes.append(f"{key} ran from the working tree with uncommitted changes "
                             f"({', '.join(tree_before['dirty'][:5])})")
            continue
        trees[key] = log_dir / f"tree-{key.lower()}"
        commit = machine.export_tree(ref, trees[key])
        refs[key] = {"ref": ref, "commit": commit}
        print(f"{key}: {ref} = {commit} (exported to {trees[key]})", flush=True)
    if refs["A"]["commit"] == refs["B"]["commit"] and args.protocol_a == args.protocol_b:
        notes.append("A and B are the same commit: the ratio shows the run's noise floor")
    protocols = {"A": args.protocol_a, "B": args.protocol_b}
    checks = {key: check_compact(args.sdp_size, protocol) for key, protocol in protocols.items()}
    compact = checks["A"]
    for key, check in checks.items():
        refs[key]["protocol"] = protocols[key]
        print(f"{key} offers ({protocols[key]}): {check['frame_bytes']} bytes, compact JSON "
              f"(as JSON.stringify writes it): {check['compact_json']}", flush=True)
    opts = {"deflate": False, "sdp_size": args.sdp_size, "window": args.window,
            "rate": args.rate, "procs": args.procs, "max_messages": args.max_messages,
            "connect_concurrency": args.connect_concurrency, "drain_grace": args.drain_grace,
            "conn_concurrency": 100, "handshake_timeout": 20.0, "open_timeout": 120.0,
            "max_failures": 100}
    for note in notes:
        print(f"NOTE: {note}", flush=True)
    print(f"refcompare: {args.rounds} round(s), {args.pairs} pairs, window {args.window}, "
          f"{args.duration:g} s throughput" +
          (f", {args.latency_duration:g} s at {args.rate:g} msg/s" if args.latency else "") +
          f"; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; logs in {log_dir}",
          flush=True)

    machine.interrupt_on_signals()
    started = time.monotonic()
    clients = Clients(args.procs, opts, client_main, "relay-client")
    lean = Clients(args.procs, opts, raw_client_main, "lean-client")
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    interrupted = False
    try:
        for rnd in range(args.rounds):
            order = ["A", "B"] if rnd % 2 == 0 else ["B", "A"]
            print(f"--- round {rnd + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
            for key in order:
                r = run_one(key, ServerConfig(tree=trees[key], nofile=nofile), refs[key]["commit"],
                            clients, lean, args, log_dir, protocols[key])
                r["round"] = rnd + 1
                r["position"] = order.index(key)
                runs[key].append(r)
                if r.get("failure"):  # a client process may still be in the failed phase
                    clients.stop()
                    lean.stop()
                    clients = Clients(args.procs, opts, client_main, "relay-client")
                    lean = Clients(args.procs, opts, raw_client_main, "lean-client")
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", file=sys.stderr)
    finally:
        clients.stop()
        lean.stop()
    elapsed = time.monotonic() - started
    tree_after = machine.server_tree_state() if tree_before else None

    n = min(len(runs["A"]), len(runs["B"]))
    runs = {k: v[:n] for k, v in runs.items()}
    summary = summarize(runs) if n else {}
    md = table(summary, refs) if summary else "(no complete round)"
    print()
    print(f"A = {refs['A']['ref']} ({refs['A']['commit'][:12]}), B = {refs['B']['ref']} "
          f"({refs['B']['commit'][:12]}); medians of {n} round(s); one gevent worker, memory "
          f"backend; {args.pairs} pairs x {args.window} offers in flight, "
          f"{compact['frame_bytes']}-byte compact offers")
    print()
    print(md)
    print()
    problems: list[str] = []
    noise: list[str] = []
    if tree_before and tree_after and tree_after["digest"] != tree_before["digest"]:
        problems.append("Volli's files in the working tree changed during the run: the "
                        f"{WORKTREE} rounds ran different code")
    for key, rs in runs.items():
        for r in rs:
            where = f"{key} ({refs[key]['ref']}) round {r['round']}"
            if r.get("failure"):
                problems.append(f"{where}: run failed: {r['failure']}")
            t = r.get("throughput") or {}
            if t.get("bottleneck"):
                print(f"- {where} throughput: {t['bottleneck']}")
            if t.get("client_bound"):
                print(f"  LOAD GENERATOR: in {where} the client used "
                      f"{t['client_util_sum']:.2f} cores that the server needed too: its "
                      f"msg/s is bound by the shared machine; msgs per server CPU-second "
                      f"still compares, but at a lower server load")
            for phase in ("throughput", "latency"):
                relay_findings(f"{where} {phase}", r.get(phase) or {}, problems, noise)
            lat = r.get("latency") or {}
            if lat and lat.get("rate", 0) < 0.95 * args.rate:
                problems.append(f"{where} latency: achieved only {lat['rate']:.0f} of "
                                f"{args.rate:g} msg/s")
            problems += machine.log_problems(where, r.get("log_findings"))
    machine.print_report(noise, problems, elapsed, log_dir)
    machine.save_results(args, "refcompare", lambda: {
        **machine.describe(), "refs": refs, "args": vars(args), "elapsed_seconds": elapsed,
        "notes": notes, "volli_tree_before": tree_before, "volli_tree_after": tree_after,
        "offer_check": checks, "summary": summary, "table_markdown": md, "results": runs,
        "problems": problems, "noise": noise})
    if interrupted:
        return 130
    return 1 if any(r.get("failure") for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
