"""Which Redis a deployment uses (one server, a Cluster or Sentinel), and clients for it.

``VOLLI_REDIS_URL`` grammar (see ``parse``)::

    redis://…  rediss://…  unix://…      one server, redis-py's own URL syntax (as before)
    redis+cluster://[user[:password]@]host[:port][,host[:port]…][/][?option=value&…]
    redis+sentinel://[user[:password]@]host[:port][,host[:port]…]/service[/db][?option=value&…]
    rediss+cluster://…  rediss+sentinel://…   the same over TLS (to the sentinels too)

Cluster hosts are startup nodes (port 6379 by default); any one reachable is enough, the
client learns the rest. Sentinel hosts are sentinels (port 26379 by default); ``service``
is the name they monitor. user/password authenticate to the data nodes; sentinels that
need their own use the ``sentinel_username``/``sentinel_password`` options. Timeouts,
retries and pool sizes are not URL options: the code picks them per client.

Parsing is standard library only: config.py runs it in gunicorn's master before gevent
patches anything, and importing redis-py there would import ssl too early. ``connect``
imports redis-py.

What redis-py 8.1 does on failover (read from its source; the tests in
tests/test_redis_topologies.py check the parts Volli relies on):

- Cluster commands: a MOVED reply patches the slot map (a full CLUSTER SLOTS refresh every
  ``reinitialize_steps`` MOVEDs); a connection error or timeout refreshes the whole map
  from another node, then the command is retried up to the client's retry count, with no
  backoff. redis-py retries timeouts too, whatever the Retry's ``supported_errors`` say:
  ``connect`` keeps timeouts unretried for commands and scripts when the given Retry does
  not list TimeoutError, and then gives pipelines no retries at all (redis-py's cluster
  pipeline always retries timeouts).
- Cluster nodes take no ``health_check_interval`` (redis-py drops it): ``connect`` puts it
  on the connection class instead.
- Cluster pub/sub (``ClusterPubSub``): ``ssubscribe`` opens one connection per shard
  owning a channel. After CLUSTER FAILOVER the old primary (now a replica) sends an
  unasked ``sunsubscribe``, and nothing subscribes again by itself (seen in the tests):
  redis-py reconciles shard subscriptions only when the same RedisCluster refreshes its
  slot map, and then on a ThreadPoolExecutor (a greenlet under gevent, using the
  listener's sockets while the listener may be reading them). A client whose slot map is
  stale SSUBSCRIBEs on the replica: Redis accepts it and forwards messages, but SPUBLISH
  on the primary does not count that subscriber. So the caller subscribes again itself
  (``subscribe`` refreshes the slot map first) when it reads the unasked ``sunsubscribe``.
  Give the listener a RedisCluster of its own and subscribe anew after any error. If the shard's primary died instead, the connection
  error surfaces from ``get_sharded_message``.
- Sentinel: a connection asks the sentinels for the primary only in connect(). A demoted
  primary answers a write with READONLY, which redis-py turns into ConnectionError (the
  write did not run), but its retry reconnected to the same old address (8.1 reconnects
  through connect_check_health), failing every time: ``connect`` gives Sentinel clients
  a connection class that reconnects through the sentinels. Pooled connections are not
  checked otherwise: after SENTINEL FAILOVER they keep writing to the old primary, which
  takes writes until the sentinels' next INFO (up to 10 s) makes it a replica, and then
  loses them in the resync; PUBLISH through them reaches a replica without an error
  (returns 0) even after that. ``follow_primary`` asks the sentinels and drops
  connections to a former primary: call it every second or so. A subscriber on the old
  primary is not told either: ``primary_moved`` asks the sentinels (every second). When the
  primary dies, connects fail until the sentinels promote a replica
  (down-after-milliseconds + election): retries need that much backoff, or try later.
- gevent: every socket is redis-py's own (patched in the worker); locks are
  ``threading`` ones made when a client is built, so build clients inside the worker,
  after patching (never at import in gunicorn's master).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any
from urllib.parse import parse_qsl, unquote

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"

_SCHEMES = {
    "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
    "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True),
}
_DEFAULT_PORT = {CLUSTER: 6379, SENTINEL: 26379}


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _protocol(text: str) -> int:
    if text not in {"2", "3"}:
        raise ValueError("expected 2 or 3")
    return int(text)


def _cert_reqs(text: str) -> str:
    if text not in {"none", "optional", "required"}:
        raise ValueError("expected none, optional or required")
    return text


# URL options of cluster and sentinel URLs, passed to every data-node connection.
_OPTIONS = {"socket_keepalive": _bool, "protocol": _protocol, "client_name": str}
_TLS_OPTIONS = {"ssl_cert_reqs": _cert_reqs, "ssl_ca_certs": str, "ssl_certfile": str,
                "ssl_keyfile": str, "ssl_check_hostname": _bool}
_SENTINEL_OPTIONS = {"sentinel_username": str, "sentinel_password": str}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed VOLLI_REDIS_URL. ``url`` may hold a password: log ``redacted`` instead."""

    kind: str  # SINGLE, CLUSTER or SENTINEL
    url: str = dataclasses.field(repr=False)
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes, or sentinels
    service: str = ""  # sentinel: the monitored primary's name
    db: int = 0  # sentinel
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    # Validated URL options, typed (sentinel_password among them: not in the repr).
    options: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), repr=False)

    @property
    def sharded_pubsub(self) -> bool:
        """Node channels use SSUBSCRIBE/SPUBLISH (a cluster) instead of SUBSCRIBE/PUBLISH."""
        return self.kind == CLUSTER

    @property
    def redacted(self) -> str:
        """The URL with its passwords masked, for logs."""
        scheme, _, rest = self.url.partition("://")
        userinfo, at, hosts = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
        return f"{scheme}://" + re.sub(r"(password=)[^&]*", r"\1***", rest)


