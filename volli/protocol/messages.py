"""Signaling messages: parse and validate what clients send, build what the server sends.

Names follow docs/protocol.md. Incoming JSON becomes one of the dataclasses below (not
frozen: a frozen one costs a microsecond more to build, a tenth of a relay) or
raises ProtocolError; outgoing messages are built by the ``*_message`` functions and
turned into frame text by ``encode``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import string
from typing import Any, Union

import orjson

from .errors import ErrorCode, ProtocolError
from .names import key_problem, user_id_problem

PROTOCOL_VERSION = 1
USER_ID_MAX = 256
PUBLIC_KEY_MAX = 4096
SIGNATURE_MAX = 128
REQUEST_ID_MAX = 128
RELAY_NESTING_MAX = 254  # orjson's limit when writing
WATCH_IDS_MAX = 1000  # user IDs in one watch or unwatch message
HOLD_MAX = 86400  # the largest `hold` an offer may ask (the server caps it lower)

# Standard and URL-safe base64 alphabets with padding. The key is not decoded: the
# seed's own example ("base64-encoded-public-key") must be accepted as written.
_BASE64ISH = re.compile(r"[A-Za-z0-9+/=_-]+")

RequestId = Union[str, int, None]

# Relay types and the name of the payload field each one carries.
RELAY_PAYLOAD = {"offer": "offer", "answer": "answer", "ice-candidate": "candidate"}


@dataclasses.dataclass(frozen=True, slots=True)
class EncryptionKey:
    """``encryptionKey`` (canonical base64 of a raw X25519 key) and
    ``encryptionKeySignature`` by the user's identity key: what a message publishes, what
    a binding stores and what discover returns."""

    key: str
    signature: str


@dataclasses.dataclass(slots=True)
class Register:
    user_id: str
    public_key: str
    request_id: RequestId = None
    signature: str | None = None
    encryption_key: EncryptionKey | None = None


@dataclasses.dataclass(slots=True)
class RotateKey:
    new_public_key: str
    signature: str
    request_id: RequestId = None
    encryption_key: EncryptionKey | None = None


@dataclasses.dataclass(slots=True)
class Discover:
    user_id: str
    request_id: RequestId = None


@dataclasses.dataclass(slots=True)
class Relay:
    """offer, answer or ice-candidate; ``body`` is the whole message as received, ``text``
    the frame it was parsed from."""

    kind: str
    to: str
    sender: str | None
    body: dict[str, Any]
    request_id: RequestId = None
    text: str = ""
    hold: int | None = None  # an offer's seconds to wait for an offline callee
    sealed: bool = False  # the payload is in ``sealed`` (encrypted to the receiver)


@dataclasses.dataclass(slots=True)
class Ping:
    request_id: RequestId = None


@dataclasses.dataclass(slots=True)
class IceServers:
    """A request for ICE servers (STUN/TURN with fresh credentials)."""

    request_id: RequestId = None


@dataclasses.dataclass(slots=True)
class Watch:
    """Subscribe to the presence of ``user_ids`` (distinct, in the order given)."""

    user_ids: list[str]
    request_id: RequestId = None


@dataclasses.dataclass(slots=True)
class Unwatch:
    user_ids: list[str]
    request_id: RequestId = None


@dataclasses.dataclass(slots=True)
class PushSubscribe:
    """A browser's ``PushSubscription.toJSON()``: {endpoint, keys: {p256dh, auth}}."""

    subscription: dict[str, Any]
    request_id: RequestId = None


@dataclasses.dataclass(slots=True)
class PushUnsubscribe:
    endpoint: str
    request_id: RequestId = None


Message = Union[Register, Discover, Relay, Ping, RotateKey, IceServers, Watch, Unwatch,
                PushSubscribe, PushUnsubscribe]


