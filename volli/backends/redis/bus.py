"""The node bus: messages to other nodes' channels, and this node's listener.

Each node (worker) listens on its own channel (one per group on a cluster, with sharded
pub/sub, keys.py); what it hears is decoded by wire.py and handed to ``handle``. Pub/sub
is at-most-once: while the listener reconnects, messages to this node find no subscriber
(their senders are told), so once it is back the node announces its users again
(``on_recovered``).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import gevent
import redis
from gevent.event import AsyncResult

from ... import redis_connect
from ..base import BackendEvents
from . import wire
from .keys import Keys

log = logging.getLogger("volli.redis")

LISTEN_POLL = 1.0  # seconds a listener waits for a message before checking its state
DRAIN = 1.0  # seconds a lost subscription is read for what Redis queued before it ended
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
            pubsub = None
            try:
                pubsub = redis_connect.subscribe(self._listener, channels)
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
                    self._read_one(pubsub)
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

    # A subscription that must be made again (a cluster slot moved, a Sentinel primary
    # moved) is not simply closed: a publisher was told its message reached this node as
    # soon as Redis queued it on our connection, and closing would drop what is still
    # unread. So each connection is unsubscribed and read until Redis confirms it holds no
    # subscription (what it queued before that is delivered; what comes after finds no
    # subscriber, and its sender is told), for at most DRAIN seconds.

    def _read_one(self, pubsub) -> None:
        lost = AsyncResult()
        self._read(pubsub, lost)
        if lost.ready():
            raise lost.value

    def _read_shards(self, shards: list) -> None:
        """Read each shard's connection in a greenlet of its own (redis-py's cluster
        pub/sub polls them in turn, each with its timeout); when one is lost, all are
        drained, to subscribe again."""
        lost = AsyncResult()
        readers = [gevent.spawn(self._read_until_failed, shard, lost) for shard in shards]
        try:
            gevent.wait([lost, *readers], count=1)
            if lost.ready():
                for shard in shards:
                    _unsubscribe_quietly(shard)
                gevent.joinall(readers, timeout=DRAIN)
        finally:
            gevent.killall(readers)
        if lost.ready():
            raise lost.value
        if not self._stopped:  # a reader died of something else (gevent printed it)
            raise RuntimeError("a shard's pub/sub reader stopped")

    def _read_until_failed(self, pubsub, lost: AsyncResult) -> None:
        """_read, recording its Redis failure in ``lost`` instead of dying of it (gevent
        would print that as an unhandled error)."""
        try:
            self._read(pubsub, lost)
        except (redis.RedisError, OSError) as exc:
            if not lost.ready():
                lost.set(exc)

    def _read(self, pubsub, lost: AsyncResult) -> None:
        """Dispatch what ``pubsub`` hears until it is lost (``lost`` is set, here or by
        another shard's reader) and drained, or the bus stops."""
        check_at = time.monotonic() + LISTEN_POLL
        drain_until: float | None = None
        while not self._stopped:
            now = time.monotonic()
            if lost.ready():
                drain_until = drain_until or now + DRAIN
                if now >= drain_until:
                    return
            elif self._sentinel and now >= check_at:
                check_at = now + LISTEN_POLL
                moved = self._follow_primary(pubsub)
                if moved:
                    lost.set(redis.ConnectionError(f"the Redis primary moved to {moved}"))
                    _unsubscribe_quietly(pubsub)
                    continue
            wait = LISTEN_POLL if drain_until is None else max(0.0, drain_until - now)
            message = pubsub.get_message(timeout=wait)
            if message is None:
                continue
            kind = message["type"]
            if kind in ("message", "smessage"):
                self.dispatch(message["data"])
            elif kind in ("unsubscribe", "sunsubscribe"):
                if not lost.ready():  # not asked for: the cluster moved the slot
                    lost.set(redis.ConnectionError(
                        f"unsubscribed from {message['channel']!r} by the cluster (its "
                        "slot moved)"))
                if message["data"] == 0:  # this connection holds no subscription now
                    return

    def _follow_primary(self, pubsub) -> str | None:
        """Sentinel: neither a subscriber nor pooled connections on a demoted primary are
        told (redis_connect): move the clients; where the primary is now, if ``pubsub``
        is not subscribed there."""
        for client in self._follow:
            redis_connect.follow_primary(client)
        return redis_connect.primary_moved(self._listener, pubsub)

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


def _unsubscribe_quietly(pubsub) -> None:
    """Ask Redis to end every subscription of ``pubsub`` (its reader sees the replies);
    a connection that is gone has none left to drain."""
    try:
        if pubsub.shard_channels:
            pubsub.sunsubscribe()
        else:
            pubsub.unsubscribe()
    except (redis.RedisError, OSError):
        pass


def _close_quietly(pubsub) -> None:
    try:
        pubsub.close()
    except Exception:
        pass
