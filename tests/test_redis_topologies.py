"""volli.redis_connect against a real Redis Cluster and a real Sentinel deployment
(tests/redis_topologies.py), failovers included: what redis-py does then is what the
module's docstring says."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from redis_topologies import Subscription, SubscriptionLost, publish
from volli.redis_connect import connect, follow_primary, parse

from conftest import ROOT


def command_client(url: str):
    """Built like the backend's main client: blocking pool, retried on connection errors
    only (a command that timed out may still run)."""
    return connect(parse(url), max_connections=8, pool_timeout=5, socket_timeout=5,
                   socket_connect_timeout=2, health_check_interval=30,
                   retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3,
                               supported_errors=(redis.ConnectionError,)))


def listener_client(url: str):
    """Built like the backend's pub/sub listener: no read timeout, no retry."""
    return connect(parse(url), socket_timeout=None, socket_connect_timeout=2,
                   health_check_interval=10, retry=Retry(NoBackoff(), 0))


def key_per_shard(client, cluster) -> dict[int, str]:
    """A key whose slot each shard owns, by the shard's primary port."""
    keys: dict[int, str] = {}
    for n in range(1000):
        key = f"k{{{n}}}"
        slot = client.keyslot(key)
        shard = next(s for s in cluster.shards() if s["slots"][0] <= slot <= s["slots"][1])
        keys.setdefault(shard["primary"], key)
        if len(keys) == len(cluster.shards()):
            return keys
    raise AssertionError("no key for some shard")


def next_data(subscription: Subscription, deadline: float = 5.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        data = subscription.get(0.2)
        if data is not None:
            return data
    raise AssertionError("no message")


class Writer(threading.Thread):
    """Writes numbered keys until stopped; remembers which writes were acknowledged."""

    def __init__(self, client, key: str) -> None:
        super().__init__(daemon=True)
        self.client, self.key = client, key
        self.acked: list[int] = []
        self.errors: list[Exception] = []
        self._stop_at: float | None = None

    def run(self) -> None:
        n = 0
        while self._stop_at is None or time.monotonic() < self._stop_at:
            n += 1
            try:
                self.client.rpush(self.key, n)
                self.acked.append(n)
            except redis.RedisError as exc:
                self.errors.append(exc)
            time.sleep(0.002)

    def stop_soon(self, seconds: float = 0.3) -> None:
        self._stop_at = time.monotonic() + seconds
        self.join(10)


def test_cluster_clients_write_every_shard(redis_cluster):
    client = command_client(redis_cluster.url)
    pool = client.get_default_node().redis_connection.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool)
    # redis-py drops health_check_interval for cluster nodes; connect() keeps it.
    assert pool.connection_class(**pool.connection_kwargs).health_check_interval == 30
    for primary, key in key_per_shard(client, redis_cluster).items():
        client.set(key, primary)
        with redis_cluster.client(primary) as shard:
            assert shard.get(key) == str(primary)  # stored on that shard's primary
        assert client.get(key) == str(primary).encode()
    listener = listener_client(redis_cluster.url)
    with Subscription(listener, "ch:{a}") as subscription:
        assert subscription.sharded
        assert subscription.get(0.1) is None  # the subscribe confirmation
        assert publish(client, "ch:{a}", b"hello") == 1
        assert next_data(subscription) == b"hello"


@pytest.mark.parametrize("retry_timeouts", [False, True])
def test_cluster_retries_a_timed_out_command_only_when_told(redis_cluster, retry_timeouts):
    errors = (redis.ConnectionError, redis.TimeoutError) if retry_timeouts else (
        redis.ConnectionError,)
    client = connect(parse(redis_cluster.url), socket_timeout=0.3,
                     retry=Retry(NoBackoff(), 5, supported_errors=errors))
    key = f"counter:{retry_timeouts}"
    client.set(key, 0)
    with redis_cluster.client(redis_cluster.primary_for(key)) as primary:
        pause = threading.Thread(target=primary.execute_command, args=("DEBUG", "SLEEP", 0.8))
        pause.start()
        time.sleep(0.1)
        try:
            client.incr(key)
        except redis.TimeoutError:
            assert not retry_timeouts
        pause.join()
    # Each INCR that timed out still ran once the primary woke up.
    assert (int(client.get(key)) > 1) == retry_timeouts
    assert client.pipeline().retry.get_retries() == (5 if retry_timeouts else 0)


def test_cluster_failover_loses_no_acknowledged_write_and_ends_subscriptions(own_redis_cluster):
    cluster = own_redis_cluster
    client = command_client(cluster.url)
    keys = key_per_shard(client, cluster)
    for primary, key in keys.items():
        client.set(key, primary)
    channel = "node:{x}"
    primary = cluster.primary_for(channel)
    listener = listener_client(cluster.url)
    old = Subscription(listener, channel)
    assert old.get(0.1) is None and publish(client, channel, b"before") == 1
    assert next_data(old) == b"before"

    writer = Writer(client, "log:{x}")  # the same shard as the channel
    writer.start()
    time.sleep(0.2)
    started = time.monotonic()
    new_primary = cluster.failover(primary)
    failover_seconds = time.monotonic() - started
    writer.stop_soon()
    assert not writer.errors, writer.errors
    assert [int(n) for n in client.lrange("log:{x}", 0, -1)] == writer.acked
    for shard, key in keys.items():
        assert client.get(key) == str(shard).encode()

    # The demoted primary ended the old subscription; redis-py does not subscribe again.
    with pytest.raises(SubscriptionLost):
        old.get(2.0)
    old.close()
    with Subscription(listener, channel) as subscription:
        assert subscription.get(0.1) is None
        assert publish(client, channel, b"after") == 1  # counted: on the new primary
        assert next_data(subscription) == b"after"
    with cluster.client(new_primary) as node:
        assert node.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 0  # closed
    print(f"cluster failover took {failover_seconds:.2f} s")