def parse(text: str | bytes) -> Message:
    """Decode one text frame into a Message, or raise ProtocolError."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
    request_id = _request_id(data)
    kind = data.get("type")
    try:
        if not isinstance(kind, str):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'type' must be a string")
        if kind == "register":
            signature = _signature(data, required=False)
            return Register(_user_id(data, "userId"), _public_key(data, "publicKey"), request_id,
                            signature, _encryption_key(data, signature is not None))
        if kind == "rotate-key":
            return RotateKey(_public_key(data, "newPublicKey"), _signature(data, required=True),
                             request_id, _encryption_key(data, True))
        if kind == "discover":
            return Discover(_user_id(data, "userId"), request_id)
        if kind in RELAY_PAYLOAD:
            return _relay(kind, data, request_id, text)
        if kind == "ping":
            return Ping(request_id)
        if kind == "ice-servers":
            return IceServers(request_id)
        if kind == "watch":
            return Watch(_user_ids(data), request_id)
        if kind == "unwatch":
            return Unwatch(_user_ids(data), request_id)
        if kind == "push-subscribe":
            return PushSubscribe(_push_subscription(data.get("subscription")), request_id)
        if kind == "push-unsubscribe":
            return PushUnsubscribe(_endpoint(data.get("endpoint")), request_id)
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}")
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def _request_id(data: dict[str, Any]) -> RequestId:
    value = data.get("requestId")
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= REQUEST_ID_MAX:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ProtocolError(
        ErrorCode.INVALID_MESSAGE,
        f"'requestId' must be a string of at most {REQUEST_ID_MAX} characters or an integer",
    )


def _user_id(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{field}' must be a string")
    problem = user_id_problem(value, USER_ID_MAX)
    if problem:
        raise ProtocolError(ErrorCode.INVALID_USER_ID, f"'{field}' {problem}")
    return value


def _user_ids(data: dict[str, Any]) -> list[str]:
    """``userIds``: a non-empty array of at most WATCH_IDS_MAX user IDs, duplicates dropped."""
    value = data.get("userIds")
    if not isinstance(value, list) or not value:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            "'userIds' must be a non-empty array of user IDs")
    if len(value) > WATCH_IDS_MAX:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"'userIds' may name at most {WATCH_IDS_MAX} user IDs")
    for n, user_id in enumerate(value):
        if not isinstance(user_id, str):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'userIds'[{n}] must be a string")
        problem = user_id_problem(user_id, USER_ID_MAX)
        if problem:
            raise ProtocolError(ErrorCode.INVALID_USER_ID, f"'userIds'[{n}] {problem}")
    return list(dict.fromkeys(value))


ENDPOINT_MAX = 2048
# A push endpoint: scheme, a host name (no userinfo, no IP-literal brackets), an optional
# port, then path and query of RFC 3986 characters. Nothing that URL parsers read in
# different ways (a backslash, '@', whitespace, non-ASCII) gets through: the host the
# allow-list sees is the host the request goes to.
_ENDPOINT = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!$&'()*+,;=:/%?-]*)?")


def _endpoint(value: Any) -> str:
    if (not isinstance(value, str) or len(value) > ENDPOINT_MAX
            or not _ENDPOINT.fullmatch(value)):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'endpoint' must be an http(s) URL of "
                            f"at most {ENDPOINT_MAX} characters, with a host name and no "
                            "user info")
    return value


def _push_subscription(value: Any) -> dict[str, Any]:
    """The subscription, checked: its endpoint, a P-256 point (65 bytes) and a 16-byte
    authentication secret, base64url as browsers write them."""
    if not isinstance(value, dict) or not isinstance(value.get("keys"), dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'subscription' must be a "
                            "PushSubscription's JSON: {endpoint, keys: {p256dh, auth}}")
    keys = {}
    for name, size in (("p256dh", 65), ("auth", 16)):
        text = value["keys"].get(name)
        raw = _base64url(text)
        if raw is None or len(raw) != size or (name == "p256dh" and raw[0] != 4):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                                f"'keys.{name}' must be {size} bytes of base64url")
        keys[name] = text
    return {"endpoint": _endpoint(value.get("endpoint")), "keys": keys}


def _base64url(text: Any) -> bytes | None:
    if not isinstance(text, str) or len(text) > 128 or not _BASE64ISH.fullmatch(text):
        return None
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except ValueError:
        return None


def _public_key(data: dict[str, Any], field: str) -> str:
    return _base64_field(data, field, PUBLIC_KEY_MAX)


def _signature(data: dict[str, Any], required: bool) -> str | None:
    if data.get("signature") is None and not required:
        return None
    return _base64_field(data, "signature", SIGNATURE_MAX)


def _base64_field(data: dict[str, Any], field: str, limit: int) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not value:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{field}' must be a non-empty string")
    if len(value) > limit:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"'{field}' is longer than {limit} characters")
    if not _BASE64ISH.fullmatch(value):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{field}' must be base64 text")
    return value


def _relay(kind: str, data: dict[str, Any], request_id: RequestId, text: str | bytes) -> Relay:
    to = _user_id(data, "to")
    sender = data.get("from")
    if sender is not None and not isinstance(sender, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'from' must be a string when present")
    field = RELAY_PAYLOAD[kind]
    sealed = "sealed" in data
    if sealed == (field in data):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"'{kind}' needs either a '{field}' or a 'sealed' field")
    payload = data["sealed"] if sealed else data[field]
    if sealed:
        _check_sealed(payload)
    # An ICE candidate of null marks the end of candidates and must relay too.
    elif not (isinstance(payload, dict) or (payload is None and kind == "ice-candidate")):
        expected = "an object or null" if kind == "ice-candidate" else "an object"
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{field}' must be {expected}")
    if not data.keys() <= _PLAIN_KEYS:
        for key in data:
            problem = key_problem(key)
            if problem:
                raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"top-level {problem}")
    hold = None
    if kind == "offer" and data.get("hold") is not None:
        hold = data["hold"]
        if not isinstance(hold, int) or isinstance(hold, bool) or not 1 <= hold <= HOLD_MAX:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                                f"'hold' must be an integer number of seconds, 1 to {HOLD_MAX}")
    return Relay(kind, to, sender, data, request_id, _canonical(data, text), hold, sealed)


# Top-level keys of a relay that need no look for look-alikes.
_PLAIN_KEYS = frozenset(("type", "to", "from", "requestId", "offer", "answer", "candidate",
                         "sealed", "hold"))

SEALED_ENC_BYTES = 32  # an X25519 public key: HPKE's encapsulated key
SEALED_CT_MIN = 16  # the AES-GCM tag alone
SEALED_CT_CHARS = 24  # SEALED_CT_MIN bytes in padded base64


def _check_sealed(sealed: Any) -> None:
    """The outer shape of a sealed payload (docs/protocol.md 5e); its content is the
    receiver's to open."""
    if not isinstance(sealed, dict) or sealed.keys() != {"enc", "ct"}:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            "'sealed' must be an object with exactly 'enc' and 'ct'")
    if _base64_size(sealed["enc"]) != SEALED_ENC_BYTES:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"'sealed.enc' must be {SEALED_ENC_BYTES} bytes in standard base64")
    # Only the size of ct: its alphabet is the receiver's to check (it decodes it anyway),
    # and checking it here cost 8% of a saturated worker's time.
    ct = sealed["ct"]
    if not isinstance(ct, str) or len(ct) < SEALED_CT_CHARS or len(ct) % 4:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'sealed.ct' must be standard base64 "
                            f"of at least {SEALED_CT_MIN} bytes")


