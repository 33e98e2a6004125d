"""Behind Redis Sentinel (a primary, a replica, three Sentinels, all real; the
cross-server tests of test_redis.py run there too): a failover during which the listener
and every client move to the new primary."""

from __future__ import annotations

import time

import pytest
import redis as redis_client

from redis_topologies import wait


@pytest.fixture
def deployment(own_redis_sentinel):
    """What conftest's `nodes` starts its servers on: a deployment of the test's own (it
    fails over)."""
    return own_redis_sentinel


def _relays(sender, receiver, to: str, frm: str) -> bool:
    offer = {"type": "offer", "sdp": frm}
    sender.send({"type": "offer", "to": to, "offer": offer})
    return receiver.recv(timeout=3) == {"type": "offer", "to": to, "offer": offer, "from": frm}


def test_failover_moves_every_node_to_the_new_primary(nodes, open_client, deployment):
    """SENTINEL FAILOVER with the old primary left as it is (the Sentinels demote it only
    at their next check, up to 10 s later, and it takes writes until then): every node
    moves its clients and its listener to the new primary within a few seconds."""
    a, b = nodes(workers=1), nodes(workers=1)
    alice, bob = open_client(a), open_client(b)
    alice.register("alice@x")
    bob.register("bob@x")
    assert _relays(alice, bob, "bob@x", "alice@x") and _relays(bob, alice, "alice@x", "bob@x")
    replica = deployment.replica
    new_primary = deployment.failover(demote=False)
    assert new_primary == replica
    moved_at = time.monotonic()
    # Both servers' listeners subscribe again on the new primary, registrations land there.
    wait("the listeners moved to the new primary", lambda: len(redis_client.Redis(
        port=new_primary).pubsub_channels(f"{nodes.prefix}node:*")) == 2, 4)
    carol = open_client(a)
    while carol.request({"type": "register", "userId": "carol@x",
                         "publicKey": "K"}).get("type") != "registered":
        assert time.monotonic() < moved_at + 5, "registrations do not reach the new primary"
        time.sleep(0.2)
    assert redis_client.Redis(port=new_primary).exists(f"{nodes.prefix}presence:carol@x")
    assert _relays(carol, bob, "bob@x", "carol@x") and _relays(bob, alice, "alice@x", "bob@x")
    assert "redis listener lost" in a.log() and "redis listener recovered" in a.log()
