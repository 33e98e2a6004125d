"""RedisBackend: presence and routing shared through Redis, for many workers and hosts.

Each worker is a node. Local users are served from memory (local.LocalSessions) without
touching Redis; the rest is composed of the presence store (presence.py), the router
(router.py), the node bus (bus.py, with its wire format in wire.py) and the heartbeat
(heartbeat.py). Works on one Redis, behind Sentinel, and on Redis Cluster (keys.py).
See docs/scaling.md.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

import redis

from ..base import (
    NO_EVENTS, Backend, BackendEvents, Claim, EncryptionKey, Held, HeldOffer, Presence,
    Released, Session, Spawn, local_refusal, nothing,
)
from ..local import LocalSessions
from . import wire
from .bus import Bus
from .clients import is_cluster, make_client
from .heartbeat import Heartbeat
from .keys import CLUSTER_GROUPS, Keys
from .presence import PresenceStore
from .router import Router
from .held import HeldStore
from .watchers import Watchers

log = logging.getLogger("volli.redis")

# Releases get a client of their own that gives up quickly: a drain with Redis down must
# end well within gunicorn's graceful timeout (presence then expires by TTL).
RELEASE_TIMEOUT = 1.0


class RedisBackend(Backend):
    def __init__(self, settings, events: BackendEvents = NO_EVENTS) -> None:
        super().__init__(events)
        cluster = is_cluster(settings)
        self.keys = Keys(settings.redis_prefix, CLUSTER_GROUPS if cluster else 1)
        self.node = wire.node_id(f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}")
        # Retried only when the connection failed, never after a timeout: the command may
        # still run once Redis answers (a paused Redis), and a relay published twice would
        # arrive twice (the invariant soak saw it).
        client = make_client(settings, socket_timeout=5, connect_timeout=2,
                             pool_size=settings.redis_pool_size, pool_timeout=5, retries=2,
                             health_check_interval=30)
        # The listener blocks on its own connection, with no read timeout. No retry of its
        # own: redis-py would resubscribe silently, and this node must know (it logs, and
        # announces its users again: notices sent meanwhile were lost).
        listener = make_client(settings, socket_timeout=None, connect_timeout=2, retries=0,
                               health_check_interval=10)
        quick = make_client(settings, socket_timeout=RELEASE_TIMEOUT,
                            connect_timeout=RELEASE_TIMEOUT, pool_size=2,
                            pool_timeout=RELEASE_TIMEOUT)
        self.local = LocalSessions(events)
        self.bus = Bus(self.keys, self.node, events, client, listener, self._received,
                       self._listener_recovered, follow=(client, quick))
        self.presence = PresenceStore(settings, self.keys, self.node, self.local, events,
                                      client, quick, self._notify, cluster, self._wake)
        self.router = Router(self.keys, self.local, events, client, self.bus, self._healthy,
                             cluster)
        self.watchers = Watchers(self.keys, self.node, events, client, self.presence.ttl_ms,
                                 cluster)
        self.held = HeldStore(self.keys, self.node, events, client, cluster)
        self.heartbeat = Heartbeat(settings, self.keys, self.node, self.local, events, client,
                                   self.presence, self.watchers, self.router.expire_routes,
                                   cluster)

    # -- wiring -----------------------------------------------------------------------

    def _received(self, message: wire.Message) -> None:
        if isinstance(message, wire.Replace):  # a signed registration elsewhere took it
            self.local.replace(message.session_id)
        elif isinstance(message, wire.PresenceChange):
            self.watchers.received(message)
        else:
            self.router.received(message)

    def _notify(self, node: str, group: int, message: wire.Message) -> None:
        try:
            self.bus.send(node, group, message)
        except redis.RedisError as exc:  # its node's heartbeat will find out (TTL/4)
            self._events.backend_failed("takeover")
            log.warning("could not tell node %s: %s: %s", node, message, exc)

    def _listener_recovered(self) -> None:
        self.presence.epochs.announce_all()

    def _wake(self) -> None:
        self.heartbeat.wake()

    def _healthy(self) -> bool:
        return self.bus.subscribed and self.heartbeat.store_ok

    # -- Backend ----------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        self.local.attach(session)

    def detach(self, session: Session, then: Released = nothing) -> None:
        self.presence.detach(session, then)

    def claim(self, session: Session, user_id: str, public_key: str, signed: bool,
              encryption_key: EncryptionKey | None = None) -> Claim:
        # A live user of this worker is known here even when the store has forgotten it
        # (restarted empty): the same rule answers without it.
        refusal = local_refusal(self.local.holder(user_id), session, public_key, signed)
        if refusal is not None:
            return refusal
        return self.presence.claim(session, user_id, public_key, signed, encryption_key)

    def rebind(self, session: Session, new_public_key: str,
               encryption_key: EncryptionKey | None = None) -> bool:
        return self.presence.rebind(session, new_public_key, encryption_key)

    def unbind(self, user_id: str) -> bool:
        return self.presence.unbind(user_id)

    def lookup(self, user_id: str) -> Presence:
        return self.local.presence(user_id) or self.presence.lookup(user_id)

    def watch(self, user_ids: list[str]) -> list[Presence]:
        return self.watchers.watch(user_ids)

    def unwatch(self, user_ids: list[str]) -> None:
        self.watchers.unwatch(user_ids)

    def hold(self, session, callee, frame, seconds, per_callee) -> Held:
        if self.local.holds(callee):
            return Held.ONLINE
        return self.held.hold(session, callee, frame, seconds, per_callee)

    def hold_candidate(self, session, callee, frame, max_frames) -> Held:
        return self.held.hold_candidate(session, callee, frame, max_frames)

    def take_held(self, callee: str) -> list[HeldOffer]:
        if self.presence.nothing_held(callee):  # the claim said so: no round trip
            return []
        return self.held.take(callee)

    def drop_held(self, callee: str, caller: str, session_id: str) -> bool:
        return self.held.drop(callee, caller, session_id)

    def cancel_held(self, caller: str, session_id: str, callees: list[str]) -> None:
        self.held.cancel(caller, session_id, callees)

    def push_subscribe(self, user_id: str, subscription: dict, keep: int) -> None:
        self.presence.push_subscribe(user_id, subscription, keep)

    def push_unsubscribe(self, user_id: str, endpoint: str) -> bool:
        return self.presence.push_unsubscribe(user_id, endpoint)

    def push_subscriptions(self, user_id: str) -> list[dict]:
        return self.presence.push_subscriptions(user_id)

    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        if self.local.holds(user_id):
            return self.local.deliver(user_id, text, origin)
        return self.router.deliver(user_id, text, origin)

    def local_sessions(self) -> list[Session]:
        return self.local.sessions()

    def online_count(self) -> int:
        return self.local.user_count()

    # -- background tasks -------------------------------------------------------------

    def start(self, spawn: Spawn) -> None:
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            raise RuntimeError("the Redis backend needs gevent-patched sockets: "
                               "run it under gunicorn's gevent worker")
        # Created here: after patching, gevent's.
        self.heartbeat.start(threading.Event())
        self.router.start(spawn, threading.RLock())
        self.held.start(spawn)
        self.presence.start(spawn, threading.Lock())
        try:  # before serving: registrations need the store's epoch
            self.heartbeat.beat()  # a TTLMismatch stops this worker from booting
        except redis.RedisError as exc:
            log.error("redis unreachable at start: %s", exc)

    def loops(self) -> dict:
        return {"redis-listener": self.bus.listen, "redis-heartbeat": self.heartbeat.run}

    def stop(self) -> None:
        self.presence.release_queued()  # before exit: other nodes must see these users leave
        self.bus.stop()
        self.heartbeat.stop()

    def readiness(self) -> tuple[bool, str]:
        if not self.bus.subscribed:
            return False, "redis listener not subscribed"
        if not self.heartbeat.store_ok:
            return False, "redis unreachable"
        return True, "ok"
