"""Presence in this process only: the embedded default for a single worker."""

from __future__ import annotations

from .base import Backend, Presence, Session


class MemoryBackend(Backend):
    """Dicts in one process. Under gevent nothing here yields, so each method is atomic."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._users: dict[str, Session] = {}
        self._keys: dict[str, str] = {}  # userId -> last registered key, kept after close

    def attach(self, session: Session) -> None:
        self._sessions[session.id] = session

    def detach(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if session.user_id is not None and self._users.get(session.user_id) is session:
            del self._users[session.user_id]

    def claim(self, session: Session, user_id: str, public_key: str) -> bool:
        holder = self._users.get(user_id)
        if holder is not None and holder is not session:
            return False
        self._hold(session, user_id, public_key)
        self._keys[user_id] = public_key
        return True

    def _hold(self, session: Session, user_id: str, public_key: str) -> None:
        """Local bookkeeping of a claimed userId (shared with the Redis backend)."""
        self._users[user_id] = session
        session.user_id, session.public_key = user_id, public_key

    def lookup(self, user_id: str) -> Presence:
        session = self._users.get(user_id)
        if session is None:
            return Presence(user_id, False, self._keys.get(user_id))
        return Presence(user_id, True, session.public_key)

    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        session = self._users.get(user_id)
        return session is not None and session.send(text, origin)

    def local_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def online_count(self) -> int:
        return len(self._users)
