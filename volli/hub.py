"""The hub applies the signaling rules: who may register, discover and relay, and what
each request is answered with. It sees connections only as ``Session`` objects and
presence only through a ``Backend``, so it does no I/O of its own.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, Mapping

from .backends import Backend, BackendUnavailable, Session
from .protocol import (
    CloseCode, Discover, ErrorCode, Message, Ping, ProtocolError, Register, Relay,
    discover_response_message, encode, error_message, parse, pong_message, registered_message,
    relayed_message, undelivered_message,
)

log = logging.getLogger("volli.hub")


class Hub:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        backend.on_undelivered = self.report_undelivered
        # Keys: "received", "received.<type>", "relayed.<type>", "errors", "errors.<code>".
        self.counters: collections.Counter[str] = collections.Counter()
        self._handlers: dict[type, Callable[[Session, Message], None]] = {
            Register: self._register,
            Discover: self._discover,
            Relay: self._relay,
            Ping: self._ping,
        }

    def connect(self, session: Session) -> None:
        self.backend.attach(session)

    def disconnect(self, session: Session, undelivered: Mapping[str, int] | None = None) -> None:
        """The session is closing: release it, and tell each sender whose relays to it were
        still queued (so nothing accepted is dropped without a word)."""
        try:
            self.backend.detach(session)
        except BackendUnavailable:
            log.warning("could not release %r in the shared store; it expires by TTL",
                        session.user_id)
        if session.user_id is not None and undelivered:
            self.report_undelivered(session.user_id, undelivered)

    def report_undelivered(self, peer: str, undelivered: Mapping[str, int]) -> None:
        for origin, count in undelivered.items():
            self.counters["undelivered"] += count
            try:
                self.backend.deliver(origin, encode(undelivered_message(peer, count)))
            except BackendUnavailable:
                log.warning("could not tell %r that %d relays to %r were dropped",
                            origin, count, peer)

    def receive_text(self, session: Session, text: str) -> None:
        """Handle one text frame. Never raises: a failure becomes an ``error`` reply."""
        self.counters["received"] += 1
        message = None
        try:
            message = parse(text)
            self.counters["received." + _type_name(message)] += 1
            self._handlers[type(message)](session, message)
        except ProtocolError as exc:
            request_id = exc.request_id if message is None else message.request_id
            self._reply_error(session, exc.code, exc.message, request_id)
        except BackendUnavailable:
            self._reply_error(session, ErrorCode.UNAVAILABLE,
                              "presence store unreachable; retry shortly", message.request_id)
        except Exception:
            log.exception("internal error handling a message from session %s", session.id)
            self._reply_error(session, ErrorCode.INTERNAL_ERROR, "internal server error",
                              getattr(message, "request_id", None))

    def receive_binary(self, session: Session) -> None:
        self.counters["received"] += 1
        self._reply_error(session, ErrorCode.BINARY_FRAME,
                          "binary frames are not supported; send JSON text frames")

    def shutdown(self) -> int:
        """Close every local connection with 1001; returns how many."""
        sessions = self.backend.local_sessions()
        for session in sessions:
            session.close(CloseCode.GOING_AWAY, "server shutting down")
        return len(sessions)

    def _reply_error(self, session: Session, code: ErrorCode, text: str,
                     request_id: str | int | None = None) -> None:
        self.counters["errors"] += 1
        self.counters["errors." + code] += 1
        session.send(encode(error_message(code, text, request_id)))

    def _register(self, session: Session, message: Register) -> None:
        if session.user_id is not None:
            raise ProtocolError(ErrorCode.ALREADY_REGISTERED,
                                f"this connection is already registered as {session.user_id!r}")
        if not self.backend.claim(session, message.user_id, message.public_key):
            raise ProtocolError(ErrorCode.USER_ID_TAKEN,
                                f"{message.user_id!r} is registered by another connection")
        log.info("registered user=%s id=%s", message.user_id, session.id)
        session.send(encode(registered_message(message.user_id, message.request_id)))

    def _discover(self, session: Session, message: Discover) -> None:
        _require_registered(session)
        presence = self.backend.lookup(message.user_id)
        session.send(encode(discover_response_message(
            message.user_id, presence.online, presence.public_key, message.request_id)))

    def _relay(self, session: Session, message: Relay) -> None:
        sender = _require_registered(session)
        if message.sender is not None and message.sender != sender:
            raise ProtocolError(ErrorCode.FORBIDDEN_SENDER,
                                f"'from' must be your own userId {sender!r}")
        if not self.backend.deliver(message.to, encode(relayed_message(message, sender)), sender):
            raise ProtocolError(ErrorCode.PEER_OFFLINE, f"{message.to!r} is not online")
        self.counters["relayed." + message.kind] += 1

    def _ping(self, session: Session, message: Ping) -> None:
        session.send(encode(pong_message(message.request_id)))


def _require_registered(session: Session) -> str:
    if session.user_id is None:
        raise ProtocolError(ErrorCode.NOT_REGISTERED, "register before this request")
    return session.user_id


def _type_name(message: Message) -> str:
    return message.kind if isinstance(message, Relay) else type(message).__name__.lower()