_BASE64_ALPHABET = (string.ascii_letters + string.digits + "+/").encode()


def _base64_size(text: Any) -> int | None:
    """How many bytes ``text`` holds if it is standard base64 with padding, else None
    (checked, not decoded)."""
    if not isinstance(text, str) or len(text) % 4 or not text.isascii():
        return None
    body = text.rstrip("=")
    if len(text) - len(body) > 2 or body.encode().translate(None, _BASE64_ALPHABET):
        return None
    return len(body) * 3 // 4


ENCRYPTION_KEY_LENGTH = 44  # 32 bytes in padded standard base64


def _encryption_key(data: dict[str, Any], signed: bool) -> EncryptionKey | None:
    """``encryptionKey`` with ``encryptionKeySignature``: both or neither, and only where an
    identity key signs (a signed register, rotate-key)."""
    key, signature = data.get("encryptionKey"), data.get("encryptionKeySignature")
    if key is None and signature is None:
        return None
    if not signed:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'encryptionKey' needs a signed "
                            "registration: its signature is by the identity key")
    if _base64_size(key) != 32 or len(key) != ENCRYPTION_KEY_LENGTH:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'encryptionKey' must be a raw 32-byte "
                            "X25519 key in standard base64 with padding")
    return EncryptionKey(key, _base64_field(data, "encryptionKeySignature",
                                                  SIGNATURE_MAX))


