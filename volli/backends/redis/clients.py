"""Redis clients for the backend, built by one function (``make_client``).

TEMPORARY: volli/redis_connect.py (parsing VOLLI_REDIS_URL into a topology, and building
clients for one Redis, Sentinel and Cluster) is being written separately; when it lands,
``make_client`` and ``is_cluster`` become calls to it and ``_parse`` goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..base import BackendEvents, BackendUnavailable
from .scripts import for_cluster


@dataclasses.dataclass(frozen=True)
class _Topology:  # TEMPORARY (see the module's docstring)
    kind: str  # "single", "sentinel" or "cluster"
    url: str  # single: the URL as given
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""


def _parse(url: str) -> _Topology:  # TEMPORARY
    for kind in ("cluster", "sentinel"):
        if url.startswith(f"redis+{kind}://"):
            parts = urlsplit(url)
            default = 26379 if kind == "sentinel" else 6379
            nodes = tuple(_host_port(n, default) for n in parts.netloc.split(","))
            return _Topology(kind, url, nodes, parts.path.strip("/"))
    return _Topology("single", url)


def _host_port(text: str, default: int) -> tuple[str, int]:  # TEMPORARY
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep else (text, default)


def is_cluster(settings) -> bool:
    return _parse(settings.redis_url).kind == "cluster"


def make_client(settings, *, socket_timeout: float | None, connect_timeout: float,
                pool_size: int | None = None, pool_timeout: float | None = None,
                retries: int | None = None, health_check_interval: int = 0):
    """A client of the configured Redis. ``retries``: how often a command is sent again
    after the connection failed (never after a timeout: the command may still run; None:
    redis-py's default).
    ``pool_size``: connections, waited for up to ``pool_timeout`` (None: unbounded)."""
    topology = _parse(settings.redis_url)
    options = dict(socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                   health_check_interval=health_check_interval)
    if retries is not None:
        options["retry"] = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries,
                                 supported_errors=(redis.ConnectionError,))
    pool = {}
    if pool_size is not None:
        pool = dict(connection_pool_class=redis.BlockingConnectionPool,
                    max_connections=pool_size, timeout=pool_timeout)
    if topology.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        # Per shard; redis-py's cluster takes no pool class that waits (TEMPORARY).
        sizes = {"max_connections": pool_size} if pool_size else {}
        if retries is not None:
            # redis-py's cluster retries after a timeout too, whatever the Retry's errors
            # (a script run twice: a relay delivered twice), so it gets no retries.
            options["retry"] = Retry(ExponentialBackoff(cap=0.2, base=0.02), 0)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in topology.nodes],
                            **options, **sizes)
    if topology.kind == "sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(list(topology.nodes), socket_timeout=connect_timeout,
                            socket_connect_timeout=connect_timeout)
        return sentinel.master_for(topology.service, **options)
    if pool:
        del pool["connection_pool_class"]
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            topology.url, **options, **pool))
    return redis.Redis.from_url(topology.url, **options)


@contextlib.contextmanager
def guarded(events: BackendEvents, operation: str):
    """Redis failures are counted and reach the hub as BackendUnavailable."""
    try:
        yield
    except redis.RedisError as exc:
        events.backend_failed(operation)
        raise BackendUnavailable(str(exc)) from exc


def script(client, text: str, cluster: bool):
    """``text`` registered on ``client``: called as (keys, args, client=None), on
    ``client`` or on a pipeline. A cluster's pipeline cannot load a script its shard lacks
    (restarted, failed over), so there it is sent whole (EVAL)."""
    registered = client.register_script(for_cluster(text) if cluster else text)
    if not cluster:
        return registered

    def run(keys, args, client=None):
        if client is None:
            return registered(keys=keys, args=args)
        return client.execute_command("EVAL", registered.script, len(keys), *keys, *args)
    return run
