"""Real Redis topologies for tests, on free loopback ports in a temporary directory:
a Redis Cluster (3 primaries, each with a replica so that a shard can fail over) and a
primary + replica watched by 3 Sentinels. No persistence; everything is killed by stop().
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
import redis.cluster

from volli.redis_connect import primary_moved, subscribe

SERVICE = "volli"  # the name the sentinels monitor
WAIT = 20.0  # seconds any start or failover step may take before the fixture gives up


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1, each with port + 10000 free too (a cluster node's bus)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 55000)
        if port in ports:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


def wait(what: str, check, timeout: float = WAIT):
    """Poll ``check`` until it returns something true; its last error goes in the message."""
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout}s (last error: {last})")


def _info(port: int, section: str) -> dict:
    with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as client:
        return client.info(section)


class _Processes:
    """redis-server processes in one directory; stop() kills every one."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run the suite with "
                               "`bash tests/run.sh`, which installs it")
        self.dir = tmp_path
        self.procs: dict[int, subprocess.Popen] = {}

    def spawn(self, port: int, *args: str) -> None:
        self.procs[port] = subprocess.Popen(
            ["redis-server", *args], cwd=self.dir, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True)

    def server(self, port: int, *args: str) -> None:
        self.spawn(port, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--logfile", f"redis-{port}.log",
                   # A replica syncs at once (the default waits 5 s for more replicas).
                   "--repl-diskless-sync-delay", "0", *args)

    def wait_ping(self, port: int) -> None:
        def ping() -> bool:
            if self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited: {self.log(port)}")
            with redis.Redis(port=port, socket_timeout=1) as client:
                return client.ping()
        wait(f"redis on port {port} answers PING", ping)

    def log(self, port: int) -> str:
        path = self.dir / f"redis-{port}.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


class _Topology:
    """Starts in __init__ (stopping whatever started if that fails); a context manager."""

    def __init__(self, tmp_path: Path) -> None:
        self.processes = _Processes(tmp_path)
        started = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.processes.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class LocalCluster(_Topology):
    """A Redis Cluster of ``primaries`` shards with ``replicas`` replicas each."""

    def __init__(self, tmp_path: Path, primaries: int = 3, replicas: int = 1) -> None:
        self.ports = _free_ports(primaries * (1 + replicas))
        self._primaries, self._replicas = primaries, replicas
        super().__init__(tmp_path)

    def _start(self) -> None:
        for port in self.ports:
            self.processes.server(port, "--cluster-enabled", "yes", "--cluster-config-file",
                                  f"nodes-{port}.conf", "--cluster-node-timeout", "2000",
                                  "--enable-debug-command", "local")
        for port in self.ports:
            self.processes.wait_ping(port)
        # redis-cli makes the first `primaries` addresses primaries, the rest replicas.
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self._replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=WAIT)
        self._wait_ok(self._replicas_in_sync)

    def _replicas_in_sync(self) -> bool:
        """Every shard lists its replicas, and every replica's link to its primary is up."""
        shards = self.shards()
        return (all(len(s["replicas"]) == self._replicas for s in shards)
                and all(_info(r, "replication")["master_link_status"] == "up"
                        for s in shards for r in s["replicas"]))

    @property
    def url(self) -> str:
        """VOLLI_REDIS_URL of this cluster (every node a startup node)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        """A plain client of one node (CLUSTER commands, or a look at one shard)."""
        return redis.Redis(port=port, socket_timeout=5, decode_responses=True)

    @property
    def live(self) -> list[int]:
        """Ports of the nodes not crashed."""
        return [port for port in self.ports if port in self.processes.procs]

    def shards(self) -> list[dict]:
        """Each shard's first and last slot, its primary's and its replicas' ports, in
        slot order, as a live node sees them (CLUSTER SLOTS would hide a replica until it
        has replicated some data)."""
        return _shards(self._nodes(self.live[0]))

    def _nodes(self, port: int) -> dict[int, dict]:
        """CLUSTER NODES of the node on ``port``, by port (redis-py parses it)."""
        with self.client(port) as node:
            nodes = node.cluster("nodes")
        return {int(address.split("@")[0].rsplit(":", 1)[1]): fields
                for address, fields in nodes.items()}

    def primary_for(self, key: str) -> int:
        with self.client(self.live[0]) as node:
            slot = node.execute_command("CLUSTER", "KEYSLOT", key)
        return next(s["primary"] for s in self.shards() if s["slots"][0] <= slot <= s["slots"][1])

    def failover(self, primary: int) -> int:
        """CLUSTER FAILOVER on a replica of ``primary`` (a port): the primary stops taking
        writes, the replica catches up and takes over. Returns the new primary's port once
        the cluster is ok and every node agrees."""
        replica = self._replica_of(primary)
        for attempt in range(3):
            with self.client(replica) as node:
                node.execute_command("CLUSTER", "FAILOVER")
            # A loaded machine can let the replica's catch-up pass the manual failover's
            # time limit: Redis then aborts it, and it is asked again.
            try:
                wait("the replica takes over", lambda: _info(
                    replica, "replication")["role"] == "master", 8.0)
                break
            except TimeoutError:
                if attempt == 2:
                    raise
        # Every node names it the primary, and the old primary its replica (in sync: it
        # can take over again).
        self._wait_ok(lambda: self._agree(replica, primary)
                      and _info(primary, "replication")["master_link_status"] == "up")
        return replica

    def crash(self, primary: int) -> int:
        """Kill ``primary``'s process; returns the port of the replica that took over
        (after cluster-node-timeout, 2 s) once the live nodes agree and say ok."""
        replica = self._replica_of(primary)
        self.processes.kill(primary)
        self._wait_ok(lambda: self._agree(replica))
        return replica

    def wait_replicated(self, primary: int) -> None:
        """Until ``primary``'s replicas have everything it has taken so far."""
        offset = _info(primary, "replication")["master_repl_offset"]
        for replica in self._replica_of(primary, every=True):
            wait(f"{replica} in sync", lambda: _info(
                replica, "replication")["slave_repl_offset"] >= offset)

    def _replica_of(self, primary: int, every: bool = False):
        replicas = next(s["replicas"] for s in self.shards() if s["primary"] == primary)
        return replicas if every else replicas[0]

    def _agree(self, primary: int, replica: int | None = None) -> bool:
        """Every live node names ``primary`` a primary (and ``replica`` its replica)."""
        return all(any(s["primary"] == primary and (replica is None or replica in s["replicas"])
                       for s in _shards(self._nodes(port))) for port in self.live)

    def _wait_ok(self, also=lambda: True) -> None:
        def ok() -> bool:
            return all(_info_cluster(p)["cluster_state"] == "ok" for p in self.live) and also()
        wait("cluster_state:ok on every live node", ok)


