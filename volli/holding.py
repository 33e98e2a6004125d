"""Offers held for an offline callee, as the callers of this process see them: which of
its connections hold offers for whom, until when and how many bytes, so each caller is
told ``expired`` once, a caller who leaves cancels its holds, and every caller stays
within its limits. No I/O: the held offers themselves live in the backend (memory or
Redis), which alone decides, atomically, whether one is delivered or expires.
"""

from __future__ import annotations

import dataclasses
import heapq

from .backends.base import Session


@dataclasses.dataclass(slots=True)
class _Hold:
    expires: float
    size: int  # bytes of the offer and its held candidates


class Holding:
    def __init__(self) -> None:
        self._holds: dict[str, dict[str, _Hold]] = {}  # session id -> callee -> hold
        self._sessions: dict[str, Session] = {}
        self._due: list[tuple[float, str, str]] = []  # (expires, session id, callee), a heap
        self._live = 0  # holds in self._holds: compaction checks it on each change, not a sum

    def count(self, session: Session, but: str | None = None) -> int:
        """Offers ``session`` holds, not counting one for ``but``."""
        holds = self._holds.get(session.id, {})
        return len(holds) - (but in holds)

    def size(self, session: Session, but: str | None = None) -> int:
        """Bytes ``session`` holds, not counting its offer for ``but``."""
        holds = self._holds.get(session.id, {})
        return sum(h.size for callee, h in holds.items() if callee != but)

    def holds(self, session: Session, callee: str) -> bool:
        return callee in self._holds.get(session.id, {})

    def add(self, session: Session, callee: str, expires: float, size: int) -> None:
        """A held offer (a new one for the same callee replaces the last)."""
        self._sessions[session.id] = session
        holds = self._holds.setdefault(session.id, {})
        self._live += callee not in holds
        holds[callee] = _Hold(expires, size)
        heapq.heappush(self._due, (expires, session.id, callee))
        self._compact()

    def grow(self, session: Session, callee: str, size: int) -> None:
        """A candidate held with the offer."""
        self._holds[session.id][callee].size += size

    def remove(self, session: Session, callee: str) -> None:
        holds = self._holds.get(session.id)
        if holds is not None:
            self._live -= holds.pop(callee, None) is not None
            if not holds:
                del self._holds[session.id]
                del self._sessions[session.id]

    def drop(self, session: Session) -> list[str]:
        """A closed caller: the callees it held offers for (to cancel)."""
        self._sessions.pop(session.id, None)
        callees = list(self._holds.pop(session.id, {}))
        if callees:  # most connections hold nothing: their close costs nothing here
            self._live -= len(callees)
            self._compact()
        return callees

    def _compact(self) -> None:
        """Entries of replaced offers and closed callers are skipped when due; past twice
        the live holds they are dropped now, so replacing an offer in a loop costs nothing
        kept."""
        if len(self._due) > 2 * self._live + 16:
            self._due = [(h.expires, sid, callee) for sid, holds in self._holds.items()
                         for callee, h in holds.items()]
            heapq.heapify(self._due)

    def due(self, now: float) -> list[tuple[Session, str]]:
        """Holds whose time is up: (caller, callee), each once; the caller keeps none."""
        ended = []
        while self._due and self._due[0][0] <= now:
            expires, session_id, callee = heapq.heappop(self._due)
            hold = self._holds.get(session_id, {}).get(callee)
            if hold is None or hold.expires != expires:
                continue  # delivered, cancelled, or replaced by a later offer
            session = self._sessions[session_id]
            self.remove(session, callee)
            ended.append((session, callee))
        return ended

    def pending(self) -> int:
        return len(self._due)
