"""The presence invariant of issue 12 under a seeded random workload and Redis faults, on
2 real gunicorn servers x 2 gevent workers sharing one real redis-server (tests/invariant.py
has the workload, model and checker; bench/invariant_soak.py runs it for longer).

Reproduce a failure with its seed: VOLLI_INVARIANT_SEED=<seed> pytest
tests/test_presence_invariant.py (the report names the phase, the ID and the clients).
"""

from __future__ import annotations

import os
import time

from conftest import Server
import pytest

from invariant import Cluster, Settings, ci_schedule, failover_schedule, run, server_env

SEED = int(os.environ.get("VOLLI_INVARIANT_SEED", "1201"))
SETTINGS = Settings(ttl=3.0, register_timeout=1.0, ping_interval=2.0)
# The workload must have done these, at least, for a pass to mean anything.
MINIMUM = {"registered": 40, "session-replaced": 5, "takeover-registered": 3,
           "collision-refused": 2, "burst": 2, "rotated": 1, "deadline-race": 4,
           "relay-delivered": 100, "relay-reported": 5, "probe-delivered": 40}


# A failover schedule is shorter: what it must have done at least.
FAILOVER_MINIMUM = {"registered": 20, "session-replaced": 2, "relay-delivered": 50,
                    "probe-delivered": 20}


def test_one_live_connection_per_id_and_online_exactly_while_open(tmp_path, redis):
    _check(tmp_path, redis, ci_schedule(SETTINGS), MINIMUM)


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_the_invariant_holds_through_a_failover(tmp_path, request, kind):
    """Redis Cluster (every shard's primary fails over in turn) and Sentinel, while
    clients register, take over and relay: no double holder, nothing lost silently."""
    _check(tmp_path, request.getfixturevalue(f"own_redis_{kind}"), failover_schedule(),
           FAILOVER_MINIMUM)


def _check(tmp_path, deployment, schedule, minimum) -> None:
    env = server_env(SETTINGS, deployment.url, prefix="inv:", workers=2)
    servers = [Server(tmp_path, env), Server(tmp_path, env)]
    started = time.monotonic()
    try:
        for srv in servers:
            srv.wait_ready()
        report = run(Cluster(servers, deployment), SETTINGS, SEED, schedule)
    finally:
        for srv in servers:
            srv.stop()
    print(f"{time.monotonic() - started:.0f}s, counts: {dict(sorted(report.counts.items()))}")
    assert not report.violations, report.describe()
    done = {key: report.counts[key] for key in minimum}
    assert all(done[key] >= n for key, n in minimum.items()), (done, minimum)
