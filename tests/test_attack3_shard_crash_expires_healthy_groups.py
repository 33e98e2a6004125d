"""Attack 3 on the Redis Cluster backend: one shard's primary crashes (a normal event: its
replica takes over after cluster-node-timeout). The heartbeat stamps every group's epoch in
one pipelined round trip, and any failure in it aborts the whole heartbeat, so while one
shard is unreachable the presences of users in the *healthy* groups are not renewed
either. docs/scaling.md: "registrations in that group are refused during that group's
recovery window; the other groups go on". Here a connected user's presence on a healthy
shard expires (key gone from its own, healthy shard) while another shard fails over, and
meanwhile a relay between two users of healthy shards and a registration in a healthy
group are both answered `unavailable`: every node's listener and heartbeat treat one
shard's loss as the loss of all of Redis. (No two live holders were seen: claims are
refused while the node is unhealthy.)
"""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_client

from volli.backends.redis.keys import CLUSTER_GROUPS, Keys

OWN_CLUSTER = pytest.mark.parametrize("deployment", ["own"], indirect=True)


@pytest.fixture
def deployment(request):
    return request.getfixturevalue("own_redis_cluster")


def _shard_of(cluster, keys, user):
    return cluster.primary_for(keys.presence(user))


def test_a_shard_crash_does_not_expire_users_of_other_shards(nodes, open_client, deployment):
    cluster = deployment
    a = nodes(workers=1, VOLLI_PRESENCE_TTL="2")
    b = nodes(workers=1, VOLLI_PRESENCE_TTL="2")
    keys = Keys(nodes.prefix, CLUSTER_GROUPS)
    users = [f"h{i}@x" for i in range(64)]
    healthy = users[0]
    victim = next(p for p in (s["primary"] for s in cluster.shards())
                  if p != _shard_of(cluster, keys, healthy))
    holder = open_client(a)
    assert holder.register(healthy)["type"] == "registered"
    sender_id = next(u for u in users[1:] if _shard_of(cluster, keys, u) != victim)
    sender = open_client(b)
    assert sender.register(sender_id)["type"] == "registered"
    relay_reply = None
    home = redis_client.Redis(port=_shard_of(cluster, keys, healthy))
    assert home.exists(keys.presence(healthy))

    crash = threading.Thread(target=cluster.crash, args=(victim,), daemon=True)
    crash.start()
    gone_at = None
    stranger_reply = None
    end = time.monotonic() + 15
    while crash.is_alive() and time.monotonic() < end:
        try:
            there = home.exists(keys.presence(healthy))
        except redis_client.RedisError:
            there = True  # the cluster says it is down: nobody can claim now
        if not there and gone_at is None:
            gone_at = time.monotonic()
            sender.send({"type": "offer", "to": healthy, "offer": {"sdp": "x"},
                         "requestId": "r1"})
            try:
                relay_reply = sender.recv(timeout=2)
            except TimeoutError:
                relay_reply = "no reply"
            stranger = open_client(b)
            stranger_reply = stranger.request({"type": "register", "userId": healthy,
                                               "publicKey": "cHVibGljLWtleQ=="})
        time.sleep(0.05)
    crash.join(20)
    # The holder is still connected (nothing closed it) ...
    assert gone_at is None, (
        f"{healthy}'s presence (on a healthy shard) expired while another shard failed "
        f"over; a relay to it from {sender_id} (healthy shard too) got {relay_reply!r}; a stranger "
        f"registering it on another server got {stranger_reply!r}\n"
        + "\n".join(l for l in (a.log() + b.log()).splitlines() if "redis" in l.lower())[-3000:])
