"""Offers held for offline callees, in Redis (the rule: volli/backends/held.py): two
hashes per callee in its group, ``held-meta:<callee>`` (caller -> JSON {s: session, node,
at, exp, n: frames}) and ``held:<callee>`` (caller -> its frames, one per line: a relayed
frame is compact JSON, with no raw newline), each expiring a minute after the last offer
it holds. The
scripts (scripts.py) hold, add a candidate, take all and drop one atomically, on Redis's
clock; the hold script also checks the callee's presence, so an offer is never held for
a callee who registered meanwhile (its registration takes what was held before)."""

from __future__ import annotations

import logging

import redis

from ..base import BackendEvents, Held, HeldOffer, Session
from . import scripts
from .clients import guarded, script
from .keys import Keys

log = logging.getLogger("volli.redis")

_HOLD = {1: Held.OK, 2: Held.REPLACED, 0: Held.ONLINE, -1: Held.FULL}
_CANDIDATE = {1: Held.OK, 0: Held.NONE, -1: Held.FULL}


class HeldStore:
    def __init__(self, keys: Keys, node: str, events: BackendEvents, client,
                 cluster: bool) -> None:
        self._keys, self._node, self._events, self._redis = keys, node, events, client
        self._hold = script(client, scripts.HOLD, cluster)
        self._candidate = script(client, scripts.HOLD_CANDIDATE, cluster)
        self._take = script(client, scripts.TAKE_HELD, cluster)
        self._drop = script(client, scripts.DROP_HELD, cluster)
        self._spawn = None

    def start(self, spawn) -> None:
        self._spawn = spawn

    def _keys_of(self, callee: str) -> list[str]:
        return [self._keys.held_meta(callee), self._keys.held(callee)]

    def hold(self, session: Session, callee: str, frame: str, seconds: float,
             per_callee: int) -> Held:
        with guarded(self._events, "hold"):
            reply = self._hold(keys=[*self._keys_of(callee), self._keys.presence(callee)],
                               args=[session.user_id, session.id, frame, int(seconds * 1000),
                                     per_callee, self._node])
        return _HOLD[int(reply)]

    def hold_candidate(self, session: Session, callee: str, frame: str,
                       max_frames: int) -> Held:
        with guarded(self._events, "hold"):
            reply = self._candidate(keys=self._keys_of(callee),
                                    args=[session.user_id, session.id, frame, max_frames])
        return _CANDIDATE[int(reply)]

    def take(self, callee: str) -> list[HeldOffer]:
        with guarded(self._events, "hold"):
            replies = self._take(keys=self._keys_of(callee),
                                 args=[self._keys.alive_prefix(self._keys.group(callee))])
        offers = [(int(at), HeldOffer(caller.decode(), tuple(frames.decode().split("\n")),
                                      int(held_for)))
                  for caller, at, held_for, frames in replies]
        return [offer for _, offer in sorted(offers, key=lambda item: item[0])]

    def drop(self, callee: str, caller: str, session_id: str) -> bool:
        with guarded(self._events, "hold"):
            return bool(self._drop(keys=self._keys_of(callee), args=[caller, session_id]))

    def cancel(self, caller: str, session_id: str, callees: list[str]) -> None:
        """A caller closed: its held offers go, in the background (never blocks a close);
        if Redis cannot be reached they expire by themselves."""
        if self._spawn is None:
            self._cancel(caller, session_id, callees)
        else:
            self._spawn(self._cancel, caller, session_id, callees)

    def _cancel(self, caller: str, session_id: str, callees: list[str]) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for callee in callees:
                self._drop(keys=self._keys_of(callee), args=[caller, session_id], client=pipe)
            pipe.execute()
        except redis.RedisError as exc:
            self._events.backend_failed("hold")
            log.warning("could not cancel %d held offers of %s: %s", len(callees), caller, exc)
