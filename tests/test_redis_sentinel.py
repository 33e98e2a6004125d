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
    moves its clients and its listener to the new primary within a few seconds, sees the
    primary change as a new epoch (announces its users again; registrations wait a TTL),
    and its users stay registered and reachable throughout."""
    ttl = 3.0
    a, b = (nodes(workers=1, VOLLI_PRESENCE_TTL=str(ttl)) for _ in range(2))
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
    while (reply := carol.request({"type": "register", "userId": "carol@x",
                                   "publicKey": "K"})).get("type") != "registered":
        assert reply.get("code") == "unavailable", reply  # the window after a new epoch
        assert time.monotonic() < moved_at + ttl + 4, "registrations do not reach the new primary"
        time.sleep(0.2)
    assert redis_client.Redis(port=new_primary).exists(f"{nodes.prefix}presence:carol@x")
    assert _relays(carol, bob, "bob@x", "carol@x") and _relays(bob, alice, "alice@x", "bob@x")
    for node in (a, b):
        assert "redis listener lost" in node.log() and "redis listener recovered" in node.log()
        assert "may have lost presence state (restarted, paused or failed over)" in node.log()
    # Both users were announced again on the new primary.
    assert all(redis_client.Redis(port=new_primary).exists(f"{nodes.prefix}presence:{user}")
               for user in ("alice@x", "bob@x"))


def test_a_promoted_replica_starts_a_new_epoch(own_redis_sentinel):
    """The scripts themselves, on the real primary and on the replica the Sentinels promote:
    the store's epoch records its primary's replication ID, so the first script on the new
    primary (which may lack writes the old one acknowledged) begins a new epoch; claims are
    refused for a TTL while nodes announce their users again, and a route finding a node
    whose alive key is gone does not delete its presence (the node may still be writing
    to the old primary)."""
    from volli.backends.redis import scripts, wire
    from volli.backends.redis.keys import Keys

    deployment, keys, ttl = own_redis_sentinel, Keys("ep:"), 10_000
    node, session = "n1/w1", "s1"

    def on(port):
        client = redis_client.Redis(port=port)
        beat, claim, route = (client.register_script(s)
                              for s in (scripts.BEAT, scripts.CLAIM, scripts.ROUTE))

        def claim_(user, epoch, refresh="0"):
            reply = claim(keys=keys.claim(user),
                          args=[node, session, "K", ttl, "0", refresh, ttl, 100, user, epoch,
                                "fresh", keys.channel_prefix(0), wire.header(b"R"),
                                wire.header(b"R", 0), wire.header(b"P")])
            return [int(reply[0]), *(r.decode() for r in reply[1:2] if isinstance(r, bytes))]

        def route_(user):
            return route(keys=[keys.presence(user), keys.epoch(0), keys.watchers(user)],
                         args=[keys.channel_prefix(0), b"x", keys.alive_prefix(0),
                               wire.header(b"D"), wire.header(b"D", 0), user,
                               wire.header(b"P")])

        return client, (lambda mine: beat(keys=[keys.epoch(0), keys.alive_prefix(0) + node],
                                          args=[ttl, "first", mine])[0].decode()), claim_, route_

    client, beat, claim, route = on(deployment.primary)
    epoch = beat("")
    assert claim("u1@x", epoch)[0] == 1
    assert client.wait(1, 2000) == 1  # the replica has it all: nothing here is lost
    client, beat, claim, route = on(deployment.failover(demote=False))
    client.delete(keys.alive_prefix(0) + node)  # as if the node still beat on the old one
    assert route("u1@x")[0] == 0 and client.exists(keys.presence("u1@x"))
    code, new_epoch = claim("u2@x", epoch)
    assert code == scripts.EPOCH_CHANGED and new_epoch != epoch
    assert claim("u2@x", new_epoch) == [scripts.RECOVERING]
    assert claim("u1@x", new_epoch, refresh="1")[0] == 1  # announced again: allowed
    assert route("u1@x")[0] == 0 and client.exists(keys.presence("u1@x"))
    # Once the window is over, a dead node's presence goes at the first route, as before.
    client.hset(keys.epoch(0), "until", 0)
    assert route("u1@x")[0] == 0 and not client.exists(keys.presence("u1@x"))
