#!/usr/bin/env python
"""What the failover check costs a registration: the register (claim) script with the
epoch's primary check (``INFO replication`` inside the script, volli/backends/redis/scripts.py)
against the same script with that check taken out, on one private redis-server.

Run from the repo root:  python bench/claim_script.py [--calls 20000] [--rounds 3]

Each round runs --calls claims of distinct unsigned user IDs with each script, alternating
which goes first, through one redis-py connection (no pipelining). Reported per script:
Redis CPU per call (INFO commandstats, usec_per_call of EVALSHA) and the client's wall
time per call, and the ratio check/no-check of their medians; a heartbeat (BEAT script)
the same way. Loops are bounded by --calls and --rounds; the server is stopped on exit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.relaybench.servers import RedisServer  # noqa: E402
from volli.backends.redis import scripts  # noqa: E402

TTL_MS = 15_000
# The baseline: the primary check gone (every epoch records '' and never differs).
NO_CHECK = "local primary = ''\n"


def without_check(text: str) -> str:
    assert scripts._PRIMARY in text
    return text.replace(scripts._PRIMARY, NO_CHECK)


def run(client: redis.Redis, prefix: str, calls: int) -> dict[str, float]:
    """Calls of CLAIM and BEAT under ``prefix`` (its own epoch); Redis and wall µs per call."""
    claim = client.register_script(CLAIM[prefix])
    beat = client.register_script(BEAT[prefix])
    epoch = f"{prefix}epoch"
    node = "bench:1:0/w1"
    epoch_id = beat(keys=[epoch, f"{prefix}alive:{node}"], args=[TTL_MS, "e1", ""])[0]
    figures = {}
    for name, call in (
        ("claim", lambda i: claim(
            keys=[f"{prefix}presence:u{i}", f"{prefix}key:u{i}", f"{prefix}bindings",
                  f"{prefix}watch:u{i}", epoch, f"{prefix}held-meta:u{i}"],
            args=[node, f"s{i}", "pk", TTL_MS, "0", "0", 60_000, 1_000_000, f"u{i}",
                  epoch_id, "e2", f"{prefix}node:", "R", "R", "P"])),
        ("beat", lambda i: beat(keys=[epoch, f"{prefix}alive:{node}"],
                                args=[TTL_MS, "e3", epoch_id]))):
        client.config_resetstat()
        started = time.perf_counter()
        for i in range(calls):
            reply = call(i)
            if name == "claim" and int(reply[0]) != 1:
                raise RuntimeError(f"claim {i} refused: {reply}")
        wall = time.perf_counter() - started
        stats = client.info("commandstats")["cmdstat_evalsha"]
        figures[f"{name} redis us"] = stats["usec_per_call"]
        figures[f"{name} wall us"] = wall / calls * 1e6
    return figures


CLAIM = {"check:": scripts.CLAIM, "nocheck:": without_check(scripts.CLAIM)}
BEAT = {"check:": scripts.BEAT, "nocheck:": without_check(scripts.BEAT)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="volli-claim-")))
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        results: dict[str, list[dict[str, float]]] = {"check:": [], "nocheck:": []}
        for r in range(args.rounds):
            order = ["check:", "nocheck:"] if r % 2 == 0 else ["nocheck:", "check:"]
            for prefix in order:
                client.flushall()
                results[prefix].append(run(client, prefix, args.calls))
        print(f"{args.calls} calls x {args.rounds} rounds; medians (µs per call)")
        print(f"{'figure':<16}{'no check':>10}{'check':>10}{'ratio':>8}")
        for figure in results["check:"][0]:
            base = statistics.median(r[figure] for r in results["nocheck:"])
            with_check = statistics.median(r[figure] for r in results["check:"])
            print(f"{figure:<16}{base:>10.2f}{with_check:>10.2f}{with_check / base:>8.2f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
