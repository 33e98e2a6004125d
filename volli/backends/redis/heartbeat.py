"""The node's heartbeat: stamp the store's epoch (per group) and this node's alive key,
renew the presence of local users the store still names, announce again the ones it lost.

The epoch tells a store that lost its state (restarted empty, or paused) from a healthy
one; see scripts.py (_EPOCH). A group whose epoch changed has all its local users
announced again at once, while registrations in it are refused.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable

import redis

from ..base import BackendEvents, Session
from ..local import LocalSessions
from . import scripts
from .bus import BACKOFF_CAP
from .clients import script
from .keys import Keys
from .presence import PresenceStore
from .watchers import Watchers

log = logging.getLogger("volli.redis")


class TTLMismatch(RuntimeError):
    """This server's presence TTL is not the one of the servers sharing its Redis."""


class Heartbeat:
    def __init__(self, settings, keys: Keys, node: str, local: LocalSessions,
                 events: BackendEvents, client, presence: PresenceStore, watchers: Watchers,
                 expire_routes: Callable[[], None], cluster: bool) -> None:
        self._keys, self.node, self._local, self._events = keys, node, local, events
        self._redis, self._presence, self._expire_routes = client, presence, expire_routes
        self._watchers = watchers
        self._every = settings.presence_ttl / 4
        self._prefix = settings.redis_prefix
        self._beat_script = script(client, scripts.BEAT, cluster)
        self._renewed_at = float("-inf")  # when bindings were last renewed
        self.store_ok = True
        self._stopped = False
        self._wake = None  # a gevent event once started

    def start(self, wake) -> None:
        self._wake = wake

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self.wake()

    def run(self) -> None:
        epochs = self._presence.epochs
        while not self._stopped:
            self._expire_routes()
            try:
                lost = self.announce()
                if not self.store_ok:
                    log.warning("redis reachable again; announced %d users",
                                self._local.user_count())
                self.store_ok = True
                for session in lost:
                    log.info("user=%s id=%s: the store names another session; replaced",
                             session.user_id, session.id)
                    self._events.replace(session)
            except redis.RedisError as exc:
                self._events.backend_failed("heartbeat")
                epochs.announce_all(wake=False)
                if self.store_ok:
                    log.error("redis unreachable: %s; serving local users only", exc)
                self.store_ok = False
            if not self.store_ok:
                self._wake.wait(BACKOFF_CAP)
            elif not epochs.pending:  # else announce again at once (epoch changed)
                self._wake.wait(self._every)
            self._wake.clear()

    def beat(self) -> None:
        """Stamp the store's epoch in every group (one round trip); a new one means the
        group's shard lost its state."""
        ttl_ms, epochs = self._presence.ttl_ms, self._presence.epochs
        pipe = self._redis.pipeline(transaction=False)
        for group in range(self._keys.groups):
            self._beat_script(keys=[self._keys.epoch(group),
                                    self._keys.alive_prefix(group) + self.node],
                              args=[ttl_ms, secrets.token_hex(8), epochs.get(group)],
                              client=pipe)
        for group, (epoch, ttl) in enumerate(pipe.execute()):
            if int(ttl) != ttl_ms:
                raise TTLMismatch(
                    f"VOLLI_PRESENCE_TTL is {ttl_ms / 1000:g} s here but "
                    f"{int(ttl) / 1000:g} s on the servers already sharing this Redis prefix "
                    f"({self._prefix!r}): every server must use the same value (change it on "
                    "all at once, or move to a new VOLLI_REDIS_PREFIX)")
            epochs.adopt(group, epoch.decode())

    def announce(self) -> list[Session]:
        """Renew the presence of every local user that the store still names as its
        holder (compare-and-renew, one script per batch), announce again those it lost
        (every user of a group whose epoch changed), renew this node's watches (looking
        watched users up if changes may have been missed); returns the sessions whose
        userId another session holds now: they are replaced."""
        self.beat()
        presence, epochs = self._presence, self._presence.epochs
        if presence.releases_kept:
            presence.release_queued()
        owned = self._local.owned()
        self._renew_bindings(owned)
        pending, epochs.pending = epochs.pending, set()
        if pending:  # the store lost state, or this node was cut off: changes were missed
            self._watchers.missed()
        again = [(u, s) for u, s in owned if self._keys.group(u) in pending]
        missing, lost = presence.refresh([(u, s) for u, s in owned
                                          if self._keys.group(u) not in pending])
        lost += presence.reclaim(again + missing)
        self._watchers.renew()
        return lost

    def _renew_bindings(self, owned: list[tuple[str, Session]]) -> None:
        """A third of the retention after the last renewal, renew the bindings of online
        signed users (the heartbeat runs at least that often: config.py checks)."""
        now = time.monotonic()
        if now - self._renewed_at < self._presence.retention_ms / 3000:
            return
        self._presence.renew_bindings(owned)
        self._renewed_at = now
