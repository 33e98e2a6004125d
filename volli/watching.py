"""Presence subscriptions of this process: which connections watch which user IDs, what
they were last told, and the debounce of offline announcements. No I/O: the hub feeds it
changes (from its backend) and the clock, and sends what it returns.

A user who goes offline is announced so only ``debounce`` seconds later, and only if it
has not come back meanwhile: a reconnect (a network change, a page reload) is never seen
by its watchers. Every watcher of a user in this process is told the same sequence, in
the order the backend reported the changes.
"""

from __future__ import annotations

import dataclasses
import heapq

from .backends.base import Session


@dataclasses.dataclass(slots=True)
class _Watched:
    sessions: dict[str, Session]  # session id -> watcher
    online: bool | None  # what its watchers were last told; None until its first lookup
    offline_at: float | None = None  # an offline not yet told: when it will be


class Watching:
    def __init__(self, debounce: float) -> None:
        self._debounce = debounce
        self._users: dict[str, _Watched] = {}
        self._by_session: dict[str, set[str]] = {}  # session id -> the userIds it watches
        self._due: list[tuple[float, str]] = []  # (offline_at, userId), a heap

    def count(self, session: Session) -> int:
        return len(self._by_session.get(session.id, ()))

    def count_new(self, session: Session, user_ids: list[str]) -> int:
        """How many of ``user_ids`` ``session`` does not watch yet."""
        mine = self._by_session.get(session.id, ())
        return sum(user_id not in mine for user_id in user_ids)

    def told(self, user_id: str) -> bool | None:
        """What watchers here were last told of ``user_id`` (None: not yet, or nobody here
        watches it)."""
        watched = self._users.get(user_id)
        return None if watched is None else watched.online

    def add(self, session: Session, user_ids: list[str]) -> tuple[list[str], list[str]]:
        """``session`` watches ``user_ids`` from now on: changes reported from now on
        count, before the backend's lookup answers (``settle``). Returns (those new to
        this session, those nobody here watched before)."""
        mine = self._by_session.setdefault(session.id, set())
        added, new_here = [], []
        for user_id in user_ids:
            watched = self._users.get(user_id)
            if watched is None:
                watched = self._users[user_id] = _Watched({}, None)
                new_here.append(user_id)
            if session.id not in watched.sessions:
                watched.sessions[session.id] = session
                mine.add(user_id)
                added.append(user_id)
        return added, new_here

    def settle(self, online: dict[str, bool]) -> None:
        """The backend's lookup of newly watched users; a change reported since the lookup
        began is newer, and stays."""
        for user_id, is_online in online.items():
            watched = self._users.get(user_id)
            if watched is not None and watched.online is None:
                watched.online = is_online

    def remove(self, session: Session, user_ids: list[str]) -> list[str]:
        """``session`` stops watching ``user_ids``; returns those nobody here watches now."""
        mine = self._by_session.get(session.id, set())
        gone = []
        for user_id in user_ids:
            mine.discard(user_id)
            watched = self._users.get(user_id)
            if watched is not None and watched.sessions.pop(session.id, None) is not None \
                    and not watched.sessions:
                del self._users[user_id]
                gone.append(user_id)
        if not mine:
            self._by_session.pop(session.id, None)
        return gone

    def drop(self, session: Session) -> list[str]:
        """A closed connection: all its watches go."""
        return self.remove(session, list(self._by_session.get(session.id, ())))

    def changed(self, user_id: str, online: bool, now: float) -> list[Session]:
        """The backend says ``user_id`` went online or offline; returns the watchers to
        tell now (an offline is told later, by ``due``, if it lasts)."""
        watched = self._users.get(user_id)
        if watched is None:
            return []
        if watched.online is None:  # its lookup is under way: nobody was told anything
            watched.online = online
            return []
        if online:
            watched.offline_at = None  # back within the debounce: nothing is told
            if watched.online:
                return []
            watched.online = True
            return list(watched.sessions.values())
        if watched.online and watched.offline_at is None:
            watched.offline_at = now + self._debounce
            heapq.heappush(self._due, (watched.offline_at, user_id))
        return []

    def due(self, now: float) -> list[tuple[str, list[Session]]]:
        """Offline announcements whose debounce has passed: (userId, watchers to tell)."""
        told = []
        while self._due and self._due[0][0] <= now:
            at, user_id = heapq.heappop(self._due)
            watched = self._users.get(user_id)
            if watched is None or watched.offline_at != at:
                continue  # back online, unwatched, or a later offline is pending
            watched.offline_at = None
            watched.online = False
            told.append((user_id, list(watched.sessions.values())))
        return told

    def pending(self) -> int:
        """Entries in the debounce heap (bounded by the changes of watched users)."""
        return len(self._due)
