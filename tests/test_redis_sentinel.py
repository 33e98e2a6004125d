"""Scale-out behind Redis Sentinel (a primary, a replica, three Sentinels, all real):
relays across servers, and a failover during which the listener and every client move
to the new primary."""

from __future__ import annotations

import time

import pytest
import redis as redis_client

from redis_topologies_tmp import SentinelServers, until
from test_redis import (  # noqa: F401 (collected here again, behind Sentinel)
    test_user_id_taken_and_release_work_across_servers,
)

@pytest.fixture(scope="module")
def sentinels(tmp_path_factory):
    servers = SentinelServers(tmp_path_factory.mktemp("sentinel"))
    yield servers
    servers.stop()


@pytest.fixture
def redis(sentinels):  # what conftest's `nodes` starts its servers on
    redis_client.Redis(port=sentinels.primary_port()).flushall()
    return sentinels


def _relays(sender, receiver, to: str, frm: str) -> bool:
    offer = {"type": "offer", "sdp": frm}
    sender.send({"type": "offer", "to": to, "offer": offer})
    return receiver.recv(timeout=3) == {"type": "offer", "to": to, "offer": offer, "from": frm}


def test_failover_moves_every_node_to_the_new_primary(nodes, open_client, sentinels):
    # Sentinel demotes the old primary only seconds after promoting the replica; clients
    # keep writing to the old one until then, so the new one may have missed heartbeats
    # and open a recovery window of one TTL (short here).
    a, b = nodes(workers=1, VOLLI_PRESENCE_TTL="4"), nodes(workers=1, VOLLI_PRESENCE_TTL="4")
    alice, bob = open_client(a), open_client(b)
    alice.register("alice@x")
    bob.register("bob@x")
    assert _relays(alice, bob, "bob@x", "alice@x") and _relays(bob, alice, "alice@x", "bob@x")
    new_primary = sentinels.failover()
    assert new_primary == sentinels.replica
    # Both servers' listeners resubscribe on the new primary, and registrations work there.
    until(lambda: len(redis_client.Redis(port=new_primary).pubsub_channels("it:node:*")) == 2,
          "the listeners did not move to the new primary", 20)
    carol = open_client(a)
    deadline = time.monotonic() + 15
    while carol.request({"type": "register", "userId": "carol@x",
                         "publicKey": "K"}).get("type") != "registered":
        assert time.monotonic() < deadline, "registrations do not work after the failover"
        time.sleep(0.2)
    assert redis_client.Redis(port=new_primary).exists("it:presence:carol@x")
    assert _relays(carol, bob, "bob@x", "carol@x") and _relays(bob, alice, "alice@x", "bob@x")
    assert "redis listener lost" in a.log() and "redis listener recovered" in a.log()
