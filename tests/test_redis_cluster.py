"""What is Cluster-specific on a real Redis Cluster (3 primaries, a replica each; the
cross-server tests of test_redis.py run on it too): every shard holds presence, node
channels are sharded, takeover and unbind across servers, a shard that lost its state,
and a failover during relays."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_client

from volli.backends.redis import wire
from volli.backends.redis.keys import CLUSTER_GROUPS, Keys
from workers import spread_users

# A test that changes the cluster (a failover, a flushed shard) gets one of its own.
OWN_CLUSTER = pytest.mark.parametrize("deployment", ["own"], indirect=True)


@pytest.fixture
def deployment(request):
    """What conftest's `nodes` starts its servers on: the session's cluster, or (``own``)
    the test's."""
    own = getattr(request, "param", None) == "own"
    return request.getfixturevalue("own_redis_cluster" if own else "redis_cluster")


@pytest.fixture
def cluster(deployment):
    return deployment


def _keys(nodes) -> Keys:
    return Keys(nodes.prefix, CLUSTER_GROUPS)


def _primaries(cluster) -> list[redis_client.Redis]:
    return [cluster.client(shard["primary"]) for shard in cluster.shards()]


def test_presence_lives_on_every_shard_and_node_channels_are_sharded(nodes, open_client,
                                                                     cluster):
    servers = [nodes(), nodes()]
    reps, _ = spread_users(servers, open_client, workers_total=4)
    users = [open_client(servers[i % 2]) for i in range(30)]
    for i, client in enumerate(users):
        assert client.register(f"spread{i}@x")["type"] == "registered"
    prefix = nodes.prefix
    per_shard = [{key.rsplit(":", 1)[1] for key in s.scan_iter(f"{prefix}{{g*}}presence:spread*")}
                 for s in _primaries(cluster)]
    assert all(per_shard) and set().union(*per_shard) == {f"spread{i}@x" for i in range(30)}
    # Each worker listens on its channel in every group (64), none with plain SUBSCRIBE.
    channels = sum(len(s.execute_command("PUBSUB SHARDCHANNELS", f"{prefix}*"))
                   for s in _primaries(cluster))
    assert channels == 4 * 64
    assert not any(s.pubsub_channels(f"{prefix}*") for s in _primaries(cluster))


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


def _shard_of(cluster, keys: Keys, user: str) -> int:
    """The port of the primary that holds ``user``'s presence."""
    return cluster.primary_for(keys.presence(user))


@OWN_CLUSTER
def test_a_shard_that_lost_its_state_recovers_its_groups_only(nodes, open_client, cluster):
    """One shard forgets everything (what a restart with no persistence looks like): the
    groups it serves get a new epoch, their users are announced again and their IDs stay
    refused to others meanwhile; registrations in the other groups go on."""
    a, b = nodes(workers=1, VOLLI_PRESENCE_TTL="2"), nodes(workers=1, VOLLI_PRESENCE_TTL="2")
    users = {f"kept{i}@x": open_client((a, b)[i % 2]) for i in range(24)}
    for user, client in users.items():
        assert client.register(user)["type"] == "registered"
    keys = _keys(nodes)
    shard = {user: _shard_of(cluster, keys, user) for user in users}
    victim = shard[next(iter(users))]
    lost = [user for user in users if shard[user] == victim]
    assert len(lost) < len(users)
    victim_client = redis_client.Redis(port=victim)
    victim_client.flushall()
    # Meanwhile a stranger cannot take a lost user's ID; IDs on the other shards register.
    stranger = open_client(b)
    reply = stranger.request({"type": "register", "userId": lost[0], "publicKey": "K"})
    assert reply.get("code") in ("unavailable", "user-id-taken"), reply
    fresh = [f"fresh{i}@x" for i in range(100) if _shard_of(cluster, keys, f"fresh{i}@x") != victim]
    sender = open_client(a)
    assert sender.register(fresh[0])["type"] == "registered"
    deadline = time.monotonic() + 6
    while not all(victim_client.exists(keys.presence(u)) for u in lost):
        assert time.monotonic() < deadline, "lost users were not announced again"
        time.sleep(0.1)
    assert "may have lost presence state (restarted, paused or failed over) in group" in (
        a.log() + b.log())
    # Relays reach them again, across servers.
    offer = {"type": "offer", "sdp": "x"}
    for target in lost:
        sender.send({"type": "offer", "to": target, "offer": offer})
        assert users[target].recv() == {"type": "offer", "to": target, "offer": offer,
                                        "from": fresh[0]}



def _role(port: int) -> list:
    return redis_client.Redis(port=port).execute_command("ROLE")


@OWN_CLUSTER
def test_failover_of_a_shard_during_relays_loses_nothing_silently(nodes, open_client,
                                                                   cluster):
    """CLUSTER FAILOVER of the shard that holds some users, while relays flow to them:
    every relay is delivered or answered with an error, and afterwards every relay is
    delivered (the listeners have subscribed again where the slots are now)."""
    a, b = nodes(workers=1), nodes(workers=1)
    users = {f"f{i}@x": open_client((a, b)[i % 2]) for i in range(16)}
    for user, client in users.items():
        assert client.register(user)["type"] == "registered"
    keys = _keys(nodes)
    primary = _shard_of(cluster, keys, "f0@x")
    moved = [user for user in users if _shard_of(cluster, keys, user) == primary]
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


def test_a_listener_reads_what_was_published_to_it_before_subscribing_again(
        own_redis_cluster):
    """One shard fails over while a node's listener has relays queued on another shard's
    connection (the node is frozen, as a busy worker is): Redis counted them as received,
    so the listener reads them all before it subscribes again, then hears both shards.
    (Closing the connections at once lost them: the invariant test's failover phase.)"""
    cluster, node, keys = own_redis_cluster, wire.node_id("probe:1:0"), Keys("drain:", CLUSTER_GROUPS)
    probe = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "bus_probe.py"), cluster.url, "drain:", node],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(seconds: float) -> dict:
        probe.stdin.write(f"run {seconds}\n")
        probe.stdin.flush()
        return json.loads(probe.stdout.readline())

    def send(group: int, text: str) -> int:
        channel = keys.channel(group, node)
        with cluster.client(cluster.primary_for(channel)) as shard:
            return shard.spublish(channel, wire.encode(wire.Deliver("u", "", text),
                                                        wire.version_for(node)))

    try:
        for _ in range(20):
            if run(0.5)["subscribed"]:
                break
        shard_of = {g: cluster.primary_for(keys.channel(g, node)) for g in range(CLUSTER_GROUPS)}
        moved = shard_of[0]
        kept = next(g for g in range(CLUSTER_GROUPS) if shard_of[g] != moved)
        sent = [f"m{i}" for i in range(50)]
        assert [send(kept, text) for text in sent] == [1] * len(sent)  # heard, says Redis
        new_primary = cluster.failover(moved)  # the frozen node's connection there ends
        state = run(3.0)
        assert state["got"] == sent and state["recovered"] == 1, (len(state["got"]), state["recovered"])
        assert state["subscribed"], state
        assert shard_of[0] != new_primary == cluster.primary_for(keys.channel(0, node))
        assert send(0, "after") == 1 and send(kept, "after too") == 1
        assert sorted(run(1.0)["got"][len(sent):]) == ["after", "after too"]  # two shards
    finally:
        probe.kill()
        probe.wait()


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
