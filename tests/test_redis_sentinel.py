"""Scale-out behind Redis Sentinel (a primary, a replica, three Sentinels, all real):
relays across servers, and a failover during which the listener and every client move
to the new primary."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis as redis_client

from conftest import free_port
from test_redis import (  # noqa: F401 (collected here again, behind Sentinel)
    test_user_id_taken_and_release_work_across_servers,
)

SERVICE = "volli"


class SentinelServers:
    """TEMPORARY until tests/redis_topologies.py lands: a primary, its replica and three
    Sentinels watching it (quorum 2, down after 1 s)."""

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
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self) -> None:
        _until(lambda: len(self.sentinel().sentinel_slaves(SERVICE)) == 1
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
        _until(lambda: self.primary_port() != before, "no failover", 20)
        return self.primary_port()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=10)


def _run(tmp_path, port: int, *args: str):
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--logfile", str(tmp_path / f"redis-{port}.log"),
         "--dir", str(tmp_path), *args],  # not the tests' directory: a replica writes an RDB
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _until(check, what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except redis_client.RedisError:
            pass
        assert time.monotonic() < end, what
        time.sleep(0.1)


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
    a, b = nodes(workers=1), nodes(workers=1)
    alice, bob = open_client(a), open_client(b)
    alice.register("alice@x")
    bob.register("bob@x")
    assert _relays(alice, bob, "bob@x", "alice@x") and _relays(bob, alice, "alice@x", "bob@x")
    new_primary = sentinels.failover()
    assert new_primary == sentinels.replica
    # Both servers' listeners resubscribe on the new primary, and registrations work there.
    _until(lambda: len(redis_client.Redis(port=new_primary).pubsub_channels("it:node:*")) == 2,
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
