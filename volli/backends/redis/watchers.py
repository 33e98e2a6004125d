"""This node's presence subscriptions in Redis.

A watched user has a sorted set of the nodes watching it (keys.watchers; score: until
when, renewed by each heartbeat like a presence, so a dead node's interest expires). Every
script that changes the user's presence (claim, release, unbind, the route script's
removal of a dead node's user) reads that set and publishes the change (wire P) to each
watcher node in the same script, so a node hears a user's changes in the order they
happened, and the cost of a change is one publish per watching node.

Some changes run no script, and the heartbeat finds them: a node that died or stalled
(its users' presences stay until their TTL ends; the heartbeat sees that node's alive key
gone, or back, and looks those users up), a presence that expired without a release (a
release that failed), and changes this node missed (its listener was away, or the store
lost its state: every watched user is looked up again).
"""

from __future__ import annotations

from ..base import BackendEvents, Presence
from . import scripts, wire
from .clients import guarded, script
from .keys import Keys
from .presence import batches, presence


class Watchers:
    def __init__(self, keys: Keys, node: str, events: BackendEvents, client, ttl_ms: int,
                 cluster: bool) -> None:
        self._keys, self.node, self._events, self._redis = keys, node, events, client
        self._ttl_ms = ttl_ms
        self._watch = script(client, scripts.WATCH, cluster)
        self._renew = script(client, scripts.RENEW_WATCH, cluster)
        # watched userId -> (the node its presence names, or '', whether it is online: a
        # presence whose node stopped beating is not)
        self._holders: dict[str, tuple[str, bool]] = {}
        self._heard: dict[str, int] = {}  # watched userId -> changes heard (see _apply)
        self._missed = False  # changes may have been missed: look every watched user up

    def watch(self, user_ids: list[str]) -> list[Presence]:
        for user_id in user_ids:  # heard from now on, while the lookup is under way
            self._holders.setdefault(user_id, ("", False))
        return self._look_up(user_ids, report=False)

    def unwatch(self, user_ids: list[str]) -> None:
        """Its Redis entries expire within a TTL (no longer renewed); a change heard
        meanwhile is ignored."""
        for user_id in user_ids:
            self._holders.pop(user_id, None)
            self._heard.pop(user_id, None)

    def received(self, change: wire.PresenceChange) -> None:
        if change.user_id not in self._holders:
            return  # unwatched since
        self._holders[change.user_id] = (change.node if change.online else "", change.online)
        self._heard[change.user_id] = self._heard.get(change.user_id, 0) + 1
        self._events.presence_changed(change.user_id, change.online)

    def missed(self) -> None:
        """Changes may have been lost (the listener was away, the store lost its state,
        Redis was unreachable): the next renewal looks every watched user up."""
        self._missed = True

    def renew(self) -> None:
        """The heartbeat's part: renew this node's watches, and look up the users whose
        node stopped beating, or beats again (every watched user after ``missed``)."""
        if not self._holders:
            return
        missed, self._missed = self._missed, False
        try:
            suspects = list(self._holders) if missed else self._on_stopped_nodes()
            if suspects:
                self._look_up(suspects, report=True)
        except Exception:
            self._missed = self._missed or missed  # try again at the next heartbeat
            raise

    def _on_stopped_nodes(self) -> list[str]:
        by_group: dict[int, list[tuple[str, tuple[str, bool]]]] = {}
        for user_id, state in list(self._holders.items()):
            by_group.setdefault(self._keys.group(user_id), []).append((user_id, state))
        suspects = []
        pipe = self._redis.pipeline(transaction=False)
        sent = []
        for group, users in by_group.items():
            for batch in batches(users):
                self._renew(keys=[key for user_id, _ in batch
                                  for key in (self._keys.watchers(user_id),
                                              self._keys.presence(user_id))],
                            args=[self.node, self._ttl_ms, self._keys.alive_prefix(group),
                                  *(holder for _, (holder, _) in batch)], client=pipe)
                sent.append(batch)
        for batch, replies in zip(sent, pipe.execute()):
            # Its node's heartbeat stopped while it reads online, or is back while not.
            suspects.extend(user_id for (user_id, (_, online)), alive in zip(batch, replies)
                            if alive != -1 and bool(alive) != online)
        return suspects

    def _look_up(self, user_ids: list[str], report: bool) -> list[Presence]:
        """Watch (again) and read each user's presence; ``report``: tell the hub of each
        (it compares with what it told), unless a change was heard meanwhile (newer)."""
        heard = {user_id: self._heard.get(user_id, 0) for user_id in user_ids}
        with guarded(self._events, "watch"):
            pipe = self._redis.pipeline(transaction=False)
            for user_id in user_ids:
                self._watch(keys=[self._keys.watchers(user_id), self._keys.presence(user_id),
                                  self._keys.binding(user_id)],
                            args=[self.node, self._ttl_ms,
                                  self._keys.alive_prefix(self._keys.group(user_id))],
                            client=pipe)
            replies = pipe.execute()
        presences = []
        for user_id, (holder, online, live, bound, *encryption) in zip(user_ids, replies):
            online, live = bool(online), live.decode()
            # Still watched, and no change heard since the lookup began (that one is newer).
            if user_id in self._holders and self._heard.get(user_id, 0) == heard[user_id]:
                self._holders[user_id] = (holder.decode(), online)
                if report:
                    self._events.presence_changed(user_id, online)
            presences.append(presence(user_id, live if online else None, bound.decode(),
                                      *(value.decode() for value in encryption)))
        return presences
