"""Scale-out on a real 3-primary Redis Cluster: the cross-server tests of test_redis.py
run again with VOLLI_REDIS_URL=redis+cluster://..., plus what is cluster-specific (every
shard holds presence; node channels are sharded; takeover across servers)."""

from __future__ import annotations

import time

import pytest
import redis as redis_client

from redis_topologies_tmp import ClusterServers
from test_redis import (  # noqa: F401 (collected here again, on the cluster)
    test_user_id_taken_and_release_work_across_servers,
    test_users_on_four_workers_of_two_servers_discover_and_relay_every_way,
)
from volli.backends.redis.keys import CLUSTER_GROUPS, Keys
from workers import spread_users

PREFIX = "it:"  # conftest.NODES_PREFIX
KEYS = Keys(PREFIX, CLUSTER_GROUPS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    servers = ClusterServers(tmp_path_factory.mktemp("cluster"))
    yield servers
    servers.stop()


@pytest.fixture
def redis(cluster):  # what conftest's `nodes` starts its servers on
    cluster.flush()
    return cluster


def test_presence_lives_on_every_shard_and_node_channels_are_sharded(nodes, open_client,
                                                                     cluster):
    servers = [nodes(), nodes()]
    reps, _ = spread_users(servers, open_client, workers_total=4)
    users = [open_client(servers[i % 2]) for i in range(30)]
    for i, client in enumerate(users):
        assert client.register(f"spread{i}@x")["type"] == "registered"
    per_shard = [{key.decode().rsplit(":", 1)[1]
                  for key in s.scan_iter(f"{PREFIX}{{g*}}presence:spread*")}
                 for s in cluster.clients]
    assert all(per_shard) and set().union(*per_shard) == {f"spread{i}@x" for i in range(30)}
    # Each worker listens on its channel in every group (64), none with plain SUBSCRIBE.
    channels = sum(len(s.execute_command("PUBSUB SHARDCHANNELS", f"{PREFIX}*"))
                   for s in cluster.clients)
    assert channels == 4 * 64
    assert not any(s.pubsub_channels(f"{PREFIX}*") for s in cluster.clients)


def test_signed_takeover_across_servers_closes_the_old_connection(nodes, open_client):
    from signing import Identity

    a, b = nodes(workers=1), nodes(workers=1)
    me = Identity()
    old, new = open_client(a), open_client(b)
    assert me.register(old, "taken@x")["type"] == "registered"
    assert me.register(new, "taken@x")["type"] == "registered"
    assert old.recv()["type"] == "session-replaced"
    watcher = open_client(a)
    watcher.register("watcher@x")
    assert watcher.call({"type": "discover", "userId": "taken@x"})["online"] is True
    offer = {"type": "offer", "sdp": "x"}
    watcher.send({"type": "offer", "to": "taken@x", "offer": offer})
    assert new.recv() == {"type": "offer", "to": "taken@x", "offer": offer, "from": "watcher@x"}


def test_unbind_on_another_server_closes_the_holder_and_frees_the_id(nodes, open_client):
    from signing import Identity
    from test_attack2_unbind_listener_gap import TOKEN, admin_unbind

    a, b = nodes(workers=1, VOLLI_ADMIN_TOKEN=TOKEN), nodes(workers=1, VOLLI_ADMIN_TOKEN=TOKEN)
    holder = open_client(a)
    assert Identity().register(holder, "lost-key@x")["type"] == "registered"
    assert admin_unbind(b, "lost-key@x") == (200, {"userId": "lost-key@x", "unbound": True})
    assert holder.recv()["type"] == "session-replaced"
    assert Identity().register(open_client(b), "lost-key@x")["type"] == "registered"


def _shard_of(cluster, user: str) -> int:
    """The port of the primary that holds ``user``'s presence."""
    return cluster.router.get_node_from_key(KEYS.presence(user)).port


def test_a_shard_that_lost_its_state_recovers_its_groups_only(nodes, open_client, cluster):
    """One shard forgets everything (what a restart with no persistence looks like): the
    groups it serves get a new epoch, their users are announced again and their IDs stay
    refused to others meanwhile; registrations in the other groups go on."""
    a, b = nodes(workers=1, VOLLI_PRESENCE_TTL="2"), nodes(workers=1, VOLLI_PRESENCE_TTL="2")
    users = {f"kept{i}@x": open_client((a, b)[i % 2]) for i in range(24)}
    for user, client in users.items():
        assert client.register(user)["type"] == "registered"
    shard = {user: _shard_of(cluster, user) for user in users}
    victim = shard[next(iter(users))]
    lost = [user for user in users if shard[user] == victim]
    assert len(lost) < len(users)
    victim_client = redis_client.Redis(port=victim)
    victim_client.flushall()
    # Meanwhile a stranger cannot take a lost user's ID; IDs on the other shards register.
    stranger = open_client(b)
    reply = stranger.request({"type": "register", "userId": lost[0], "publicKey": "K"})
    assert reply.get("code") in ("unavailable", "user-id-taken"), reply
    fresh = [f"fresh{i}@x" for i in range(100) if _shard_of(cluster, f"fresh{i}@x") != victim]
    sender = open_client(a)
    assert sender.register(fresh[0])["type"] == "registered"
    deadline = time.monotonic() + 6
    while not all(victim_client.exists(KEYS.presence(u)) for u in lost):
        assert time.monotonic() < deadline, "lost users were not announced again"
        time.sleep(0.1)
    assert "lost its presence state (restarted empty or paused) in group" in a.log() + b.log()
    # Relays reach them again, across servers.
    offer = {"type": "offer", "sdp": "x"}
    for target in lost:
        sender.send({"type": "offer", "to": target, "offer": offer})
        assert users[target].recv() == {"type": "offer", "to": target, "offer": offer,
                                        "from": fresh[0]}



def _role(port: int) -> list:
    return redis_client.Redis(port=port).execute_command("ROLE")


def test_failover_of_a_shard_during_relays_loses_nothing_silently(nodes, open_client,
                                                                   cluster):
    """CLUSTER FAILOVER of the shard that holds some users, while relays flow to them:
    every relay is delivered or answered with an error, and afterwards every relay is
    delivered (the listeners have subscribed again where the slots are now)."""
    a, b = nodes(workers=1), nodes(workers=1)
    users = {f"f{i}@x": open_client((a, b)[i % 2]) for i in range(16)}
    for user, client in users.items():
        assert client.register(user)["type"] == "registered"
    primary = _shard_of(cluster, "f0@x")
    moved = [user for user in users if _shard_of(cluster, user) == primary]
    replica = next(p for p in cluster.ports if _role(p)[0] == b"slave" and _role(p)[2] == primary)
    senders = {target: users[next(u for u in users if u not in moved and
                                  users[u] is not users[target])] for target in moved}
    redis_client.Redis(port=replica).execute_command("CLUSTER FAILOVER")
    outcomes = {"delivered": 0, "error": 0, "lost": 0}
    end = time.monotonic() + 30
    delivered_after = set()
    n = 0
    while time.monotonic() < end and len(delivered_after) < len(moved):
        failed_over = _role(replica)[0] == b"master"
        for target in moved:
            n += 1
            offer = {"type": "offer", "sdp": str(n)}
            sender = senders[target]
            sender.send({"type": "offer", "to": target, "offer": offer})
            outcome = _outcome(users[target], sender, offer)
            outcomes[outcome] += 1
            if failed_over and outcome == "delivered":
                delivered_after.add(target)
        time.sleep(0.1)
    print(outcomes, f"{len(delivered_after)}/{len(moved)} reachable after the failover")
    assert _role(replica)[0] == b"master"
    assert outcomes["lost"] == 0 and delivered_after == set(moved)


def _outcome(receiver, sender, offer) -> str:
    try:
        got = receiver.recv(timeout=2)
        assert got["offer"] == offer, got
        return "delivered"
    except TimeoutError:
        pass
    try:
        reply = sender.recv(timeout=0.5)
        assert reply["type"] == "error", reply
        return "error"
    except TimeoutError:
        return "lost"