def parse(url: str) -> Topology:
    """Parse VOLLI_REDIS_URL; raises ValueError saying what is wrong."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return Topology(SINGLE, url)  # redis-py parses these, as it always did
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError("expected a redis://, rediss://, unix://, redis+cluster://, "
                         "rediss+cluster://, redis+sentinel:// or rediss+sentinel:// URL")
    kind, tls = _SCHEMES[scheme]
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError("a Redis URL has no #fragment")
    userinfo, at, rest = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = unquote(user) or None, (unquote(secret) if colon else None)
    hosts, _, path = rest.partition("/")
    nodes = tuple(_host_port(part, _DEFAULT_PORT[kind]) for part in hosts.split(","))
    service, db = _path(kind, path)
    options = _options(kind, tls, query)
    return Topology(kind, url, nodes, service, db, tls, username, password, options)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise ValueError("expected host:port[,host:port…] after ://")
    if text.startswith("["):  # [IPv6]:port
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"bad IPv6 address {text!r}: expected [address]:port")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}: expected 1-65535")
    return host, int(port_text)


def _path(kind: str, path: str) -> tuple[str, int]:
    parts = [unquote(p) for p in path.split("/")] if path else []
    if kind == CLUSTER:
        if parts not in ([], [""], ["0"]):
            raise ValueError("a cluster URL takes no path (a cluster has only database 0)")
        return "", 0
    if len(parts) > 1 and not parts[-1]:
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise ValueError("a sentinel URL needs the monitored service's name: "
                         "redis+sentinel://host:port[,host:port…]/service[/db]")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("expected /service or /service/db (a number) after the sentinels")
    return parts[0], int(parts[1]) if len(parts) == 2 else 0


def _options(kind: str, tls: bool, query: str) -> tuple[tuple[str, Any], ...]:
    allowed = {**_OPTIONS, **(_TLS_OPTIONS if tls else {}),
               **(_SENTINEL_OPTIONS if kind == SENTINEL else {})}
    options = []
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in allowed:
            hint = (" (TLS options need the rediss+ scheme)" if name in _TLS_OPTIONS else
                    " (Volli sets timeouts, retries and pool sizes per client)"
                    if name.startswith(("socket_", "retry", "max_conn", "health", "timeout"))
                    else "")
            raise ValueError(f"unknown option {name!r}{hint}; known: {', '.join(sorted(allowed))}")
        try:
            options.append((name, allowed[name](value)))
        except ValueError as exc:
            raise ValueError(f"option {name}={value!r}: {exc}") from None
    return tuple(options)


# -- clients ------------------------------------------------------------------------------

def connect(topology: Topology, *, max_connections: int | None = None,
            pool_timeout: float | None = None, retry=None, **kwargs: Any):
    """A redis-py client for ``topology``: Redis (single, sentinel's primary) or RedisCluster.

    ``max_connections`` caps the pool (per node for a cluster); with ``pool_timeout`` the
    pool is a blocking one: callers wait that long for a free connection instead of
    getting MaxConnectionsError. ``retry`` (a redis.retry.Retry) is the retry policy; the
    other keywords go to every data-node connection (``socket_timeout``,
    ``socket_connect_timeout``, ``health_check_interval``, ``decode_responses``…).
    """
    import redis

    if retry is not None:  # else redis-py's default policy, which differs from retry=None
        kwargs["retry"] = retry
    if topology.kind == SINGLE:
        if pool_timeout is None:
            if max_connections is not None:
                kwargs["max_connections"] = max_connections
            return redis.Redis.from_url(topology.url, **kwargs)
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            topology.url, max_connections=max_connections or 50, timeout=pool_timeout,
            **kwargs))
    kwargs.update(topology.options)
    if topology.username is not None:
        kwargs["username"] = topology.username
    if topology.password is not None:
        kwargs["password"] = topology.password
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if pool_timeout is not None:
        kwargs["timeout"] = pool_timeout
    if topology.kind == SENTINEL:
        return _sentinel_primary(topology, pool_timeout is not None, kwargs)
    return _cluster(topology, pool_timeout is not None, kwargs)


def _sentinel_primary(topology: Topology, blocking: bool, kwargs: dict):
    from redis.sentinel import Sentinel, SentinelConnectionPool

    connect_timeout = kwargs.get("socket_connect_timeout") or 2.0
    sentinel_kwargs = {  # discovery must never hang: the connect timeout bounds reads too
        "socket_timeout": connect_timeout, "socket_connect_timeout": connect_timeout,
        "username": kwargs.pop("sentinel_username", None),
        "password": kwargs.pop("sentinel_password", None),
    }
    if topology.tls:
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl")},
                               ssl=True)
    kwargs["connection_class"] = _sentinel_connection(topology.tls)
    sentinel = Sentinel(list(topology.nodes), sentinel_kwargs=sentinel_kwargs)
    pool_class = _blocking_sentinel_pool() if blocking else SentinelConnectionPool
    return sentinel.master_for(topology.service, connection_pool_class=pool_class,
                               db=topology.db, **kwargs)


@functools.cache
def _sentinel_connection(tls: bool):
    """redis-py 8.1's SentinelManagedConnection asks the sentinels only in connect(); a
    command on a connection dropped meanwhile (e.g. by a demoted primary's READONLY)
    reconnects through connect_check_health to the old address, so every retry fails
    again. Reconnect through connect()."""
    from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    base = SentinelManagedSSLConnection if tls else SentinelManagedConnection

    def send_packed_command(self, command, check_health=True):
        if not self._sock:
            self.connect()
        return base.send_packed_command(self, command, check_health)

    return type(f"Following{base.__name__}", (base,),
                {"send_packed_command": send_packed_command})


@functools.cache
def _blocking_sentinel_pool():
    """A SentinelConnectionPool that waits for a free connection (redis-py has none)."""
    from redis import BlockingConnectionPool
    from redis.sentinel import SentinelConnectionPool

    class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
        pass

    return BlockingSentinelConnectionPool


def _cluster(topology: Topology, blocking: bool, kwargs: dict):
    import redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.connection import Connection, SSLConnection

    # redis-py drops health_check_interval for cluster nodes: the connection class keeps it.
    kwargs["connection_class"] = _connection_class(
        SSLConnection if topology.tls else Connection, kwargs.pop("health_check_interval", 0))
    # connection_pool_class and connection_class count only for a client made from a URL:
    # the first node is that URL (without TLS or credentials: those are kwargs here).
    (host, port), *others = topology.nodes
    retry = kwargs.get("retry")
    cls = RedisCluster if retry is None or _retries_timeouts(retry) else _no_timeout_cluster()
    return cls(url=f"redis://{f'[{host}]' if ':' in host else host}:{port}",
               startup_nodes=[ClusterNode(h, p) for h, p in others],
               connection_pool_class=(redis.BlockingConnectionPool if blocking
                                      else redis.ConnectionPool), **kwargs)


def _retries_timeouts(retry) -> bool:
    import redis

    return any(issubclass(redis.TimeoutError, error) for error in retry._supported_errors)


@functools.cache
def _connection_class(base, health_check_interval: float):
    if not health_check_interval:
        return base
    return type(f"HealthChecked{base.__name__}", (base,), {
        "__init__": lambda self, **kw: base.__init__(
            self, **{"health_check_interval": health_check_interval, **kw})})


@functools.cache
def _no_timeout_cluster():
    import redis
    from redis.cluster import RedisCluster

    class ClusterNoTimeoutRetry(RedisCluster):
        """Retries what a topology change explains, never a command that timed out (it
        may still run: a relay published twice arrives twice)."""

        ERRORS_ALLOW_RETRY = tuple(e for e in RedisCluster.ERRORS_ALLOW_RETRY
                                   if e is not redis.TimeoutError)

        def pipeline(self, transaction=None, shard_hint=None):
            pipe = super().pipeline(transaction, shard_hint)
            pipe.retry = type(pipe.retry)(pipe.retry._backoff, 0)  # it retries timeouts
            return pipe

    return ClusterNoTimeoutRetry


# -- pub/sub ------------------------------------------------------------------------------

def _is_cluster(client) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def _sentinel_pool(client):
    from redis.sentinel import SentinelConnectionPool

    pool = getattr(client, "connection_pool", None)
    return pool if isinstance(pool, SentinelConnectionPool) else None


def follows_sentinel(client) -> bool:
    """Whether ``client`` reaches its primary through Sentinel."""
    return _sentinel_pool(client) is not None


def subscribe(client, channels: list[str], **kwargs: Any):
    """A pub/sub of ``client`` subscribed to ``channels``: SSUBSCRIBE on a cluster, after
    refreshing the slot map (a stale one subscribes on a replica, whose subscribers SPUBLISH
    does not count), SUBSCRIBE otherwise. ``kwargs`` go to ``client.pubsub``."""
    pubsub = client.pubsub(**kwargs)
    if _is_cluster(client):
        client.nodes_manager.initialize()
        pubsub.ssubscribe(*channels)
    else:
        pubsub.subscribe(*channels)
    return pubsub


def primary_moved(client, pubsub) -> str | None:
    """Sentinel: where the primary is now, if ``pubsub`` (of ``client``) is subscribed
    elsewhere (a subscriber on a demoted primary is not told); else None."""
    pool = _sentinel_pool(client)
    connection = pubsub.connection
    if pool is None or connection is None:
        return None
    host, port = pool.get_master_address()
    return None if (connection.host, connection.port) == (host, port) else f"{host}:{port}"


def follow_primary(client) -> bool:
    """Sentinel: ask the sentinels where the primary is now; if it moved, ``client``'s
    idle connections to the old one are dropped (busy ones when released). True if it
    moved. Call it every second or so: redis-py asks only when it opens a connection, so
    pooled connections keep writing to a demoted primary until the sentinels reconfigure
    it (up to 10 s), and those writes are lost. Other topologies: False."""
    pool = _sentinel_pool(client)
    if pool is None:
        return False
    before = pool.master_address
    return before is not None and pool.get_master_address() != before
