"""The connections of this process and the userIds they hold: the part of presence
every backend keeps in memory. Under gevent nothing here yields, so each method is atomic."""

from __future__ import annotations

from .base import BackendEvents, EncryptionKey, Presence, Session


class LocalSessions:
    def __init__(self, events: BackendEvents) -> None:
        self._events = events
        self._sessions: dict[str, Session] = {}  # session id -> session
        self._users: dict[str, Session] = {}  # userId -> its holder here

    def attach(self, session: Session) -> None:
        self._sessions[session.id] = session

    def forget(self, session: Session) -> bool:
        """A closed session; whether it held its userId here."""
        self._sessions.pop(session.id, None)
        if session.user_id is None or self._users.get(session.user_id) is not session:
            return False
        del self._users[session.user_id]
        return True

    def hold(self, session: Session, user_id: str, public_key: str, signed: bool,
             encryption_key: EncryptionKey | None) -> None:
        """A claimed userId: a live session that held it here is replaced, never left
        holding it too."""
        previous = self._users.get(user_id)
        self._users[user_id] = session
        session.user_id, session.public_key, session.signed = user_id, public_key, signed
        session.encryption_key = encryption_key if signed else None
        if previous is not None and previous is not session and not previous.closed:
            self._events.replace(previous)

    def holder(self, user_id: str) -> Session | None:
        return self._users.get(user_id)

    def presence(self, user_id: str) -> Presence | None:
        """user_id's presence if a session of this process holds it."""
        session = self._users.get(user_id)
        if session is None:
            return None
        return Presence(user_id, True, session.public_key, session.signed,
                        session.encryption_key)

    def holds(self, user_id: str) -> bool:
        return user_id in self._users

    def replace(self, session_id: str) -> None:
        """Close a session of this process as replaced (if it is still here)."""
        session = self._sessions.get(session_id)
        if session is not None:
            self._events.replace(session)

    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        session = self._users.get(user_id)
        return session is not None and session.send(text, origin)

    def owned(self) -> list[tuple[str, Session]]:
        """(userId, holder) pairs, a copy."""
        return list(self._users.items())

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def user_count(self) -> int:
        return len(self._users)
