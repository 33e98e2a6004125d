"""Volli's node bus on its own, listening on a real Redis (tests/test_redis_cluster.py).

It runs only while told to: between commands the whole process blocks on stdin (gevent
does not patch it), so Redis queues what is published to it meanwhile. Each stdin line
``run <seconds>`` lets it run that long, then prints one JSON line of its state.
Usage: python tests/bus_probe.py <VOLLI_REDIS_URL> <prefix> <node id>
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from volli import redis_connect  # noqa: E402
from volli.backends.base import NO_EVENTS  # noqa: E402
from volli.backends.redis.bus import Bus  # noqa: E402
from volli.backends.redis.clients import make_client  # noqa: E402
from volli.backends.redis.keys import CLUSTER_GROUPS, Keys  # noqa: E402


def main(url: str, prefix: str, node: str) -> None:
    settings = SimpleNamespace(redis_topology=redis_connect.parse(url))
    cluster = settings.redis_topology.kind == redis_connect.CLUSTER
    # As RedisBackend builds them.
    client = make_client(settings, socket_timeout=5, connect_timeout=2, retries=2)
    listener = make_client(settings, socket_timeout=None, connect_timeout=2, retries=0)
    state = {"got": [], "recovered": 0, "subscribed": False}

    def recovered() -> None:
        state["recovered"] += 1

    def handle(message) -> None:
        state["got"].append(message.text)
        gevent.sleep(0)  # as on a busy worker, other greenlets run between two relays

    bus = Bus(Keys(prefix, CLUSTER_GROUPS if cluster else 1), node, NO_EVENTS, client,
              listener, handle, recovered)
    gevent.spawn(bus.listen)
    for line in sys.stdin:
        command, seconds = line.split()
        assert command == "run", line
        gevent.sleep(float(seconds))
        state["subscribed"] = bus.subscribed
        print(json.dumps(state), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