def _shards(nodes: dict[int, dict]) -> list[dict]:
    port = {fields["node_id"]: p for p, fields in nodes.items()}
    return sorted(({"slots": (int(fields["slots"][0][0]), int(fields["slots"][-1][-1])),
                    "primary": p,
                    "replicas": [port[r["node_id"]] for r in nodes.values()
                                 if r["master_id"] == fields["node_id"]]}
                   for p, fields in nodes.items()
                   if "master" in fields["flags"] and fields["slots"]),
                  key=lambda shard: shard["slots"][0])


def _info_cluster(port: int) -> dict:
    with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as client:
        return client.cluster("info")


class LocalSentinel(_Topology):
    """A primary, one replica and 3 Sentinels monitoring them as ``SERVICE``."""

    def __init__(self, tmp_path: Path) -> None:
        self.primary, self.replica, *self.sentinels = _free_ports(5)
        super().__init__(tmp_path)

    def _start(self) -> None:
        self.processes.server(self.primary)
        self.processes.server(self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        self.processes.wait_ping(self.primary)
        self.processes.wait_ping(self.replica)
        # Sentinels start once the replica is attached: they list the primary's replicas
        # from its INFO, fetched at once and then every 10 s.
        wait("the replica is in sync",
              lambda: _info(self.replica, "replication")["master_link_status"] == "up")
        for port in self.sentinels:
            conf = self.processes.dir / f"sentinel-{port}.conf"  # sentinels rewrite it
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nlogfile redis-{port}.log\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n")
            self.processes.spawn(port, str(conf), "--sentinel")
        for port in self.sentinels:
            self.processes.wait_ping(port)
        self._wait_sentinels(self.primary)

    @property
    def url(self) -> str:
        """VOLLI_REDIS_URL of this deployment."""
        return ("redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
                + f"/{SERVICE}")

    def failover(self, demote: bool = True) -> int:
        """SENTINEL FAILOVER; returns the new primary's port once every sentinel names it
        and it accepts writes.

        The sentinels turn the old primary into a replica only when their next INFO (every
        10 s) finds it; until then it still takes writes from clients connected to it,
        and loses them when it resyncs. ``demote`` does that step at once (REPLICAOF, as
        the sentinels would) and waits for the old primary to sync.
        """
        old, new = self.primary, self.replica
        wait("a sentinel sees the replica in sync (else NOGOODSLAVE; after a failover it "
              "may take its next INFO, 10 s)", self._replica_good)
        with redis.Redis(port=self.sentinels[0], socket_timeout=5) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
        self._promoted()
        if demote:
            with redis.Redis(port=old, socket_timeout=5) as client:
                client.replicaof("127.0.0.1", new)
            wait(f"{old} replicates from {new}",
                  lambda: _info(old, "replication")["master_link_status"] == "up")
        return new

    def _replica_good(self) -> bool:
        with redis.Redis(port=self.sentinels[0], socket_timeout=2, decode_responses=True) as s:
            replicas = s.sentinel_slaves(SERVICE)
        return any(r["port"] == self.replica and r["flags"] == "slave"
                   and r["master-link-status"] == "ok" and r["master-port"] == self.primary
                   for r in replicas)

    def crash(self) -> int:
        """Kill the primary's process; returns the replica's port once the sentinels have
        promoted it (down-after-milliseconds 1 s, then an election). No replica is left:
        a later failover needs a new deployment."""
        self.processes.kill(self.primary)
        return self._promoted()

    def _promoted(self) -> int:
        old, new = self.primary, self.replica
        self.primary, self.replica = new, old
        self._wait_sentinels(new)
        wait(f"{new} accepts writes", lambda: _info(new, "replication")["role"] == "master")
        return new

    def _wait_sentinels(self, primary: int) -> None:
        """Every sentinel names ``primary``, knows the replica and the other sentinels."""
        def agreed() -> bool:
            for port in self.sentinels:
                with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as s:
                    state = s.execute_command("SENTINEL", "MASTER", SERVICE)
                    state = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
                    if (int(state["port"]) != primary or int(state["num-slaves"]) < 1
                            or int(state["num-other-sentinels"]) < len(self.sentinels) - 1
                            or "s_down" in state["flags"] or "failover" in state["flags"]):
                        return False
            return True
        wait(f"every sentinel names {primary} with its replica and peers", agreed)


# -- pub/sub as the tests watch it (Volli's own listener is volli/backends/redis/bus.py) ----

def publish(client, channel: str, data) -> int:
    """PUBLISH, or SPUBLISH on a cluster: how many subscribers of the node that ran it got it
    (one still subscribed on a former primary, now a replica, gets it uncounted)."""
    if isinstance(client, redis.cluster.RedisCluster):
        return client.spublish(channel, data)
    return client.publish(channel, data)


class SubscriptionLost(Exception):
    """The server ended the subscription (a cluster slot moved) or the primary moved
    (Sentinel) without an error on the connection."""


class Subscription:
    """One channel subscribed through volli.redis_connect.subscribe; ``get`` asks every
    ``check_every`` s whether a Sentinel primary moved (primary_moved)."""

    def __init__(self, client, channel: str, check_every: float = 1.0) -> None:
        self.channel = channel
        self._client = client
        self._check_every, self._next_check = check_every, time.monotonic() + check_every
        self._pubsub = subscribe(client, [channel])
        self.sharded = isinstance(client, redis.cluster.RedisCluster)

    def get(self, timeout: float):
        """The data of the next message, or None when none came within ``timeout`` s."""
        if time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self._check_every
            moved = primary_moved(self._client, self._pubsub)
            if moved:
                raise SubscriptionLost(f"the primary moved to {moved}")
        if self.sharded:
            message = self._pubsub.get_sharded_message(timeout=timeout)
        else:
            message = self._pubsub.get_message(timeout=timeout)
        if message is None:
            return None
        kind = message["type"]
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind in ("message", "smessage"):
            return message["data"]
        if kind in ("unsubscribe", "sunsubscribe"):
            raise SubscriptionLost(f"the server ended the subscription to {self.channel}")
        return None  # the subscribe confirmation

    def close(self) -> None:
        try:
            self._pubsub.close()
        except Exception:  # closing a broken connection may fail; it is dropped either way
            pass

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
