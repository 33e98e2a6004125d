"""Relays to users on other nodes, and relays that arrive from them.

A relay to a user on another node goes through the route script, which reads the user's
presence and publishes to its node in one round trip, and names that node: it is then
remembered for ROUTE_CACHE seconds. Relays to a remembered node are queued, and one
greenlet publishes each node's queue as one batch message per round trip. A frame that
reaches no node is reported to its sender (``events.report_undelivered``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from typing import Callable

import redis

from ...protocol import ProtocolError
from ..base import BackendEvents, BackendUnavailable
from ..local import LocalSessions
from . import scripts, wire
from .bus import Bus
from .clients import guarded, script
from .keys import Keys

log = logging.getLogger("volli.redis")

# Seconds a target's node is remembered after the route script named it. A relay sent
# within it to a user who just moved reaches the old node, which re-routes it once.
ROUTE_CACHE = 1.0


class Router:
    def __init__(self, keys: Keys, local: LocalSessions, events: BackendEvents, client,
                 bus: Bus, healthy: Callable[[], bool], cluster: bool) -> None:
        self._keys, self._local, self._events, self._bus = keys, local, events, bus
        self._healthy = healthy  # whether queued relays are likely to reach their node
        self._route = script(client, scripts.ROUTE, cluster)
        self._routes: dict[str, tuple[str, float]] = {}  # userId -> (node, until)
        self._outbox: list[tuple[str, str, str, str]] = []  # (node, userId, origin, frame)
        self._publishing = contextlib.nullcontext()  # a gevent lock once started
        self._publisher = None
        self._spawn = None

    def start(self, spawn, lock) -> None:
        # Reentrant: reporting a failed publish may relay again.
        self._spawn, self._publishing = spawn, lock

    def expire_routes(self) -> None:
        now = time.monotonic()
        self._routes = {user: route for user, route in self._routes.items() if route[1] > now}

    def deliver(self, user_id: str, text: str, origin: str | None) -> bool:
        """A relay to a user of another node (or of none)."""
        route = self._routes.get(user_id)
        # Queued only while Redis looks well: otherwise the sender hears `unavailable` now.
        if route is not None and self._healthy():
            if route[1] > time.monotonic():
                self._outbox.append((route[0], user_id, origin or "", text))
                if self._publisher is None:
                    self._publisher = self._spawn(self._publish_outbox)
                return True
            del self._routes[user_id]
        return self._route_now(user_id, text, origin)

    def _route_now(self, user_id: str, text: str, origin: str | None) -> bool:
        """The route script: one round trip that finds the node and publishes."""
        group = self._keys.group(user_id)
        body = wire.body(wire.Deliver(user_id, origin or "", text))
        with self._publishing:  # frames queued before this one are published before it
            self._publish_queued()
            with guarded(self._events, "publish"):
                reply = self._route(keys=[self._keys.presence(user_id), self._keys.epoch(group),
                                          self._keys.watchers(user_id)],
                                    args=[self._keys.channel_prefix(group), body,
                                          self._keys.alive_prefix(group), wire.header(b"D"),
                                          wire.header(b"D", 0), user_id, wire.header(b"P")])
        if int(reply[0]) <= 0:
            return False
        self._routes[user_id] = (reply[1].decode(), time.monotonic() + ROUTE_CACHE)
        return True

    def _publish_outbox(self) -> None:
        try:
            with self._publishing:
                self._publish_queued()
        finally:
            self._publisher = None

    def _publish_queued(self) -> None:
        """Publish what is queued, one message per node and one round trip in all; a
        frame that reaches no node is reported to its sender."""
        while self._outbox:
            queued, self._outbox = self._outbox, []
            by_node: dict[str, list[tuple[str, str, str]]] = {}
            for node, user_id, origin, text in queued:
                by_node.setdefault(node, []).append((user_id, origin, text))
            # On a cluster any of the node's channels reaches it: the first user's group.
            messages = [(node, self._keys.group(frames[0][0]), wire.Batch(tuple(frames)))
                        for node, frames in by_node.items()]
            try:
                counts = self._bus.send_many(messages)
            except redis.RedisError as exc:
                self._events.backend_failed("publish")
                log.warning("could not publish %d relays: %s", len(queued), exc)
                self._routes.clear()  # until Redis answers, relays take the direct path
                counts = [0] * len(by_node)
            for (node, frames), count in zip(by_node.items(), counts):
                if not count:  # that node is gone: forget it, tell the senders
                    for user_id, _, _ in frames:
                        self._routes.pop(user_id, None)
                    self._report(frames)

    def _report(self, frames) -> None:
        undelivered: dict[str, Counter[str]] = {}
        for user_id, origin, _ in frames:
            if origin:
                undelivered.setdefault(user_id, Counter())[origin] += 1
        for user_id, counts in undelivered.items():
            self._events.report_undelivered(user_id, counts)

    # -- relays that arrive -----------------------------------------------------------

    def received(self, message: wire.Deliver | wire.Batch) -> None:
        if isinstance(message, wire.Batch):  # sent here by a node that remembered this one
            for user_id, origin, text in message.frames:
                delivered = self._deliver_here(user_id, origin, text)
                if delivered is False and not self._reroute(user_id, origin, text):
                    self._report([(user_id, origin, text)])  # the user moved on
            return
        user_id, origin = message.user_id, message.origin
        if self._deliver_here(user_id, origin, message.text) is False and origin:
            # It left this node between the sender's lookup and now.
            self._events.report_undelivered(user_id, {origin: 1})

    def _deliver_here(self, user_id: str, origin: str, text: str) -> bool | None:
        """Deliver a frame published to this node to its local user; None when the user is
        here but too busy to take it (its sender is told so)."""
        try:
            return self._local.deliver(user_id, text, origin or None)
        except ProtocolError:  # peer-busy
            if origin:
                self._events.report_undelivered(user_id, {origin: 1}, True)
            return None

    def _reroute(self, user_id: str, origin: str, text: str) -> bool:
        if self._local.holds(user_id):
            return False
        self._routes.pop(user_id, None)
        try:
            return self._route_now(user_id, text, origin)
        except BackendUnavailable:
            return False