def _canonical(data: dict[str, Any], text: str | bytes) -> str:
    """The compact JSON of ``data``: what the receiver gets, so its parser reads exactly
    what was checked here. A received text that is already that (what browsers' and
    orjson's serializers write) is kept; any other is checked for duplicate top-level
    keys, which parsers resolve differently (first or last wins), then re-encoded."""
    try:
        canonical = orjson.dumps(data)
    except orjson.JSONEncodeError:  # orjson reads deeper JSON than it writes
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"a relayed message may nest at most {RELAY_NESTING_MAX} levels"
                            ) from None
    raw = text.encode() if isinstance(text, str) else text
    if canonical == raw:
        return text if isinstance(text, str) else canonical.decode()
    duplicate = _duplicate_key(raw)
    if duplicate is not None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"top-level key {duplicate[:16]!r} appears more than once")
    return canonical.decode()


def _duplicate_key(raw: bytes) -> str | None:
    """The first top-level key that ``raw`` (a JSON object orjson accepted) repeats."""
    pairs = json.loads(raw, object_pairs_hook=_pairs)  # the outermost object's, in order
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def _pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs


def encode(message: dict[str, Any]) -> str:
    """The text frame for an outgoing message."""
    return orjson.dumps(message).decode()


def _with_request_id(message: dict[str, Any], request_id: RequestId) -> dict[str, Any]:
    if request_id is not None:
        message["requestId"] = request_id
    return message


def hello_message(nonce: str, max_message_size: int) -> dict[str, Any]:
    """``maxMessageSize``: the largest message the server takes (bytes), so that a client
    can refuse to send a larger one (a sealed relay is larger than its plaintext) instead
    of being closed with 1009."""
    return {"type": "hello", "nonce": nonce, "version": PROTOCOL_VERSION,
            "maxMessageSize": max_message_size}


def registered_message(user_id: str, request_id: RequestId = None,
                       nonce: str | None = None) -> dict[str, Any]:
    """``nonce`` (the next one) only after a signed registration consumed the previous."""
    message = {"type": "registered", "userId": user_id}
    if nonce is not None:
        message["nonce"] = nonce
    return _with_request_id(message, request_id)


def key_rotated_message(user_id: str, public_key: str, nonce: str,
                        request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "key-rotated", "userId": user_id,
                             "publicKey": public_key, "nonce": nonce}, request_id)


def ice_servers_message(servers: list[dict[str, Any]],
                        request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "ice-servers", "iceServers": servers}, request_id)


def session_replaced_message() -> dict[str, Any]:
    return {"type": "session-replaced"}


def rate_limited_message(limit: str, retry_after: float,
                         request_id: RequestId = None) -> dict[str, Any]:
    message = error_message(ErrorCode.RATE_LIMITED,
                            f"{limit} limit reached; retry in {retry_after:.1f}s", request_id)
    message.update(limit=limit, retryAfter=round(retry_after, 3))
    return message


def discover_response_message(user_id: str, online: bool, public_key: str | None,
                              verified: bool = False, request_id: RequestId = None,
                              encryption_key: EncryptionKey | None = None
                              ) -> dict[str, Any]:
    """``verified``: ``public_key`` is bound to ``user_id`` by a signed registration;
    ``encryption_key``: the one the binding published."""
    return _with_request_id(_with_encryption_key(
        {"type": "discover-response", "userId": user_id, "online": online,
         "publicKey": public_key, "verified": verified}, encryption_key), request_id)


