"""The node bus: messages to other nodes' channels, and this node's listener.

Each node (worker) listens on its own channel (one per group on a cluster, with sharded
pub/sub, keys.py); what it hears is decoded by wire.py and handed to ``handle``. Pub/sub
is at-most-once: while the listener reconnects, messages to this node are lost, so once
it is back the node announces its users again (``on_recovered``).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import redis

from ... import redis_connect
from ..base import BackendEvents
from . import wire
from .keys import Keys

log = logging.getLogger("volli.redis")

LISTEN_POLL = 1.0  # seconds a listener waits for a message before checking its state
# The listener reconnects quickly: while it is away, relays to this node's users find no
# subscriber and delete their presence.
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 1.0


class Bus:
    def __init__(self, keys: Keys, node: str, events: BackendEvents, client, listener,
                 handle: Callable[[wire.Message], None],
                 on_recovered: Callable[[], None], follow: tuple = ()) -> None:
        """``follow``: with Sentinel, the other clients to move to a new primary."""
        self._keys, self.node, self._events = keys, node, events
        self._redis, self._listener = client, listener
        self._sentinel = redis_connect.follows_sentinel(listener)
        self._follow = follow
        self._handle, self._on_recovered = handle, on_recovered
        self.subscribed = False
        self._stopped = False

    # -- sending ----------------------------------------------------------------------

    def _publish(self, client, node: str, group: int, message: wire.Message):
        channel = self._keys.channel(group, node)
        data = wire.encode(message, wire.version_for(node))
        if self._keys.sharded:  # one shard's pub/sub, not every shard's
            return client.spublish(channel, data)
        return client.publish(channel, data)

    def send(self, node: str, group: int, message: wire.Message) -> int:
        """Publish to ``node``'s channel in ``group``; how many listeners got it."""
        return self._publish(self._redis, node, group, message)

    def send_many(self, messages: list[tuple[str, int, wire.Message]]) -> list[int]:
        """Publish (node, group, message) each, in one pipelined round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for node, group, message in messages:
            self._publish(pipe, node, group, message)
        return pipe.execute()

    # -- listening --------------------------------------------------------------------

    def stop(self) -> None:
        self._stopped = True

    def listen(self) -> None:
        backoff = BACKOFF_FIRST
        lost_at: float | None = None
        channels = [self._keys.channel(g, self.node) for g in range(self._keys.groups)]
        while not self._stopped:
            # On a cluster a shard that loses a slot (failover, resharding) says so with
            # `sunsubscribe`: that message is needed (see _read).
            pubsub = None
            try:
                pubsub = redis_connect.subscribe(self._listener, channels,
                                                 ignore_subscribe_messages=not self._keys.sharded)
                self.subscribed = True
                backoff = BACKOFF_FIRST
                if lost_at is not None:
                    log.warning("redis listener recovered after %.1fs; re-announcing users",
                                time.monotonic() - lost_at)
                    lost_at = None
                    self._on_recovered()
                else:
                    log.info("redis listener subscribed to %s%s", channels[0],
                             f" and {len(channels) - 1} more" if len(channels) > 1 else "")
                if self._keys.sharded:
                    self._read_shards(list(pubsub.node_pubsub_mapping.values()))
                else:
                    self._read(pubsub)
            except (redis.RedisError, OSError) as exc:
                self._events.backend_failed("listener")
                self.subscribed = False
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.error("redis listener lost: %s; reconnecting with backoff", exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP)
            finally:
                if pubsub is not None:
                    _close_quietly(pubsub)
        self.subscribed = False

    def _read(self, pubsub) -> None:
        check_at = time.monotonic() + LISTEN_POLL
        while not self._stopped:
            message = pubsub.get_message(timeout=LISTEN_POLL)
            if self._sentinel and time.monotonic() >= check_at:
                check_at = time.monotonic() + LISTEN_POLL
                self._follow_primary(pubsub)
            if message is None:
                continue
            kind = message["type"]
            if kind in ("message", "smessage"):
                self.dispatch(message["data"])
            elif kind == "sunsubscribe":  # the slot moved: subscribe again where it is now
                raise redis.ConnectionError(f"unsubscribed from {message['channel']!r} by "
                                            "the cluster (its slot moved)")

    def _read_shards(self, shards: list) -> None:
        """Read each shard's connection in a greenlet of its own (redis-py's cluster
        pub/sub polls them in turn, each with its timeout); the first that fails ends
        them all, to subscribe again."""
        import gevent

        readers = [gevent.spawn(self._read_until_lost, shard) for shard in shards]
        try:
            first = gevent.wait(readers, count=1)[0]
        finally:
            gevent.killall(readers)
        if isinstance(first.value, Exception):
            raise first.value
        if not self._stopped:  # it died of something else (gevent printed it)
            raise RuntimeError("a shard's pub/sub reader stopped")

    def _read_until_lost(self, pubsub) -> Exception | None:
        """_read, returning its Redis failure instead of dying of it (gevent would print
        that as an unhandled error)."""
        try:
            self._read(pubsub)
        except (redis.RedisError, OSError) as exc:
            return exc
        return None

    def _follow_primary(self, pubsub) -> None:
        """Sentinel: neither a subscriber nor pooled connections on a demoted primary are
        told (redis_connect): move the clients, and subscribe again on the new primary."""
        for client in self._follow:
            redis_connect.follow_primary(client)
        moved = redis_connect.primary_moved(self._listener, pubsub)
        if moved:
            raise redis.ConnectionError(f"the Redis primary moved to {moved}")

    def dispatch(self, data: bytes) -> None:
        try:
            message = wire.decode(data)
        except wire.WireError as exc:  # a peer of another version: never guessed at
            self._events.backend_failed("wire")
            log.warning("unreadable message on this node's channel (%s): %r", exc, data[:40])
            return
        try:
            self._handle(message)
        except Exception:
            log.exception("bad message on this node's channel")


def _close_quietly(pubsub) -> None:
    try:
        pubsub.close()
    except Exception:
        pass
