#!/usr/bin/env python
"""What a presence change costs: a user with 1,000 watchers goes online and offline,
against a relay of a 1.5 KB offer, on the same server in the same run.

Run from the repo root:  python bench/presence.py [--watchers 1000] [--cycles 60]
                                                  [--relays 3000] [--no-redis]

For Volli with one worker on the memory backend and (unless --no-redis) on a private
redis-server (relaybench's servers, VOLLI_PRESENCE_DEBOUNCE=0), measured in this order:

1. relays: --relays offers of about 1.5 KB from one connection to another, each read by
   the receiver before the next is sent; cost = server CPU (worker, and redis-server)
   per relay;
2. cycles without watchers: --cycles times, a connection registers ``target@bench`` and
   closes, then 0.3 s pass (the offline announcement waits for the presence tick, 0.2 s);
3. the same cycles while --watchers connections watch ``target@bench``; afterwards every
   watcher must have received exactly two ``presence`` messages per cycle.

Cost of one presence change = (CPU of 3 - CPU of 2) / (2 x cycles); reported per change,
per watcher told, and as a ratio to one relay. Loopback only; every loop is bounded;
servers are stopped on exit. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rawws import BlockingWS, parse_target, raise_nofile  # noqa: E402
from bench.relaybench.protocol import make_sdp  # noqa: E402
from bench.relaybench.servers import Server, ServerConfig, start_redis  # noqa: E402

TARGET = "target@bench"
OFFLINE_WAIT = 0.3  # > the presence tick (volli/tasks.py PRESENCE_TICK)


def cpu(server: Server, redis) -> float:
    return server.cpu() + (redis.cpu() if redis is not None else 0.0)


def relays(server: Server, redis, count: int) -> float:
    target = parse_target("volli", server.url)
    a, b = BlockingWS(target, "relay-a@bench"), BlockingWS(target, "relay-b@bench")
    frame = json.dumps({"type": "offer", "to": "relay-b@bench",
                        "offer": {"type": "offer", "sdp": make_sdp(1500)}}).encode()
    try:
        start = cpu(server, redis)
        for _ in range(count):
            a.send_text(frame)
            b.recv_text()
        return (cpu(server, redis) - start) / count
    finally:
        a.close()
        b.close()


def cycles(server: Server, redis, count: int) -> float:
    target = parse_target("volli", server.url)
    start = cpu(server, redis)
    for _ in range(count):
        BlockingWS(target, TARGET).close()
        time.sleep(OFFLINE_WAIT)
    return cpu(server, redis) - start


def run(server: Server, redis, args) -> dict[str, float]:
    target = parse_target("volli", server.url)
    relay = relays(server, redis, args.relays)
    alone = cycles(server, redis, args.cycles)
    watchers = []
    try:
        watch = json.dumps({"type": "watch", "userIds": [TARGET]}).encode()
        for i in range(args.watchers):
            ws = BlockingWS(target, f"watcher{i}@bench")
            watchers.append(ws)
            ws.send_text(watch)
            reply = json.loads(ws.recv_text())
            if reply.get("type") != "watching":
                raise RuntimeError(f"watch refused: {reply}")
        watched = cycles(server, redis, args.cycles)
        told = 0
        for ws in watchers:
            ws.sock.settimeout(5)
            for _ in range(2 * args.cycles):
                if json.loads(ws.recv_text()).get("type") == "presence":
                    told += 1
        expected = 2 * args.cycles * args.watchers
        if told != expected:
            raise RuntimeError(f"watchers were told {told} changes, expected {expected}")
    finally:
        for ws in watchers:
            ws.close()
    change = (watched - alone) / (2 * args.cycles)
    return {"cpu per relay (us)": relay * 1e6, "cpu per change (us)": change * 1e6,
            "cpu per watcher told (us)": change / args.watchers * 1e6,
            "change / relay": change / relay}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--relays", type=int, default=3000)
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    raise_nofile(args.watchers + 1000)
    log_dir = Path(tempfile.mkdtemp(prefix="volli-presence-"))
    config = ServerConfig(slots=args.watchers + 200, nofile=args.watchers + 1000)
    results = {}
    for scenario in ("volli",) + (() if args.no_redis else ("redis-1w",)):
        redis = start_redis("single", log_dir) if scenario != "volli" else None
        server = Server(scenario, log_dir, config, redis)
        server.env.update({"VOLLI_PRESENCE_DEBOUNCE": "0",
                           "VOLLI_WATCH_PER_MINUTE": "1000000"})
        try:
            server.start()
            results[scenario] = run(server, redis, args)
        finally:
            server.stop()
            if redis is not None:
                redis.stop()
    print(f"\n{args.watchers} watchers, {args.cycles} online/offline cycles, "
          f"{args.relays} relays (logs: {log_dir})")
    names = list(next(iter(results.values())))
    print(f"{'':28}" + "".join(f"{s:>12}" for s in results))
    for name in names:
        print(f"{name:28}" + "".join(f"{r[name]:>12.2f}" for r in results.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
