"""Redis clients for the backend, built by one function (``make_client``) through
volli/redis_connect.py, which knows one Redis, Sentinel and Cluster."""

from __future__ import annotations

import contextlib

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ... import redis_connect
from ..base import BackendEvents, BackendUnavailable
from .scripts import for_cluster


def is_cluster(settings) -> bool:
    return settings.redis_topology.kind == redis_connect.CLUSTER


def make_client(settings, *, socket_timeout: float | None, connect_timeout: float,
                pool_size: int | None = None, pool_timeout: float | None = None,
                retries: int | None = None, health_check_interval: int = 0):
    """A client of the configured Redis. ``retries``: how often a command is sent again
    after the connection failed (never after a timeout: the command may still run, and a
    relay would arrive twice; None: redis-py's default).
    ``pool_size``: connections (per node on a cluster), waited for up to ``pool_timeout``."""
    retry = None
    if retries is not None:
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), retries,
                      supported_errors=(redis.ConnectionError,))
    return redis_connect.connect(
        settings.redis_topology, max_connections=pool_size, pool_timeout=pool_timeout,
        retry=retry, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
        health_check_interval=health_check_interval)


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
