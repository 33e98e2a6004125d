"""TEMPORARY test topologies until tests/redis_topologies.py lands: a Redis Cluster of
three primaries with a replica each, and a primary + replica watched by three Sentinels,
all real redis-server processes on free loopback ports."""

from __future__ import annotations

import socket
import subprocess
import time

import redis as redis_client

from conftest import free_port

SERVICE = "volli"  # the Sentinels' name of the primary


class _Servers:
    """Processes started together: all stopped if they do not come up."""

    procs: list[subprocess.Popen]

    def _ready_or_stop(self, wait) -> None:
        try:
            wait()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


class ClusterServers(_Servers):
    """Six cluster-enabled redis-servers joined as three primaries, each with a replica."""

    def __init__(self, tmp_path) -> None:
        self.ports: list[int] = []
        while len(self.ports) < 6:
            port = _cluster_port()
            if not {port, port + 10000, port - 10000} & set(self.ports):
                self.ports.append(port)
        self.procs = [_run(tmp_path, port, "--cluster-enabled", "yes", "--cluster-config-file",
                           str(tmp_path / f"nodes-{port}.conf")) for port in self.ports]
        self._ready_or_stop(self._join)

    def _join(self) -> None:
        self.clients = [redis_client.Redis(port=port) for port in self.ports]
        until(lambda: all(c.ping() for c in self.clients), "redis-servers did not start")
        created = subprocess.run(["redis-cli", "--cluster", "create",
                                  *(f"127.0.0.1:{port}" for port in self.ports),
                                  "--cluster-replicas", "1", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=30)
        assert created.returncode == 0, created.stdout + created.stderr
        until(lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in self.clients),
              "the cluster did not come up")
        # A replica still in its first sync cannot fail over (its primary waits for it).
        until(lambda: sum(c.info("replication").get("master_link_status") == "up"
                          for c in self.clients) == 3, "the replicas did not sync", 30)
        self.router = redis_client.RedisCluster(host="127.0.0.1", port=self.ports[0])

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def flush(self) -> None:
        for client in self.clients:
            if client.execute_command("ROLE")[0] == b"master":
                client.flushall()


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


def until(check, what: str, deadline: float = 15.0) -> None:
    """Wait for ``check()`` (a Redis error counts as not yet)."""
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except redis_client.RedisError:
            pass
        assert time.monotonic() < end, what
        time.sleep(0.1)


def _run(tmp_path, port: int, *args: str):
    """A redis-server on ``port``; its files (a replica writes an RDB) in a directory of
    its own, never the tests' working directory."""
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--logfile", str(tmp_path / f"redis-{port}.log"),
         "--dir", str(_mkdir(tmp_path / str(port))), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


class SentinelServers(_Servers):
    """A primary, its replica and three Sentinels watching it (quorum 2, down after 1 s)."""

    def __init__(self, tmp_path) -> None:
        self.primary, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.procs = [_run(tmp_path, self.primary),
                      _run(tmp_path, self.replica, "--replicaof", "127.0.0.1", str(self.primary))]
        for port in self.sentinels:
            conf = tmp_path / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n")
            self.procs.append(subprocess.Popen(
                ["redis-server", str(conf), "--sentinel", "--logfile",
                 str(tmp_path / f"sentinel-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        self._ready_or_stop(self._wait)

    def _wait(self) -> None:
        until(lambda: len(self.sentinel().sentinel_slaves(SERVICE)) == 1
              and self.sentinel().sentinel_master(SERVICE)["num-other-sentinels"] == 2,
              "the Sentinels did not find the replica and each other")

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + \
            f"/{SERVICE}"

    def sentinel(self):
        return redis_client.Redis(port=self.sentinels[0], decode_responses=True)

    def primary_port(self) -> int:
        return int(self.sentinel().sentinel_get_master_addr_by_name(SERVICE)[1])

    def failover(self) -> int:
        """Make the replica the primary; returns its port."""
        before = self.primary_port()
        self.sentinel().execute_command("SENTINEL FAILOVER", SERVICE)
        until(lambda: self.primary_port() != before, "no failover", 20)
        return self.primary_port()
