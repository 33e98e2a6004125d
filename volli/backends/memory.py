"""Presence in this process only: the embedded default for a single worker."""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from .base import (
    NO_EVENTS, Backend, BackendEvents, Claim, EncryptionKey, Held, HeldOffer, Presence,
    Released, Session, nothing,
)
from .held import MemoryHeld
from .local import LocalSessions

log = logging.getLogger("volli.memory")


class MemoryBackend(Backend):
    """Dicts in one process. Under gevent nothing here yields, so each method is atomic.

    Only signed registrations leave something behind: a binding userId -> key, kept for
    ``retention`` seconds after its last use (a registration or a close), at most
    ``max_bindings`` of them: beyond that a new binding is refused (Claim.FULL), since
    forgetting one early would hand its ID to anyone."""

    def __init__(self, max_bindings: int = 100_000, retention: float = 90 * 86400.0,
                 clock: Callable[[], float] = time.monotonic,
                 events: BackendEvents = NO_EVENTS) -> None:
        super().__init__(events)
        self._local = LocalSessions(events)
        # userId -> (bound key, forgotten at, published encryption key), least recently
        # used first
        self._bindings: collections.OrderedDict[
            str, tuple[str, float, EncryptionKey | None]] = collections.OrderedDict()
        self._max_bindings = max_bindings
        self._retention = retention
        self._clock = clock
        self._full_logged_at = float("-inf")
        self._held = MemoryHeld(clock)
        # userId -> endpoint -> (subscription, forgotten at), oldest first; only bound IDs
        self._push: dict[str, collections.OrderedDict[str, tuple[dict, float]]] = {}

    def attach(self, session: Session) -> None:
        self._local.attach(session)

    def detach(self, session: Session, then: Released = nothing) -> None:
        if self._local.forget(session):
            entry = self._bindings.get(session.user_id) if session.signed else None
            if entry is not None:
                self._bind(session.user_id, entry[0], entry[2])
            self._events.presence_changed(session.user_id, False)
        then()

    def claim(self, session: Session, user_id: str, public_key: str, signed: bool,
              encryption_key: EncryptionKey | None = None) -> Claim:
        key = self._bound_key(user_id)
        if key is not None and not signed:
            return Claim.BOUND
        if key is not None and key != public_key:
            return Claim.KEY_MISMATCH
        if signed and key is None and self._full():
            return Claim.FULL
        holder = self._local.holder(user_id)
        outcome = Claim.OK
        if holder is not None and holder is not session:
            if not (signed and holder.public_key == public_key):
                return Claim.TAKEN
            outcome = Claim.TAKEN_OVER
        if signed:
            self._bind(user_id, public_key, encryption_key)
        # replaces a taken-over holder
        self._local.hold(session, user_id, public_key, signed, encryption_key)
        self._events.presence_changed(user_id, True)
        return outcome

    def rebind(self, session: Session, new_public_key: str,
               encryption_key: EncryptionKey | None = None) -> bool:
        if (not session.signed or self._local.holder(session.user_id) is not session
                or self._bound_key(session.user_id) != session.public_key):
            return False
        self._bind(session.user_id, new_public_key, encryption_key)
        session.public_key, session.encryption_key = new_public_key, encryption_key
        return True

    def unbind(self, user_id: str) -> bool:
        self._push.pop(user_id, None)  # they belong to the binding
        had = self._bindings.pop(user_id, None) is not None
        holder = self._local.holder(user_id)
        if holder is not None:
            self._events.replace(holder)
        return had or holder is not None

    def lookup(self, user_id: str) -> Presence:
        local = self._local.presence(user_id)
        if local is not None:
            return local
        key = self._bound_key(user_id)
        return Presence(user_id, False, key, key is not None,
                        self._bindings[user_id][2] if key is not None else None)

    def watch(self, user_ids: list[str]) -> list[Presence]:
        return [self.lookup(user_id) for user_id in user_ids]  # changes come from here

    def unwatch(self, user_ids: list[str]) -> None:
        pass

    def hold(self, session, callee, frame, seconds, per_callee) -> Held:
        if self._local.holds(callee):
            return Held.ONLINE
        return self._held.hold(session, callee, frame, seconds, per_callee)

    def hold_candidate(self, session, callee, frame, max_frames) -> Held:
        return self._held.hold_candidate(session, callee, frame, max_frames)

    def take_held(self, callee: str) -> list[HeldOffer]:
        return self._held.take(callee)

    def drop_held(self, callee: str, caller: str, session_id: str) -> bool:
        return self._held.drop(callee, caller, session_id)

    def cancel_held(self, caller: str, session_id: str, callees: list[str]) -> None:
        for callee in callees:
            self._held.drop(callee, caller, session_id)

    def push_subscribe(self, user_id: str, subscription: dict, keep: int) -> None:
        subs = self._push.setdefault(user_id, collections.OrderedDict())
        subs.pop(subscription["endpoint"], None)
        subs[subscription["endpoint"]] = (subscription, self._clock() + self._retention)
        while len(subs) > keep:
            subs.popitem(last=False)

    def push_unsubscribe(self, user_id: str, endpoint: str) -> bool:
        subs = self._push.get(user_id, {})
        gone = subs.pop(endpoint, None) is not None
        if not subs:
            self._push.pop(user_id, None)
        return gone

    def push_subscriptions(self, user_id: str) -> list[dict]:
        now = self._clock()
        subs = self._push.get(user_id, {})
        for endpoint in [e for e, (_, until) in subs.items() if until <= now]:
            del subs[endpoint]
        # An ID no longer bound to a key has none (its binding expired or was evicted).
        if self._bound_key(user_id) is None:
            self._push.pop(user_id, None)
            return []
        return [sub for sub, _ in subs.values()]

    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        return self._local.deliver(user_id, text, origin)

    def local_sessions(self) -> list[Session]:
        return self._local.sessions()

    def online_count(self) -> int:
        return self._local.user_count()

    def binding_count(self) -> int:
        return len(self._bindings)

    # -- bindings ---------------------------------------------------------------------

    def _bound_key(self, user_id: str) -> str | None:
        entry = self._bindings.get(user_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            holder = self._local.holder(user_id)
            if holder is not None and holder.signed:  # in use: never expires
                self._bind(user_id, entry[0], entry[2])
            else:
                del self._bindings[user_id]
                return None
        return entry[0]

    def _bind(self, user_id: str, public_key: str,
              encryption_key: EncryptionKey | None = None) -> None:
        """Bind (or touch) ``user_id``: it becomes the most recently used."""
        self._bindings[user_id] = (public_key, self._clock() + self._retention,
                                   encryption_key)
        self._bindings.move_to_end(user_id)

    def _full(self) -> bool:
        """Whether a new binding would pass the cap, once the expired ones are gone (they
        are the least recently used, at the front). An online signed user's binding never
        expires: it is touched instead."""
        now = self._clock()
        for _ in range(len(self._bindings)):
            oldest, (key, until, encryption_key) = next(iter(self._bindings.items()))
            if until > now:
                break
            holder = self._local.holder(oldest)
            if holder is not None and holder.signed:
                self._bind(oldest, key, encryption_key)
            else:
                del self._bindings[oldest]
        if len(self._bindings) < self._max_bindings:
            return False
        if now >= self._full_logged_at + 60:  # one line a minute, not one per refusal
            self._full_logged_at = now
            log.warning("VOLLI_MAX_BINDINGS=%d reached: new signed user IDs are refused "
                        "(bindings-full) until bindings expire", self._max_bindings)
        return True
