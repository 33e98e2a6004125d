"""Presence in this process only: the embedded default for a single worker."""

from __future__ import annotations

from .base import Backend, Claim, Presence, Session


class MemoryBackend(Backend):
    """Dicts in one process. Under gevent nothing here yields, so each method is atomic."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._users: dict[str, Session] = {}
        # userId -> (last registered key, bound by a signature), kept after close
        self._bindings: dict[str, tuple[str, bool]] = {}

    def attach(self, session: Session) -> None:
        self._sessions[session.id] = session

    def detach(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if session.user_id is not None and self._users.get(session.user_id) is session:
            del self._users[session.user_id]

    def claim(self, session: Session, user_id: str, public_key: str, signed: bool) -> Claim:
        key, bound = self._bindings.get(user_id, (None, False))
        if bound and not signed:
            return Claim.BOUND
        if bound and key != public_key:
            return Claim.KEY_MISMATCH
        holder = self._users.get(user_id)
        outcome = Claim.OK
        if holder is not None and holder is not session:
            if not (signed and holder.public_key == public_key):
                return Claim.TAKEN
            outcome = Claim.TAKEN_OVER
        self._hold(session, user_id, public_key, signed)
        if signed or not bound:
            self._bindings[user_id] = (public_key, signed)
        if outcome is Claim.TAKEN_OVER:
            self.on_replaced(holder)
        return outcome

    def _hold(self, session: Session, user_id: str, public_key: str, signed: bool) -> None:
        """Local bookkeeping of a claimed userId (shared with the Redis backend)."""
        self._users[user_id] = session
        session.user_id, session.public_key, session.signed = user_id, public_key, signed

    def rebind(self, session: Session, new_public_key: str) -> bool:
        if self._bindings.get(session.user_id) != (session.public_key, True):
            return False
        self._bindings[session.user_id] = (new_public_key, True)
        session.public_key = new_public_key
        return True

    def lookup(self, user_id: str) -> Presence:
        session = self._users.get(user_id)
        if session is None:
            return Presence(user_id, False, self._bindings.get(user_id, (None, False))[0])
        return Presence(user_id, True, session.public_key)

    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        session = self._users.get(user_id)
        return session is not None and session.send(text, origin)

    def local_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def online_count(self) -> int:
        return len(self._users)
