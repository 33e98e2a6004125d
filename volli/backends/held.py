"""Offers held for offline callees, in this process's memory (the in-memory backend's
store; the Redis backend keeps them in Redis: redis/held.py). The rule, the same in both:
one held offer per (callee, caller), a new one replacing the last; at most ``per_callee``
callers' offers per callee; candidates only with the caller's own held offer; a callee who
registers takes them all at once; a caller's offer goes only with that caller's session,
which drops it when its time is up (and then tells the caller), or when it closes: every
offer held here is dropped by its caller's session, so none outlives it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from .base import Held, HeldOffer, Session


@dataclasses.dataclass(slots=True)
class _Record:
    session: str
    frames: list[str]
    at: float
    expires: float


class MemoryHeld:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, dict[str, _Record]] = {}  # callee -> caller -> record

    def hold(self, session: Session, callee: str, frame: str, seconds: float,
             per_callee: int) -> Held:
        now = self._clock()
        records = self._held.setdefault(callee, {})
        others = sum(caller != session.user_id and r.expires > now
                     for caller, r in records.items())
        if others >= per_callee:
            if not records:
                del self._held[callee]
            return Held.FULL
        previous = records.get(session.user_id)
        records[session.user_id] = _Record(session.id, [frame], now, now + seconds)
        return Held.REPLACED if previous is not None and previous.expires > now else Held.OK

    def hold_candidate(self, session: Session, callee: str, frame: str,
                       max_frames: int) -> Held:
        record = self._held.get(callee, {}).get(session.user_id)
        if record is None or record.session != session.id or record.expires <= self._clock():
            return Held.NONE
        if len(record.frames) >= max_frames:
            return Held.FULL
        record.frames.append(frame)
        return Held.OK

    def take(self, callee: str) -> list[HeldOffer]:
        """The offers not expired (an expired one stays until its caller drops it, and is
        told so)."""
        now = self._clock()
        records = self._held.get(callee, {})
        taken = sorted(((c, r) for c, r in records.items() if r.expires > now),
                       key=lambda item: item[1].at)
        for caller, _ in taken:
            del records[caller]
        if not records:
            self._held.pop(callee, None)
        return [HeldOffer(caller, tuple(r.frames), int((now - r.at) * 1000))
                for caller, r in taken]

    def drop(self, callee: str, caller: str, session_id: str) -> bool:
        records = self._held.get(callee, {})
        record = records.get(caller)
        if record is None or record.session != session_id:
            return False
        del records[caller]
        if not records:
            del self._held[callee]
        return True
