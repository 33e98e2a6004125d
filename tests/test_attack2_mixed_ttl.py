"""Regression test of a second attack on 1784929 (issue 12): servers sharing one Redis
prefix with different VOLLI_PRESENCE_TTL. The lost-store threshold and the recovery
window came from the TTL of whichever server ran the script, while the presences carried
their own server's TTL: a pause could expire the short-TTL server's users without any
window (a live ID was taken, 3 of 3 trials), and a short-TTL server's start opened a
window as long as the long TTL for everyone. Now the first server of an epoch writes its
TTL into the epoch record and a server with another TTL does not start.
"""

from __future__ import annotations

from conftest import NODES_PREFIX, Server


def test_a_server_with_another_presence_ttl_does_not_start(nodes, store, redis, tmp_path):
    first = nodes(workers=1, VOLLI_PRESENCE_TTL="3")
    assert store.hget(f"{NODES_PREFIX}epoch", "ttl") == b"3000"
    other = Server(tmp_path, {"VOLLI_REDIS_URL": redis.url, "VOLLI_REDIS_PREFIX": NODES_PREFIX,
                              "VOLLI_PRESENCE_TTL": "30"})
    try:
        assert other.wait_exit(30) != 0
        assert "VOLLI_PRESENCE_TTL is 30 s here but 3 s on the servers already sharing" \
            in other.log()
    finally:
        other.stop()
    # The first server goes on, and one with the same TTL joins it.
    same = nodes(workers=1, VOLLI_PRESENCE_TTL="3")
    assert first.http("/health")[0] == 200 and same.http("/health")[0] == 200
