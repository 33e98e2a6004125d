"""Scale-out on Redis: several gunicorn servers and workers sharing one real redis-server."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request

import pytest
import redis as redis_client
from websockets.exceptions import ConnectionClosed

from conftest import DEPLOYMENTS, Client, Server
from signing import Identity
from workers import spread_users

# The cross-server protocol tests run on one Redis and a Redis Cluster; the first also on
# Sentinel, whose keys and scripts are one Redis's (its own failover tests are in
# test_redis_sentinel.py and test_presence_invariant.py): the suite stays near 15 minutes.
ACROSS_DEPLOYMENTS = pytest.mark.parametrize("deployment", ("single", "cluster"),
                                             indirect=True)
EVERY_DEPLOYMENT = pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)



def assert_all_relay(reps: dict[str, Client]) -> None:
    for a, ca in reps.items():
        for b, cb in reps.items():
            if a == b:
                continue
            found = ca.call({"type": "discover", "userId": b})
            assert found["online"] is True and found["publicKey"] == "key" + b[1:b.index("@")]
            for kind, field, payload in (("offer", "offer", {"type": "offer", "sdp": a}),
                                         ("answer", "answer", {"type": "answer", "sdp": a}),
                                         ("ice-candidate", "candidate", {"candidate": a}),
                                         ("ice-candidate", "candidate", None)):
                ca.send({"type": kind, "to": b, field: payload})
                assert cb.recv() == {"type": kind, "to": b, field: payload, "from": a}


@EVERY_DEPLOYMENT
def test_users_on_four_workers_of_two_servers_discover_and_relay_every_way(nodes, open_client):
    servers = [nodes(), nodes()]
    reps, _ = spread_users(servers, open_client, workers_total=4)
    assert_all_relay(reps)


@ACROSS_DEPLOYMENTS
def test_user_id_taken_and_release_work_across_servers(nodes, open_client):
    a, b = nodes(workers=1), nodes(workers=1)
    first = open_client(a)
    first.register("alice@volli.app")
    second = open_client(b)
    reply = second.request({"type": "register", "userId": "alice@volli.app", "publicKey": "K"})
    assert reply["code"] == "user-id-taken"
    first.close()
    deadline = time.monotonic() + 5
    while second.request({"type": "register", "userId": "alice@volli.app",
                          "publicKey": "K"}).get("type") != "registered":
        assert time.monotonic() < deadline, "alice still held after her connection closed"
        time.sleep(0.05)


def _kill_worker_holding(servers, pids: dict[str, int], reps: dict[str, Client]):
    """SIGKILL the worker of the first representative; wait until it is gone and gunicorn
    has booted its replacement (a SIGTERM during that boot is lost by gunicorn)."""
    victim_user = next(iter(reps))
    victim = pids[victim_user]
    owner = next(srv for srv in servers if f"[{victim}]" in srv.log())
    booted = owner.log().count("redis listener subscribed")
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{victim}") and "zombie" not in _state(victim):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while owner.log().count("redis listener subscribed") == booted:
        assert time.monotonic() < deadline, "gunicorn did not replace the killed worker"
        time.sleep(0.05)
    return victim, victim_user


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read().lower()
    except OSError:
        return "zombie"


@ACROSS_DEPLOYMENTS
def test_killed_worker_users_go_offline_within_the_ttl(nodes, open_client):
    ttl = 2.0
    servers = [nodes(VOLLI_PRESENCE_TTL=str(ttl)), nodes(VOLLI_PRESENCE_TTL=str(ttl))]
    reps, pids = spread_users(servers, open_client, workers_total=4)
    victim, victim_user = _kill_worker_holding(servers, pids, reps)
    survivors = {u: c for u, c in reps.items() if pids[u] != victim}
    watcher = next(iter(survivors.values()))
    dead_users = [u for u, pid in pids.items() if pid == victim]
    killed_at = time.monotonic()
    while any(watcher.call({"type": "discover", "userId": u})["online"] for u in dead_users):
        assert time.monotonic() - killed_at < ttl + 1.5, "dead worker's users still online"
        time.sleep(0.1)
    assert_all_relay(survivors)


def test_relay_to_a_dead_worker_is_answered_peer_offline_at_once(nodes, open_client, redis):
    """A relay to a killed worker's user is answered peer-offline at once; its presence is
    deleted by a relay as soon as the worker's heartbeat has stopped too (its alive key,
    half a TTL, expired), well before the presence's own TTL would have."""
    ttl = 8.0
    servers = [nodes(VOLLI_PRESENCE_TTL=str(ttl)), nodes(VOLLI_PRESENCE_TTL=str(ttl))]
    reps, pids = spread_users(servers, open_client, workers_total=4)
    store = redis_client.Redis.from_url(redis.url)
    assert len(store.pubsub_channels("it:node:*")) == 4
    victim, victim_user = _kill_worker_holding(servers, pids, reps)
    killed_at = time.monotonic()
    # Redis drops the dead node's subscription once it reads the closed socket; a frame
    # published before that instant is the one at-most-once gap (docs/scaling.md).
    deadline = time.monotonic() + 5
    while store.pubsub_channels(f"it:node:*:{victim}:*"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sender = next(c for u, c in reps.items() if pids[u] != victim)
    assert sender.call({"type": "discover", "userId": victim_user})["online"] is True  # stale
    reply = sender.call({"type": "offer", "to": victim_user, "offer": {}})
    assert reply["code"] == "peer-offline"
    while sender.call({"type": "discover", "userId": victim_user})["online"]:
        # Its last heartbeat was at most TTL/4 before the kill: the presence would expire
        # no sooner than 3/4 of a TTL after it, the alive key at most half a TTL after.
        assert time.monotonic() - killed_at < 0.7 * ttl, "not deleted before its TTL"
        assert sender.call({"type": "offer", "to": victim_user, "offer": {}})["code"] == \
            "peer-offline"
        time.sleep(0.2)


def _wait_ready(srv: Server, expected: int, deadline: float = 20.0) -> dict:
    end = time.monotonic() + deadline
    while True:
        status, body = srv.http("/ready")
        if status == expected:
            return body
        assert time.monotonic() < end, f"/ready stayed {status} {body}"
        time.sleep(0.1)


def test_redis_restart_local_service_continues_then_presence_is_rebuilt(nodes, open_client, redis):
    a = nodes(workers=1, VOLLI_PRESENCE_TTL="3")
    b = nodes(workers=1, VOLLI_PRESENCE_TTL="3")
    alice, carol, bob = open_client(a), open_client(a), open_client(b)
    alice.register("alice@volli.app")
    carol.register("carol@volli.app")
    bob.register("bob@volli.app")
    alice.send({"type": "offer", "to": "bob@volli.app", "offer": {"n": 1}})
    assert bob.recv()["offer"] == {"n": 1}
    assert _wait_ready(a, 200)["backend"] == "redis"

    redis.stop()
    body = _wait_ready(a, 503)
    assert body["ready"] is False and "redis" in body["reason"]
    # Users on the same worker keep relaying; what needs Redis is refused, never dropped.
    alice.send({"type": "answer", "to": "carol@volli.app", "answer": {"n": 2}})
    assert carol.recv()["answer"] == {"n": 2}
    assert alice.call({"type": "offer", "to": "bob@volli.app", "offer": {}})["code"] \
        == "unavailable"
    assert open_client(a).call({"type": "register", "userId": "dave@volli.app",
                                "publicKey": "K"})["code"] == "unavailable"
    assert "redis listener lost" in a.wait_log("redis unreachable")

    redis.start()  # empty: every presence must be announced again
    _wait_ready(a, 200)
    _wait_ready(b, 200)
    deadline = time.monotonic() + 10
    while not alice.call({"type": "discover", "userId": "bob@volli.app"})["online"]:
        assert time.monotonic() < deadline, "bob's presence was not rebuilt"
        time.sleep(0.1)
    alice.send({"type": "offer", "to": "bob@volli.app", "offer": {"n": 3}})
    assert bob.recv()["offer"] == {"n": 3}
    bob.send({"type": "answer", "to": "alice@volli.app", "answer": {"n": 4}})
    assert alice.recv()["answer"] == {"n": 4}
    assert "redis listener recovered" in a.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{a.port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    failures = re.search(r'^volli_redis_failures_total\{operation="listener"\} (\S+)$',
                         metrics, re.M)
    assert failures and float(failures.group(1)) >= 1, metrics


@ACROSS_DEPLOYMENTS
def test_bindings_survive_a_full_restart_of_the_servers(nodes, open_client):
    first = nodes()
    alice, me = open_client(first), Identity()
    assert me.register(alice, "alice@volli.app")["type"] == "registered"
    plain = open_client(first)
    plain.register("plain@volli.app", public_key="UGxhaW5LZXk=")
    alice.close()
    plain.close()
    first.signal(signal.SIGTERM)
    assert first.wait_exit(30) == 0

    second = nodes()
    watcher = open_client(second)
    watcher.register("watcher@volli.app")
    reply = watcher.call({"type": "discover", "userId": "alice@volli.app"})
    del reply["requestId"]
    assert reply == {"type": "discover-response", "userId": "alice@volli.app",
                     "online": False, "publicKey": me.public, "verified": True}
    # An unsigned registration left nothing behind.
    reply = watcher.call({"type": "discover", "userId": "plain@volli.app"})
    assert (reply["publicKey"], reply["verified"]) == (None, False)


@ACROSS_DEPLOYMENTS
def test_sigterm_with_redis_releases_presence_for_other_servers(nodes, open_client):
    a, b = nodes(workers=1), nodes(workers=1)
    leaving, staying = open_client(a), open_client(b)
    leaving.register("leaving@volli.app")
    staying.register("staying@volli.app")
    a.signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as info:
        leaving.recv(timeout=10)
    assert info.value.rcvd.code == 1001
    assert staying.call({"type": "discover", "userId": "leaving@volli.app"})["online"] is False


@ACROSS_DEPLOYMENTS
def test_signed_takeover_and_binding_work_across_servers(nodes, open_client):
    a, b = nodes(workers=1), nodes(workers=1)
    alice = Identity()
    old, peer = open_client(a), open_client(a)
    assert alice.register(old, "alice@volli.app")["type"] == "registered"
    peer.register("peer@volli.app")
    # Bound across servers: plain registration elsewhere is refused.
    plain = open_client(b)
    assert plain.call({"type": "register", "userId": "alice@volli.app",
                       "publicKey": "AAAA"})["code"] == "identity-bound"
    new = open_client(b)
    assert alice.register(new, "alice@volli.app")["type"] == "registered"
    assert old.recv() == {"type": "session-replaced"}
    with pytest.raises(ConnectionClosed) as info:
        old.recv()
    assert info.value.rcvd.code == 4000
    for n in range(3):
        peer.send({"type": "offer", "to": "alice@volli.app", "offer": {"n": n}})
    assert [new.recv()["offer"]["n"] for _ in range(3)] == [0, 1, 2]
    assert peer.call({"type": "discover", "userId": "alice@volli.app"})["publicKey"] \
        == alice.public


def _command_calls(store, command: str) -> int:
    stats = store.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def test_a_burst_to_another_node_arrives_whole_in_order_in_few_publishes(nodes, open_client,
                                                                          redis):
    a, b = nodes(workers=1), nodes(workers=1)
    alice, bob = open_client(a), open_client(b)
    alice.register("alice@volli.app")
    bob.register("bob@volli.app")
    store = redis_client.Redis.from_url(redis.url)
    evalsha, publish = _command_calls(store, "evalsha"), _command_calls(store, "publish")
    count = 2000
    for n in range(count):
        alice.send({"type": "ice-candidate", "to": "bob@volli.app", "candidate": {"n": n}})
    assert [bob.recv()["candidate"]["n"] for _ in range(count)] == list(range(count))
    # The route script named bob's node once (or again after ROUTE_CACHE); the rest went
    # out batched, several frames per PUBLISH.
    routed = _command_calls(store, "evalsha") - evalsha
    published = _command_calls(store, "publish") - publish
    assert 1 <= routed < 20 and published < count / 2, (routed, published)


@ACROSS_DEPLOYMENTS
def test_a_relay_to_a_user_who_just_moved_node_is_rerouted(nodes, open_client):
    a, b, c = nodes(workers=1), nodes(workers=1), nodes(workers=1)
    alice, bob = open_client(a), open_client(b)
    alice.register("alice@volli.app")
    bob.register("bob@volli.app")
    alice.send({"type": "offer", "to": "bob@volli.app", "offer": {"n": 1}})
    assert bob.recv()["offer"] == {"n": 1}  # alice's node now remembers bob's
    remembered = time.monotonic()
    bob.close()
    moved = open_client(c)
    deadline = time.monotonic() + 5
    while moved.call({"type": "register", "userId": "bob@volli.app",
                      "publicKey": "key"})["type"] != "registered":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Within ROUTE_CACHE (1 s) alice's node still sends to b; b routes it on to c.
    assert time.monotonic() - remembered < 0.8, "too slow to test the remembered route"
    alice.send({"type": "offer", "to": "bob@volli.app", "offer": {"n": 2}})
    assert moved.recv()["offer"] == {"n": 2}


def test_heartbeat_keeps_presence_alive_and_recreates_a_lost_one(nodes, open_client, redis):
    a, b = nodes(workers=1, VOLLI_PRESENCE_TTL="1"), nodes(workers=1, VOLLI_PRESENCE_TTL="1")
    alice, watcher = open_client(a), open_client(b)
    alice.register("alice@volli.app")
    watcher.register("watcher@volli.app")
    store = redis_client.Redis.from_url(redis.url)
    time.sleep(2.5)  # 2.5 TTLs: only the heartbeat's refreshes keep alice online
    assert watcher.call({"type": "discover", "userId": "alice@volli.app"})["online"] is True
    assert 0 < store.pttl("it:presence:alice@volli.app") <= 1000
    node = store.hget("it:presence:alice@volli.app", "node")
    store.delete("it:presence:alice@volli.app")  # say, evicted
    assert watcher.call({"type": "discover", "userId": "alice@volli.app"})["online"] is False
    deadline = time.monotonic() + 2
    while not watcher.call({"type": "discover", "userId": "alice@volli.app"})["online"]:
        assert time.monotonic() < deadline, "the heartbeat did not re-create alice's presence"
        time.sleep(0.05)
    assert store.hget("it:presence:alice@volli.app", "node") == node
