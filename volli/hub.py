"""The hub applies the signaling rules: who may register, discover and relay, what each
request is answered with, and the per-connection limits. It sees connections only as
``Session`` objects and presence only through a ``Backend``, so it does no I/O of its own.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from . import turn
from .backends import (
    Backend, BackendEvents, BackendUnavailable, Claim, EncryptionKey, Presence, Session,
)
from .backends.base import Released, nothing
from .config import Settings
from .limits import ConnectionLimits
from .metrics import Metrics
from .protocol import (
    CloseCode, Discover, ErrorCode, IceServers, Message, Ping, ProtocolError, Register, Relay,
    RotateKey, Unwatch, Watch, discover_response_message, encode, encode_relay, error_message,
    hello_message, ice_servers_message, identity, key_rotated_message, parse, pong_message,
    presence_message, rate_limited_message, registered_message, session_replaced_message,
    undelivered_message, unwatched_message, watch_limit_message, watching_message,
    delivered_message, expired_message, held_message, hold_limit_message, with_held_for,
    PushSubscribe, PushUnsubscribe, push_subscribed_message, push_unsubscribed_message,
)
from .push import PushSender, origin_allowed
from .backends.base import Held
from .holding import Holding
from .watching import Watching

log = logging.getLogger("volli.hub")

_CLAIM_ERRORS = {
    Claim.TAKEN: (ErrorCode.USER_ID_TAKEN, "{!r} is registered by another connection"),
    Claim.BOUND: (ErrorCode.IDENTITY_BOUND,
                  "{!r} is bound to a key: register with a signature by that key"),
    Claim.KEY_MISMATCH: (ErrorCode.BAD_SIGNATURE, "{!r} is bound to a different key"),
    Claim.FULL: (ErrorCode.BINDINGS_FULL,
                 "the server keeps no more key bindings: {!r} cannot be bound now"),
}


class Hub:
    """The hub owns its backend: ``make_backend`` builds it with the hub as its events
    (what it reports: undelivered relays, replaced sessions, store failures)."""

    def __init__(self, settings: Settings, make_backend: Callable[[BackendEvents], Backend],
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._limits: dict[str, ConnectionLimits] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        self.watching = Watching(settings.presence_debounce)
        self.holding = Holding()
        # Web Push wake-ups: the sender does its own I/O in greenlets, started per worker.
        self.push = PushSender(settings, self._push_gone, self.metrics.push)
        self.backend = make_backend(self)
        # Each handler gets the session, the message and when its frame was received.
        self._handlers: dict[type, Callable[[Session, Message, float], None]] = {
            Register: self._register,
            Discover: self._discover,
            Relay: self._relay,
            Ping: self._ping,
            RotateKey: self._rotate_key,
            IceServers: self._ice_servers,
            Watch: self._watch,
            Unwatch: self._unwatch,
            PushSubscribe: self._push_subscribe,
            PushUnsubscribe: self._push_unsubscribe,
        }
        self._turn_uris = [u.strip() for u in settings.turn_uris.split(",") if u.strip()]
        # Only turn:/turns: URIs carry credentials (the policy and the issue rate apply).
        self._issues_credentials = any(not u.startswith("stun") for u in self._turn_uris)

    def connect(self, session: Session) -> None:
        session.nonce = identity.new_nonce()
        self._limits[session.id] = ConnectionLimits(self.settings, self._clock())
        self.backend.attach(session)
        session.send(encode(hello_message(session.nonce, self.settings.max_message_size)))

    def disconnect(self, session: Session, then: Released = nothing) -> None:
        """The session is closing: release its userId at once, then call ``then`` (the
        transport sends its close frame: a client that sees it finds its ID free)."""
        if self._limits.pop(session.id, None) is not None and session.user_id is not None:
            self.metrics.unregistered()
        self._unwatched(self.watching.drop(session))
        callees = self.holding.drop(session)
        if callees:  # a caller who leaves cancels its held offers
            self.backend.cancel_held(session.user_id, session.id, callees)
        self.backend.detach(session, then)

    def report_undelivered(self, peer: str, undelivered: Mapping[str, int],
                           busy: bool = False) -> None:
        """Tell each sender how many of its relays to ``peer`` were accepted but will never
        be written (so nothing accepted is dropped without a word)."""
        for origin, count in undelivered.items():
            self.metrics.undelivered(count)
            try:
                self.backend.deliver(origin, encode(undelivered_message(peer, count, busy)))
            except BackendUnavailable:
                log.warning("could not tell %r that %d relays to %r were dropped",
                            origin, count, peer)

    def backend_failed(self, operation: str) -> None:
        self.metrics.redis_failure(operation)

    def presence_changed(self, user_id: str, online: bool) -> None:
        self._announce(user_id, online, self.watching.changed(user_id, online, self._clock()))

    def announce_due(self) -> None:
        """Tell watchers of the offline users whose debounce has passed, and callers of
        the held offers whose time is up (called often)."""
        now = self._clock()
        for user_id, sessions in self.watching.due(now):
            self._announce(user_id, False, sessions)
        for session, callee in self.holding.due(now):
            try:
                expired = self.backend.drop_held(callee, session.user_id, session.id)
            except BackendUnavailable:  # it expires in the store by itself; say so anyway
                expired = True
            if expired:  # else it was delivered (the caller was told) or replaced
                self.metrics.held("expired")
                session.send(encode(expired_message(callee)))

    def _announce(self, user_id: str, online: bool, sessions: list[Session]) -> None:
        if sessions:
            text = encode(presence_message(user_id, online))
            for session in sessions:
                session.send(text)
            self.metrics.presence_sent(online, len(sessions))

    def _unwatched(self, user_ids: list[str]) -> None:
        if user_ids:
            self.metrics.watched_users(-len(user_ids))
            self.backend.unwatch(user_ids)

    def replace(self, session: Session) -> None:
        """A signed registration elsewhere took this session's userId."""
        log.info("session replaced user=%s id=%s", session.user_id, session.id)
        session.send(encode(session_replaced_message()))
        session.close(CloseCode.SESSION_REPLACED, "session replaced")

    def receive_text(self, session: Session, text: str) -> None:
        """Handle one text frame. Never raises: a failure becomes an ``error`` reply."""
        received_at = self._clock()
        if not self._within_rate(session, received_at):
            self.metrics.received("refused")
            return
        message = None
        try:
            message = parse(text)
            self.metrics.received(_type_name(message))
            self._handlers[type(message)](session, message, received_at)
        except ProtocolError as exc:
            if message is None:
                self.metrics.received("invalid")
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
        self.metrics.received("binary")
        if self._within_rate(session, self._clock()):
            self._reply_error(session, ErrorCode.BINARY_FRAME,
                              "binary frames are not supported; send JSON text frames")

    def receive_frames(self, session: Session, count: int) -> None:
        """``count`` more WebSocket frames of any kind arrived (a flood of pings or of
        empty continuation frames costs CPU without ever making a message)."""
        limits = self._limits.get(session.id)
        if limits is not None and limits.frames.take(self._clock(), count):
            log.warning("closing session %s (user=%s): sent frames faster than "
                        "VOLLI_RATE_FRAMES", session.id, session.user_id)
            self.metrics.refused("frame-rate")
            session.close(CloseCode.RATE_LIMIT_ABUSE, "too many frames")

    def shutdown(self) -> int:
        """Close every local connection with 1001; returns how many."""
        sessions = self.backend.local_sessions()
        for session in sessions:
            session.close(CloseCode.GOING_AWAY, "server shutting down")
        return len(sessions)

    # -- limits -----------------------------------------------------------------------

    def _within_rate(self, session: Session, now: float) -> bool:
        limits = self._limits.get(session.id)
        return self._check(session, "message-rate",
                           limits.messages.take(now) if limits else 0.0, None)

    def _limited(self, session: Session, limit: str, wait: float, request_id) -> None:
        self.metrics.error(ErrorCode.RATE_LIMITED)
        self.metrics.refused(limit)
        limits = self._limits.get(session.id)
        if limits and limits.violations.add(self._clock()) > self.settings.rate_abuse_close:
            log.warning("closing session %s (user=%s): kept sending while rate-limited",
                        session.id, session.user_id)
            self.metrics.refused("abuse-close")
            session.close(CloseCode.RATE_LIMIT_ABUSE, "rate limit abuse")
            return
        session.send(encode(rate_limited_message(limit, wait, request_id)))

    def _check(self, session: Session, limit: str, wait: float, request_id) -> bool:
        if wait:
            self._limited(session, limit, wait, request_id)
        return not wait

    # -- messages ---------------------------------------------------------------------

    def _reply_error(self, session: Session, code: ErrorCode, text: str,
                     request_id: str | int | None = None) -> None:
        self.metrics.error(code)
        session.send(encode(error_message(code, text, request_id)))

    def _register(self, session: Session, message: Register, received_at: float) -> None:
        if session.user_id is not None:
            raise ProtocolError(ErrorCode.ALREADY_REGISTERED,
                                f"this connection is already registered as {session.user_id!r}")
        signed = message.signature is not None
        public_key = message.public_key
        if signed:
            identity.verify(public_key, message.signature,
                            identity.register_payload(session.nonce, message.user_id))
            public_key = identity.canonical_key(public_key)
        elif self.settings.require_signature:
            raise ProtocolError(ErrorCode.SIGNATURE_REQUIRED,
                                "this server accepts only signed registrations")
        outcome = self.backend.claim(session, message.user_id, public_key, signed,
                                     _encryption_key(message, public_key, message.user_id))
        if outcome is Claim.CLOSED:  # nobody to answer
            return
        if outcome in _CLAIM_ERRORS:
            code, text = _CLAIM_ERRORS[outcome]
            raise ProtocolError(code, text.format(message.user_id))
        next_nonce = None
        if signed:
            session.nonce = next_nonce = identity.new_nonce()  # one registration per nonce
        self.metrics.registered(signed)
        log.info("registered user=%s id=%s ip=%s signed=%s%s", message.user_id, session.id,
                 session.remote_addr, signed,
                 " (took over)" if outcome is Claim.TAKEN_OVER else "")
        session.send(encode(registered_message(message.user_id, message.request_id, next_nonce)))
        servers = self._ice_server_list(session, received_at)
        if servers:
            session.send(encode(ice_servers_message(servers)))
        self._deliver_held(session, message.user_id)

    def _deliver_held(self, session: Session, user_id: str) -> None:
        """Offers held for a user who just registered: to it, in the order they were
        held, each followed by its candidates; each caller is told ``delivered``."""
        try:
            held = self.backend.take_held(user_id)
        except BackendUnavailable:
            log.warning("could not read the offers held for user=%s; they expire", user_id)
            return
        for offer in held:
            queued = 0
            for frame in offer.frames:
                try:
                    if not session.send(with_held_for(frame, offer.held_for_ms), offer.caller):
                        break
                except ProtocolError:  # peer-busy: its queue cannot take more now
                    break
                queued += 1
            notices = []
            if queued:  # at least the offer: the callee can answer, and ask for more
                self.metrics.held("delivered")
                notices.append(encode(delivered_message(user_id)))
            if queued < len(offer.frames):
                self.metrics.undelivered(len(offer.frames) - queued)
                notices.append(encode(undelivered_message(
                    user_id, len(offer.frames) - queued, busy=True)))
            for notice in notices:
                try:
                    self.backend.deliver(offer.caller, notice)
                except BackendUnavailable:
                    log.warning("could not tell %r what became of its offer to %r",
                                offer.caller, user_id)

    def _rotate_key(self, session: Session, message: RotateKey, received_at: float) -> None:
        user_id = _require_registered(session)
        if not session.signed:
            raise ProtocolError(ErrorCode.SIGNATURE_REQUIRED,
                                "rotate-key needs a connection registered with a signature")
        identity.verify(session.public_key, message.signature,
                        identity.rotate_payload(session.nonce, user_id, message.new_public_key))
        new_key = identity.canonical_key(message.new_public_key, "newPublicKey")
        if not self.backend.rebind(session, new_key,
                                   _encryption_key(message, new_key, user_id)):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE,
                                f"the key bound to {user_id!r} changed meanwhile")
        session.nonce = identity.new_nonce()
        log.info("key rotated user=%s id=%s", user_id, session.id)
        session.send(encode(key_rotated_message(user_id, new_key, session.nonce,
                                                message.request_id)))

    def _discover(self, session: Session, message: Discover, received_at: float) -> None:
        _require_registered(session)
        if not self._check(session, "discover-rate",
                           self._limits[session.id].discovers.take(received_at),
                           message.request_id):
            return
        presence = self.backend.lookup(message.user_id)
        session.send(encode(discover_response_message(
            message.user_id, presence.online, presence.public_key, presence.verified,
            message.request_id, _published(presence))))

    def _relay(self, session: Session, message: Relay, received_at: float) -> None:
        sender = _require_registered(session)
        if message.sender is not None and message.sender != sender:
            raise ProtocolError(ErrorCode.FORBIDDEN_SENDER,
                                f"'from' must be your own userId {sender!r}")
        if self.settings.require_sealed and not message.sealed:
            raise ProtocolError(ErrorCode.SEALED_REQUIRED, f"this server relays only sealed "
                                f"messages: put the {message.kind}'s payload in 'sealed'")
        if not self._check(session, "fan-out",
                           self._limits[session.id].targets.allow(message.to, received_at),
                           message.request_id):
            return
        text = encode_relay(message, sender)
        if not self.backend.deliver(message.to, text, sender):
            if not self._hold(session, message, sender, received_at):
                raise ProtocolError(ErrorCode.PEER_OFFLINE, f"{message.to!r} is not online")
            return
        self.metrics.relayed(message.kind, self._clock() - received_at)

    def _hold(self, session: Session, message: Relay, sender: str, received_at: float) -> bool:
        """An offer with ``hold``, or a candidate that follows one, to an offline callee:
        held (True), refused with an error (True), or not for holding (False)."""
        settings, to = self.settings, message.to
        if message.kind == "offer" and message.hold and settings.hold_max:
            text = encode_relay(message, sender)
            size = len(text)
            if self.holding.count(session, but=to) >= settings.hold_per_caller:
                return self._hold_refused(session, "held-offers", settings.hold_per_caller,
                                          message)
            if self.holding.size(session, but=to) + size > settings.hold_bytes:
                return self._hold_refused(session, "held-bytes", settings.hold_bytes, message)
            seconds = min(message.hold, settings.hold_max)
            outcome = self.backend.hold(session, to, text, seconds, settings.hold_per_callee)
            if outcome is Held.ONLINE:  # it registered meanwhile: relay after all
                return self.backend.deliver(to, text, sender)
            if outcome is Held.FULL:
                return self._hold_refused(session, "held-for-peer", settings.hold_per_callee,
                                          message)
            self.holding.add(session, to, received_at + seconds, size)
            self.metrics.held("held")
            session.send(encode(held_message(to, seconds, message.request_id)))
            if outcome is Held.OK:  # a replacement (renegotiation) wakes nobody again
                self._wake(to, sender, seconds)
            return True
        if message.kind == "ice-candidate" and self.holding.holds(session, to):
            text = encode_relay(message, sender)
            if self.holding.size(session) + len(text) > settings.hold_bytes:
                return self._hold_refused(session, "held-bytes", settings.hold_bytes, message)
            outcome = self.backend.hold_candidate(session, to, text,
                                                  settings.hold_candidates + 1)
            if outcome is Held.FULL:
                return self._hold_refused(session, "held-candidates",
                                          settings.hold_candidates, message)
            if outcome is Held.OK:
                self.holding.grow(session, to, len(text))
                return True
        return False

    def _wake(self, callee: str, caller: str, seconds: int) -> None:
        """Push to the callee's subscriptions that an offer waits for it."""
        if not self.push.enabled:
            return
        try:
            subscriptions = self.backend.push_subscriptions(callee)
        except BackendUnavailable:
            log.warning("could not read the push subscriptions of %r", callee)
            return
        if subscriptions:
            self.push.incoming_call(callee, caller, seconds, subscriptions)

    def _push_gone(self, user_id: str, endpoint: str) -> None:
        try:
            self.backend.push_unsubscribe(user_id, endpoint)
        except BackendUnavailable:
            log.warning("could not remove a gone push subscription of %r", user_id)

    def _push_subscribe(self, session: Session, message: PushSubscribe,
                        received_at: float) -> None:
        user_id = _require_bound(session)
        if not self.push.enabled:
            raise ProtocolError(ErrorCode.PUSH_DISABLED,
                                "this server sends no pushes (no VAPID key configured)")
        endpoint = message.subscription["endpoint"]
        if not origin_allowed(endpoint, self.settings.push_services):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                                "'endpoint' is not at a push service this server sends to")
        self.backend.push_subscribe(user_id, message.subscription,
                                    self.settings.push_max_per_user)
        session.send(encode(push_subscribed_message(message.request_id)))

    def _push_unsubscribe(self, session: Session, message: PushUnsubscribe,
                          received_at: float) -> None:
        user_id = _require_bound(session)
        self.backend.push_unsubscribe(user_id, message.endpoint)
        session.send(encode(push_unsubscribed_message(message.request_id)))

    def _hold_refused(self, session: Session, limit: str, maximum: int, message: Relay) -> bool:
        self._cap_refused(session, limit, hold_limit_message(limit, maximum, message.to,
                                                             message.request_id))
        return True

    def _cap_refused(self, session: Session, limit: str, reply: dict) -> None:
        """A request past a cap (not a rate): counted, and answered ``reply``."""
        self.metrics.error(ErrorCode.RATE_LIMITED)
        self.metrics.refused(limit)
        session.send(encode(reply))

    def _watch(self, session: Session, message: Watch, received_at: float) -> None:
        _require_registered(session)
        if not self._check(session, "watch-rate",
                           self._limits[session.id].watches.take(received_at),
                           message.request_id):
            return
        if (self.watching.count(session) + self.watching.count_new(session, message.user_ids)
                > self.settings.watch_max):
            self._cap_refused(session, "watched-ids", watch_limit_message(
                self.settings.watch_max, message.request_id))
            return
        # Watched before the backend is asked: a change it reports while its lookup is
        # under way is not missed.
        added, new_here = self.watching.add(session, message.user_ids)
        self.metrics.watched_users(len(new_here))
        try:
            presences = self.backend.watch(message.user_ids)
        except BackendUnavailable:
            self._unwatched(self.watching.remove(session, added))
            raise
        self.watching.settle({p.user_id: p.online for p in presences})
        if session.closed:  # its watches were dropped with it
            return
        # A user watched here already: what its watchers were told (an offline still
        # within its debounce is not told yet).
        session.send(encode(watching_message(
            [(p.user_id, bool(self.watching.told(p.user_id)), p.verified, _published(p))
             for p in presences],
            message.request_id)))

    def _unwatch(self, session: Session, message: Unwatch, received_at: float) -> None:
        _require_registered(session)
        self._unwatched(self.watching.remove(session, message.user_ids))
        session.send(encode(unwatched_message(message.user_ids, message.request_id)))

    def _ice_servers(self, session: Session, message: IceServers, received_at: float) -> None:
        _require_registered(session)
        if self._issues_credentials and not self._may_use_turn(session):
            raise ProtocolError(ErrorCode.SIGNATURE_REQUIRED,
                                "TURN credentials are issued to signed sessions only")
        wait = (self._limits[session.id].turn.take(received_at) if self._issues_credentials
                else 0.0)
        if self._check(session, "ice-servers-rate", wait, message.request_id):
            session.send(encode(ice_servers_message(
                self._ice_server_list(session, None), message.request_id)))

    def _may_use_turn(self, session: Session) -> bool:
        return session.signed or self.settings.turn_for == "all"

    def _ice_server_list(self, session: Session, charge_at: float | None) -> list[dict]:
        """The STUN and TURN servers for ``session``: TURN only if it may use it and
        (when ``charge_at`` is given) its issue rate allows another credential now."""
        turn_ok = self._issues_credentials and self._may_use_turn(session) and (
            charge_at is None or not self._limits[session.id].turn.take(charge_at))
        uris = [u for u in self._turn_uris if turn_ok or u.startswith("stun")]
        return turn.ice_servers(self.settings.turn_secret, uris, session.user_id,
                                self.settings.turn_ttl, time.time())

    def _ping(self, session: Session, message: Ping, received_at: float) -> None:
        session.send(encode(pong_message(message.request_id)))


def _encryption_key(message: Register | RotateKey, public_key: str,
                    user_id: str) -> EncryptionKey | None:
    """The encryption key ``message`` publishes, its signature by ``public_key`` checked."""
    published = message.encryption_key
    if published is not None:
        identity.verify(public_key, published.signature,
                        identity.encryption_key_payload(user_id, published.key),
                        "encryptionKeySignature does not verify for this key and userId")
    return published


def _published(presence: Presence) -> EncryptionKey | None:
    return presence.encryption_key if presence.verified else None


def _require_bound(session: Session) -> str:
    """Push subscriptions belong to a bound ID: a signed session's."""
    user_id = _require_registered(session)
    if not session.signed:
        raise ProtocolError(ErrorCode.SIGNATURE_REQUIRED, "push subscriptions belong to a "
                            "bound user ID: register with a signature")
    return user_id


def _require_registered(session: Session) -> str:
    if session.user_id is None:
        raise ProtocolError(ErrorCode.NOT_REGISTERED, "register before this request")
    return session.user_id


def _type_name(message: Message) -> str:
    if isinstance(message, Relay):
        return message.kind
    return {RotateKey: "rotate-key", IceServers: "ice-servers"}.get(
        type(message), type(message).__name__.lower())
