"""Scale-out on a real 3-primary Redis Cluster: the cross-server tests of test_redis.py
run again with VOLLI_REDIS_URL=redis+cluster://..., plus what is cluster-specific (every
shard holds presence; node channels are sharded; takeover across servers)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import redis as redis_client

from conftest import free_port
from test_redis import (  # noqa: F401 (collected here again, on the cluster)
    test_user_id_taken_and_release_work_across_servers,
    test_users_on_four_workers_of_two_servers_discover_and_relay_every_way,
)
from volli.backends.redis.keys import CLUSTER_GROUPS, Keys
from workers import spread_users

PREFIX = "it:"  # conftest.NODES_PREFIX
KEYS = Keys(PREFIX, CLUSTER_GROUPS)


class ClusterServers:
    """TEMPORARY until tests/redis_topologies.py lands: three cluster-enabled
    redis-servers joined as a cluster with no replicas."""

    def __init__(self, tmp_path) -> None:
        self.ports = [_cluster_port() for _ in range(3)]
        self.procs = [subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--cluster-enabled", "yes",
             "--cluster-config-file", str(tmp_path / f"nodes-{port}.conf"),
             "--logfile", str(tmp_path / f"redis-{port}.log")],
            stdout=subprocess.DEVNULL, start_new_session=True) for port in self.ports]
        self.clients = [redis_client.Redis(port=port) for port in self.ports]
        self.router = None  # a cluster client, to find where a key lives
        _until(lambda: all(_answers(c) for c in self.clients), "redis-servers did not start")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        _until(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in self.clients),
               "the cluster did not come up")
        self.router = redis_client.RedisCluster(host="127.0.0.1", port=self.ports[0])

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def flush(self) -> None:
        for client in self.clients:
            client.flushall()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and _free(port + 10000):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _answers(client) -> bool:
    try:
        return client.ping()
    except redis_client.ConnectionError:
        return False


def _until(check, what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.1)


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


def _shard_of(cluster, user: str) -> int:
    """Which of the cluster's servers holds ``user``'s presence."""
    node = cluster.router.get_node_from_key(KEYS.presence(user))
    return cluster.ports.index(node.port)


def test_a_shard_that_lost_its_state_recovers_its_groups_only(nodes, open_client, cluster):
    """One shard forgets everything (what a restart with no persistence looks like): the
    groups it serves get a new epoch, their users are announced again and their IDs stay
    refused to others meanwhile; registrations in the other groups go on."""
    a, b = nodes(workers=1, VOLLI_PRESENCE_TTL="2"), nodes(workers=1, VOLLI_PRESENCE_TTL="2")
    users = {f"kept{i}@x": open_client((a, b)[i % 2]) for i in range(24)}
    for user, client in users.items():
        assert client.register(user)["type"] == "registered"
    shard = {user: _shard_of(cluster, user) for user in users}
    lost = [user for user in users if shard[user] == 0]
    assert lost and len(lost) < len(users)
    cluster.clients[0].flushall()
    # Meanwhile a stranger cannot take a lost user's ID; IDs on the other shards register.
    stranger = open_client(b)
    reply = stranger.request({"type": "register", "userId": lost[0], "publicKey": "K"})
    assert reply.get("code") in ("unavailable", "user-id-taken"), reply
    fresh = [f"fresh{i}@x" for i in range(100) if _shard_of(cluster, f"fresh{i}@x") != 0]
    sender = open_client(a)
    assert sender.register(fresh[0])["type"] == "registered"
    deadline = time.monotonic() + 6
    while not all(cluster.clients[0].exists(KEYS.presence(u)) for u in lost):
        assert time.monotonic() < deadline, "lost users were not announced again"
        time.sleep(0.1)
    assert "lost its presence state (restarted empty or paused) in group" in a.log() + b.log()
    # Relays reach them again, across servers.
    offer = {"type": "offer", "sdp": "x"}
    for target in lost:
        sender.send({"type": "offer", "to": target, "offer": offer})
        assert users[target].recv() == {"type": "offer", "to": target, "offer": offer,
                                        "from": fresh[0]}

