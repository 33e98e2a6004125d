#!/usr/bin/env python
"""Presence invariant soak (issue 12): the workload, faults and checker of
tests/test_presence_invariant.py for longer, with random faults.

Run from the repo root:  python bench/invariant_soak.py                      (5 minutes)
                         python bench/invariant_soak.py --seed 7 --minutes 20 --clients 30

Starts a private redis-server and 2 gunicorn servers x 2 gevent workers of the working
tree (tests/conftest.py's Server: permissive rate limits, no per-IP limits) sharing one
Redis prefix, with short timings (--ttl, --register-timeout, --ping-interval). Then phases:
a quiet one, a random fault (Redis stopped then started empty, restarted empty, or paused
with DEBUG SLEEP for 0.3-1.8 x the presence TTL), a quiet one, ... each followed by its
settle and the checker (tests/invariant.py). Prints per-phase figures and every violation
(must be none), writes JSON to bench/results/<UTC>-invariant.json. Every loop is bounded in
count and time; servers are stopped on exit, error and ^C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402
from conftest import RedisServer, Server  # noqa: E402
from invariant import (Cluster, Settings, run, server_env,  # noqa: E402
                       soak_schedule)

TOTALS = ("registered", "takeover-registered", "session-replaced", "collision-refused",
          "burst", "burst-conns", "rotated", "deadline-race", "deadline-registered",
          "close-abrupt", "close-clean", "relay-sent", "relay-delivered", "relay-reported",
          "relay-notified", "relay-sender-closed", "relay-target-closed", "probe-delivered",
          "presence-checks", "register-unavailable")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1201)
    parser.add_argument("--minutes", type=float, default=5.0, help="about this much wall time")
    parser.add_argument("--clients", type=int, default=24,
                        help="registered workload connections kept at most")
    parser.add_argument("--ids", type=int, default=26, help="user IDs in the pool")
    parser.add_argument("--ttl", type=float, default=3.0, help="VOLLI_PRESENCE_TTL")
    parser.add_argument("--register-timeout", type=float, default=1.0)
    parser.add_argument("--ping-interval", type=float, default=2.0)
    parser.add_argument("--json", help="write results here instead of bench/results/")
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    settings = Settings(args.ttl, args.register_timeout, args.ping_interval)
    schedule = soak_schedule(random.Random(args.seed), settings, args.minutes)
    log_dir = Path(tempfile.mkdtemp(prefix="invariant-soak-"))
    started = time.monotonic()
    redis = RedisServer(log_dir)
    servers: list[Server] = []
    try:
        env = server_env(settings, redis.url, prefix="soak:", workers=2)
        servers = [Server(log_dir, env), Server(log_dir, env)]
        for srv in servers:
            srv.wait_ready()
        print(f"seed {args.seed}: {len(schedule)} phases, 2 servers x 2 workers, "
              f"{settings}")
        report = run(Cluster(servers, redis), settings, args.seed, schedule,
                     clients=args.clients, ids=args.ids)
    finally:
        for srv in servers:
            srv.stop()
        redis.stop()
    elapsed = time.monotonic() - started
    print("\ntotals: " + " ".join(f"{k}={report.counts[k]}" for k in TOTALS))
    print(report.describe(limit=200))
    machine.save_results(args, "invariant", lambda: {
        **machine.describe(), "args": vars(args), "settings": dataclasses.asdict(settings),
        "seconds": round(elapsed, 1), "totals": {k: report.counts[k] for k in TOTALS},
        "counts": dict(report.counts), "phases": report.phases,
        "violations_by_kind": dict(report.by_kind()),
        "violations": [dataclasses.asdict(v) for v in report.violations]})
    machine.print_report([], [], elapsed, log_dir)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