def _with_encryption_key(entry: dict[str, Any],
                         encryption_key: EncryptionKey | None) -> dict[str, Any]:
    """A user's entry with its published encryption key, if it has one."""
    if encryption_key is not None:
        entry["encryptionKey"] = encryption_key.key
        entry["encryptionKeySignature"] = encryption_key.signature
    return entry


def watching_message(presences: list[tuple[str, bool, bool, EncryptionKey | None]],
                     request_id: RequestId = None) -> dict[str, Any]:
    """``presences``: (userId, online, verified, published encryption key or None) of each
    watched user, in request order."""
    return _with_request_id({"type": "watching", "presence": [
        _with_encryption_key({"userId": user_id, "online": online, "verified": verified},
                             encryption)
        for user_id, online, verified, encryption in presences]}, request_id)


def unwatched_message(user_ids: list[str], request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "unwatched", "userIds": user_ids}, request_id)


def presence_message(user_id: str, online: bool) -> dict[str, Any]:
    return {"type": "presence", "userId": user_id, "online": online}


def held_message(to: str, expires_in: int, request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "held", "to": to, "expiresIn": expires_in}, request_id)


def delivered_message(to: str) -> dict[str, Any]:
    """To a caller: its offer held for ``to`` was delivered (``to`` registered)."""
    return {"type": "delivered", "to": to}


def expired_message(to: str) -> dict[str, Any]:
    """To a caller: ``to`` did not register while its offer was held."""
    return {"type": "expired", "to": to}


def with_held_for(frame: str, held_for_ms: int) -> str:
    """A held frame as the callee gets it: with ``heldFor`` (ms) appended."""
    return f'{frame[:-1]},"heldFor":{int(held_for_ms)}}}'


def push_subscribed_message(request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "push-subscribed"}, request_id)


def push_unsubscribed_message(request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "push-unsubscribed"}, request_id)


def cap_message(limit: str, maximum: int, text: str,
                request_id: RequestId = None) -> dict[str, Any]:
    """A request that would pass a cap (not a rate): waiting alone does not help
    (``retryAfter`` 0); ``max`` is the cap."""
    message = error_message(ErrorCode.RATE_LIMITED, text, request_id)
    message.update(limit=limit, retryAfter=0, max=maximum)
    return message


def watch_limit_message(limit: int, request_id: RequestId = None) -> dict[str, Any]:
    return cap_message("watched-ids", limit, f"a connection may watch at most {limit} user "
                       "IDs; unwatch some first", request_id)


def hold_limit_message(limit: str, maximum: int, to: str,
                       request_id: RequestId = None) -> dict[str, Any]:
    return cap_message(limit, maximum, f"{limit} limit ({maximum}) reached: nothing more is "
                       f"held for {to!r}", request_id)


def pong_message(request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "pong"}, request_id)


def error_message(code: ErrorCode, message: str, request_id: RequestId = None) -> dict[str, Any]:
    return _with_request_id({"type": "error", "code": str(code), "message": message}, request_id)


def undelivered_message(peer: str, count: int, busy: bool = False) -> dict[str, Any]:
    """Tells a sender that relays it had sent were dropped because ``peer`` went away, or
    (``busy``) because its worker found its queue full of unread frames."""
    if busy:
        message = error_message(ErrorCode.PEER_BUSY, f"{count} message(s) to {peer!r} were "
                                "not delivered: it is not reading fast enough")
    else:
        message = error_message(ErrorCode.PEER_OFFLINE, f"{count} message(s) to {peer!r} "
                                "were not delivered: it disconnected")
    message.update(peer=peer, undelivered=count)
    return message


def encode_relay(relay: Relay, sender: str) -> str:
    """The relayed frame: the compact text of the checked message (``Relay.text``) with
    ``"from"`` appended, which spares re-encoding the SDP. A message that named its own
    ``from`` already names ``sender`` (the hub checked it) and goes as it is; one whose
    ``from`` was null gets it set."""
    if "from" not in relay.body:
        return f'{relay.text[:-1]},"from":{orjson.dumps(sender).decode()}}}'
    if relay.sender == sender:
        return relay.text
    relay.body["from"] = sender
    return encode(relay.body)
