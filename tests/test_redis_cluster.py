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
    """TEMPORARY until tests/redis_topologies.py lands: six cluster-enabled redis-servers
    joined as a cluster of three primaries, each with a replica."""

    def __init__(self, tmp_path) -> None:
        self.ports: list[int] = []
        while len(self.ports) < 6:
            port = _cluster_port()
            if not {port, port + 10000, port - 10000} & set(self.ports):
                self.ports.append(port)
        self.procs = [subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--cluster-enabled", "yes",
             "--cluster-config-file", str(tmp_path / f"nodes-{port}.conf"),
             "--logfile", str(tmp_path / f"redis-{port}.log"),
             # a replica's first sync writes an RDB file into its working directory
             "--dir", str(_mkdir(tmp_path / str(port)))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            for port in self.ports]
        try:
            self._join()
        except BaseException:
            self.stop()
            raise

    def _join(self) -> None:
        self.clients = [redis_client.Redis(port=port) for port in self.ports]
        _until(lambda: all(_answers(c) for c in self.clients), "redis-servers did not start")
        created = subprocess.run(["redis-cli", "--cluster", "create",
                                  *(f"127.0.0.1:{port}" for port in self.ports),
                                  "--cluster-replicas", "1", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=30)
        assert created.returncode == 0, created.stdout + created.stderr
        _until(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in self.clients),
               "the cluster did not come up")
        # A replica still in its first sync cannot fail over (its primary waits for it).
        _until(lambda: sum(c.info("replication").get("master_link_status") == "up"
                           for c in self.clients) == 3, "the replicas did not sync", 30)
        self.router = redis_client.RedisCluster(host="127.0.0.1", port=self.ports[0])

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def flush(self) -> None:
        for client in self.clients:
            if client.execute_command("ROLE")[0] == b"master":
                client.flushall()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


def _mkdir(path):
    path.mkdir()
    return path


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