def test_cluster_primary_crash(own_redis_cluster):
    cluster = own_redis_cluster
    client, listener = command_client(cluster.url), listener_client(cluster.url)
    primary = cluster.primary_for("node:{x}")
    client.rpush("log:{x}", 1)
    cluster.wait_replicated(primary)
    old = Subscription(listener, "node:{x}")
    assert old.get(0.1) is None
    started = time.monotonic()
    cluster.crash(primary)
    print(f"cluster: a replica took over {time.monotonic() - started:.2f} s after the crash")
    with pytest.raises(redis.ConnectionError):
        old.get(1.0)
    old.close()
    client.rpush("log:{x}", 2)  # a connection error, a slot map refresh, a retry
    assert client.lrange("log:{x}", 0, -1) == [b"1", b"2"]
    with Subscription(listener, "node:{x}") as subscription:
        assert subscription.get(0.1) is None
        assert publish(client, "node:{x}", b"after") == 1 and next_data(subscription) == b"after"


def test_sentinel_client_writes_to_the_new_primary_after_failover(own_redis_sentinel):
    deployment = own_redis_sentinel
    client = command_client(deployment.url)
    client.set("a", 1)
    old = deployment.primary
    new = deployment.failover()  # the old primary is a replica when this returns
    # The pooled connection still points at the old primary: its READONLY reply becomes a
    # ConnectionError, which the retry answers by asking the sentinels again.
    client.set("b", 2)
    assert client.connection_pool.master_address == ("127.0.0.1", new)
    with redis.Redis(port=new) as node:
        assert node.mget("a", "b") == [b"1", b"2"]
    _wait_replicated(old, "b")


def _wait_replicated(port: int, key: str) -> None:
    with redis.Redis(port=port) as node:
        end = time.monotonic() + 5
        while node.get(key) is None:
            assert time.monotonic() < end
            time.sleep(0.05)


def test_sentinel_pooled_connections_write_to_the_old_primary_until_followed(
        own_redis_sentinel):
    deployment = own_redis_sentinel
    client = command_client(deployment.url)
    client.set("a", 1)
    old = deployment.primary
    new = deployment.failover(demote=False)  # as the sentinels leave it for up to 10 s
    client.set("stale", 1)  # acknowledged by the old primary, lost when it resyncs
    with redis.Redis(port=old) as node:
        assert node.get("stale") == b"1"
    assert follow_primary(client) and not follow_primary(client)
    client.set("b", 2)
    with redis.Redis(port=new) as node:
        assert node.mget("a", "stale", "b") == [b"1", None, b"2"]


def test_sentinel_subscription_ends_when_the_primary_moves(own_redis_sentinel):
    deployment = own_redis_sentinel
    client = command_client(deployment.url)
    listener = listener_client(deployment.url)
    old = Subscription(listener, "ch", check_every=0.1)
    assert not old.sharded and old.get(0.1) is None
    assert publish(client, "ch", b"before") == 1 and next_data(old) == b"before"
    deployment.failover()
    with pytest.raises(SubscriptionLost, match="primary moved"):
        next_data(old)
    old.close()
    with Subscription(listener, "ch") as subscription:
        assert subscription.get(0.1) is None
        # The pooled connection is on the old primary, now a replica: it takes PUBLISH
        # (without an error) but its messages never reach the primary's subscribers.
        assert publish(client, "ch", b"lost") == 0
        assert follow_primary(client)
        assert publish(client, "ch", b"after") == 1 and next_data(subscription) == b"after"


def test_sentinel_primary_crash(own_redis_sentinel):
    deployment = own_redis_sentinel
    client, listener = command_client(deployment.url), listener_client(deployment.url)
    client.set("a", 1)
    assert client.wait(1, 2000) == 1  # on the replica too
    old = Subscription(listener, "ch")
    assert old.get(0.1) is None
    started = time.monotonic()
    deployment.crash()
    print(f"sentinel: the replica was promoted {time.monotonic() - started:.2f} s after the crash")
    with pytest.raises((redis.ConnectionError, SubscriptionLost)):
        next_data(old)
    old.close()
    client.set("b", 2)  # the pooled connection is dead: reconnected through the sentinels
    assert client.mget("a", "b") == [b"1", b"2"]
    with Subscription(listener, "ch") as subscription:
        assert subscription.get(0.1) is None
        assert publish(client, "ch", b"after") == 1 and next_data(subscription) == b"after"


GEVENT_LOAD = """
from gevent import monkey; monkey.patch_all()
import sys, gevent, redis
from redis.retry import Retry
from redis.backoff import ExponentialBackoff
from volli.redis_connect import connect, parse
client = connect(parse(sys.argv[1]), max_connections=8, pool_timeout=10, socket_timeout=5,
                 retry=Retry(ExponentialBackoff(), 2, supported_errors=(redis.ConnectionError,)))
def one(n):
    client.set(f"g{{{n % 50}}}:{n}", n)
    return int(client.get(f"g{{{n % 50}}}:{n}"))
jobs = [gevent.spawn(one, n) for n in range(500)]
gevent.joinall(jobs, timeout=30, raise_error=True)
assert [job.value for job in jobs] == list(range(500))
"""


@pytest.mark.parametrize("topology", ["redis_cluster", "redis_sentinel"])
def test_many_greenlets_share_a_small_pool(topology, request):
    """Under gevent, 500 greenlets wait for 8 connections (per node) instead of failing."""
    url = request.getfixturevalue(topology).url
    subprocess.run([sys.executable, "-c", GEVENT_LOAD, url], check=True, cwd=ROOT,
                   timeout=60)
