"""The seam between the hub and where presence lives.

A backend answers "who is online, with which key" and delivers frames to a user's
connection, wherever that connection lives. The in-memory backend serves one process;
a shared backend (Redis) implements the same methods across workers and hosts.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Any, Callable, Mapping, Protocol

# A signed user's published key (checked by the hub; clients check it again).
from ..protocol.messages import EncryptionKey

# Starts a background task; the server decides what that is (a greenlet under gunicorn).
Spawn = Callable[..., Any]
# Called once a closing session's userId is released (or its release gave up): the
# transport sends its close frame then, so a client that sees it finds its ID free.
Released = Callable[[], None]


def nothing() -> None:
    """The default ``then``: nothing to do once released."""


class Claim(enum.Enum):
    """Outcome of a claim. The rule (the same in every backend):
    1. a bound userId needs a signature (else BOUND) by its bound key (else KEY_MISMATCH);
    2. a userId held by another live session is TAKEN, unless the claim is signed by the
       holder's own key: then the holder is replaced (TAKEN_OVER);
    3. a signed claim binds userId to its key (kept for the retention after last use;
       a new binding beyond the cap is FULL, since evicting one would free an ID for
       anyone); an unsigned one leaves nothing once its connection closes."""

    OK = "ok"
    TAKEN_OVER = "taken-over"
    TAKEN = "taken"
    BOUND = "bound"
    KEY_MISMATCH = "key-mismatch"
    FULL = "full"  # a new binding would pass VOLLI_MAX_BINDINGS: refused, nothing evicted
    # The session closed while its claim was in flight: what the claim got is released.
    CLOSED = "closed"


def local_refusal(holder: "Session | None", session: "Session", public_key: str,
                  signed: bool) -> Claim | None:
    """The claim rule applied to a live session of this process that holds the userId:
    its answer needs no shared store (which may have forgotten that holder), or None when
    the rule lets the claim go on (no live local holder, or a same-key signed takeover)."""
    if holder is None or holder is session or holder.closed:
        return None
    if holder.signed and not signed:
        return Claim.BOUND
    if holder.signed and holder.public_key != public_key:
        return Claim.KEY_MISMATCH
    if not (signed and holder.public_key == public_key):
        return Claim.TAKEN
    return None


class Held(enum.Enum):
    """Outcome of holding an offer (or a candidate with it) for an offline callee."""

    OK = "ok"
    REPLACED = "replaced"  # held, in place of this caller's offer still held
    ONLINE = "online"  # the callee registered meanwhile: relay it instead
    FULL = "full"  # the callee has as many held offers as allowed, or the offer its candidates
    NONE = "none"  # no offer of this session is held for the callee (delivered, expired)


@dataclasses.dataclass(frozen=True, slots=True)
class HeldOffer:
    caller: str
    frames: tuple[str, ...]  # the offer, then its candidates, as relayed (with "from")
    held_for_ms: int


class BackendUnavailable(Exception):
    """The shared store cannot be reached; the request may succeed if retried."""


class Session(Protocol):
    """One client connection as the hub and backends see it (implemented by the transport)."""

    id: str
    user_id: str | None
    public_key: str | None
    signed: bool  # registered with a verified signature
    encryption_key: EncryptionKey | None  # published with its signed registration
    remote_addr: str  # the client's IP, for logs
    nonce: str  # the current one-time nonce for signed requests

    @property
    def closed(self) -> bool:
        """Closing or closed: it may hold nothing any more."""

    def send(self, text: str, origin: str | None = None) -> bool:
        """Queue a text frame; False if the connection is closed or could not take it.

        ``origin`` is the userId a relayed frame comes from: if the frame is still queued
        when the connection closes, that sender is told. A relay that the receiver's queue
        cannot take now raises ProtocolError(peer-busy) and leaves the receiver open."""

    def close(self, code: int, reason: str = "") -> None:
        """Start closing; returns at once."""


class BackendEvents(Protocol):
    """What a backend reports to its owner (the hub), given to its constructor."""

    def report_undelivered(self, peer: str, undelivered: Mapping[str, int],
                           busy: bool = False) -> None:
        """Relays accepted for ``peer`` ({sender userId: count}) that can no longer reach
        it (busy: refused on arrival at its node, its queue was full of unread frames)."""

    def replace(self, session: Session) -> None:
        """A local session whose userId another session took (or an operator unbound)."""

    def backend_failed(self, operation: str) -> None:
        """A shared-store operation failed."""

    def presence_changed(self, user_id: str, online: bool) -> None:
        """A user this process watches (``Backend.watch``) came online or went offline,
        reported in the order the changes happened (a repeat is possible: the hub
        compares with what it told)."""


class NoEvents:
    """Events nobody listens to (a backend used on its own)."""

    def report_undelivered(self, peer, undelivered, busy=False) -> None:
        pass

    def replace(self, session) -> None:
        pass

    def backend_failed(self, operation) -> None:
        pass

    def presence_changed(self, user_id, online) -> None:
        pass


NO_EVENTS = NoEvents()


@dataclasses.dataclass(frozen=True, slots=True)
class Presence:
    user_id: str
    online: bool
    public_key: str | None
    verified: bool = False  # public_key is bound to user_id by a signed registration
    # The binding's published encryption key (only with verified).
    encryption_key: EncryptionKey | None = None


class Backend(abc.ABC):
    """Presence and routing.

    Guarantees: ``claim`` is atomic per userId; every change of a shared record (claim,
    refresh, release, takeover) acts only if the record still names the session that
    makes it (compare-and-set on the session id), so a late close of an old connection
    never removes a newer registration, and a holder the store no longer names is closed.
    A process never holds two live sessions for one userId. ``deliver`` returning True means the
    frame was accepted into the target connection's send queue; it is not an end-to-end
    acknowledgement; relays that are accepted and then cannot reach their target are
    reported through ``events.report_undelivered`` so the hub can tell their senders.

    Methods that need a shared store raise BackendUnavailable while it is unreachable.
    """

    def __init__(self, events: BackendEvents = NO_EVENTS) -> None:
        self._events = events

    def start(self, spawn: Spawn) -> None:
        """Start background tasks (per worker, after gevent has patched)."""

    def stop(self) -> None:
        """Stop background tasks."""

    def readiness(self) -> tuple[bool, str]:
        """Whether this backend can serve every request now, and why not."""
        return True, "ok"

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Backend").lower()

    @abc.abstractmethod
    def attach(self, session: Session) -> None:
        """A connection opened in this process."""

    def loops(self) -> dict[str, Callable[[], None]]:
        """Background loops to run (supervised) per worker, by name."""
        return {}

    @abc.abstractmethod
    def detach(self, session: Session, then: Released = nothing) -> None:
        """A connection closed: forget it and release its userId (if still its own); call
        ``then`` once that release is done or given up (at once if there is none). Never
        blocks: closes that come together share their round trips."""

    @abc.abstractmethod
    def claim(self, session: Session, user_id: str, public_key: str, signed: bool,
              encryption_key: EncryptionKey | None = None) -> Claim:
        """Give user_id to session under the rule of ``Claim``; on OK or TAKEN_OVER the
        session's user_id, public_key, signed and encryption_key are set, and a live local
        session that held user_id is replaced. A signed claim stores ``encryption_key``
        with the binding (None removes one). A session that closed meanwhile gets CLOSED
        and holds nothing."""

    @abc.abstractmethod
    def rebind(self, session: Session, new_public_key: str,
               encryption_key: EncryptionKey | None = None) -> bool:
        """Bind session's (bound) userId to a new key, with ``encryption_key`` (signed by
        the new key) in place of the old one, if its binding is still the session's
        current key; False if it changed meanwhile."""

    @abc.abstractmethod
    def unbind(self, user_id: str) -> bool:
        """Forget user_id's binding (an operator's command) and close a connection that
        holds it (as replaced); False if there was neither."""

    @abc.abstractmethod
    def lookup(self, user_id: str) -> Presence:
        """Whether user_id is online, and its public key: the live one, else its bound key
        (bindings outlive connections, for their retention), else None."""

    @abc.abstractmethod
    def watch(self, user_ids: list[str]) -> list[Presence]:
        """This process watches ``user_ids`` (again: idempotent): from now on each change of
        their presence is reported (``events.presence_changed``) until ``unwatch``. Returns
        their presence now, as ``lookup`` would, in order."""

    @abc.abstractmethod
    def unwatch(self, user_ids: list[str]) -> None:
        """Nobody in this process watches ``user_ids`` any more. Never blocks or raises: a
        change reported after it is ignored by the hub."""

    @abc.abstractmethod
    def hold(self, session: Session, callee: str, frame: str, seconds: float,
             per_callee: int) -> Held:
        """Hold an offer of ``session`` for the offline ``callee`` for ``seconds`` (replacing
        one it held before): OK, ONLINE (``callee`` is online: relay it), or FULL (it has
        ``per_callee`` other callers' offers held)."""

    @abc.abstractmethod
    def hold_candidate(self, session: Session, callee: str, frame: str,
                       max_frames: int) -> Held:
        """Add a frame to the offer ``session`` holds for ``callee``: OK, NONE (none held
        now), or FULL (it has ``max_frames`` already)."""

    @abc.abstractmethod
    def take_held(self, callee: str) -> list[HeldOffer]:
        """Every offer held for ``callee``, oldest first; none is held any more."""

    @abc.abstractmethod
    def drop_held(self, callee: str, caller: str, session_id: str) -> bool:
        """The caller's offer for ``callee`` goes, if that session still holds it."""

    @abc.abstractmethod
    def cancel_held(self, caller: str, session_id: str, callees: list[str]) -> None:
        """A closed caller's offers go. Never blocks or raises."""

    @abc.abstractmethod
    def push_subscribe(self, user_id: str, subscription: dict, keep: int) -> None:
        """Keep a Web Push subscription of ``user_id`` (a bound ID) for as long as its
        binding; at most ``keep`` per ID, the oldest going first. The same endpoint again
        replaces it."""

    @abc.abstractmethod
    def push_unsubscribe(self, user_id: str, endpoint: str) -> bool:
        """Forget one subscription; False if there was none."""

    @abc.abstractmethod
    def push_subscriptions(self, user_id: str) -> list[dict]:
        """``user_id``'s subscriptions, as ``push_subscribe`` got them."""

    @abc.abstractmethod
    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        """Queue text for user_id's connection; False if it is offline or cannot take it."""

    @abc.abstractmethod
    def local_sessions(self) -> list[Session]:
        """Connections held by this process (a copy: safe to iterate while closing)."""

    @abc.abstractmethod
    def online_count(self) -> int:
        """Registered users this backend can see."""

    def binding_count(self) -> int | None:
        """Bindings this process keeps in memory (None: they live in a shared store)."""
        return None
