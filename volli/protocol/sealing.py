"""Sealed signaling (docs/protocol.md section 5e): a relay's payload encrypted to the
receiver's published X25519 key with HPKE and signed by the sender's Ed25519 identity key.

Clients seal and open; the server only checks the outer shape (``messages.py``) and the
signature on a published key (``identity.py``). Pure functions plus one bounded replay
guard; no I/O, no clock of its own (callers pass the time).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from . import hpke

INFO = b"volli/sealed/v1"
SIGNATURE_CONTEXT = "volli/sealed-payload/v1"
MAX_AGE_MS = 300_000  # a sealed message older than this is refused (covers held offers)
MAX_AHEAD_MS = 60_000  # clock skew allowed the other way
REPLAY_MEMORY = 10_000  # enc values remembered to refuse a replay within the window


class SealedError(Exception):
    """A sealed message that must not be delivered; ``reason`` is one of
    ``malformed``, ``does-not-open``, ``bad-signature``, ``stale``, ``replayed``."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(f"{reason}: {text}")
        self.reason = reason


def aad(kind: str, sender: str, to: str) -> bytes:
    return f"{kind}\n{sender}\n{to}".encode()


def signed_bytes(kind: str, sender: str, to: str, ts: int, body: str) -> bytes:
    """What the sender's identity key signs inside the seal."""
    return f"{SIGNATURE_CONTEXT}\n{kind}\n{sender}\n{to}\n{ts}\n{body}".encode()


def seal(kind: str, sender: str, to: str, payload: Any, encryption_key: bytes,
         signing_key: SigningKey, ts: int, *,
         ephemeral: X25519PrivateKey | None = None) -> dict[str, str]:
    """The ``sealed`` field for a relay of ``kind`` from ``sender`` to ``to`` carrying
    ``payload``; ``encryption_key`` is the receiver's raw X25519 key, ``ts`` ms since
    the epoch. ``ephemeral`` is for test vectors only."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    signature = signing_key.sign(signed_bytes(kind, sender, to, ts, body)).signature
    plaintext = json.dumps({"body": body, "ts": ts, "sig": b64(signature)},
                           separators=(",", ":"), ensure_ascii=False).encode()
    enc, ct = hpke.seal(encryption_key, INFO, aad(kind, sender, to), plaintext, ephemeral)
    return {"enc": b64(enc), "ct": b64(ct)}


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """A sealed relay opened but not yet attributed: ``payload`` parsed from ``body``,
    which ``sig`` (over ``signed_bytes``) must prove the sender wrote at ``ts``."""

    kind: str
    sender: str
    to: str
    body: str
    ts: int
    sig: bytes
    payload: Any


def unseal(kind: str, sender: str, to: str, sealed: Any,
           private_key: X25519PrivateKey) -> Envelope:
    """Open a sealed relay as received (``sender`` as the server stamped it) and check its
    shape; no key of the sender's is needed yet, so junk costs no lookup. SealedError."""
    if not isinstance(sealed, dict):
        raise SealedError("malformed", "'sealed' is not an object")
    enc, ct = _unb64(sealed.get("enc")), _unb64(sealed.get("ct"))
    if enc is None or ct is None or len(enc) != hpke.N_ENC:
        raise SealedError("malformed", "'sealed' needs base64 'enc' (32 bytes) and 'ct'")
    try:
        plaintext = hpke.open_(private_key, enc, INFO, aad(kind, sender, to), ct)
    except hpke.OpenError:
        raise SealedError("does-not-open", "not sealed to this key for this type, "
                          "sender and receiver") from None
    try:
        inner = json.loads(plaintext)
        body, ts, sig = inner["body"], inner["ts"], _unb64(inner["sig"])
        if not isinstance(body, str) or type(ts) is not int or sig is None:
            raise TypeError
        payload = json.loads(body)
    # RecursionError: nesting deeper than the parser's stack (any sender can seal that)
    except (ValueError, KeyError, TypeError, RecursionError):
        raise SealedError("malformed", "the opened plaintext is not a sealed payload") from None
    # What the server requires of a plaintext relay's payload holds for a sealed one.
    if not (isinstance(payload, dict) or (payload is None and kind == "ice-candidate")):
        raise SealedError("malformed", f"a sealed {kind}'s payload must be an object"
                          + (" or null" if kind == "ice-candidate" else ""))
    return Envelope(kind, sender, to, body, ts, sig, payload)


def verify(envelope: Envelope, sender_key: bytes, now: int, *, max_age: int = MAX_AGE_MS,
           max_ahead: int = MAX_AHEAD_MS) -> Any:
    """The payload, once ``envelope`` is proven signed by the sender's raw Ed25519
    identity key within the replay window; or SealedError."""
    e = envelope
    try:
        VerifyKey(sender_key).verify(signed_bytes(e.kind, e.sender, e.to, e.ts, e.body), e.sig)
    except (BadSignatureError, ValueError, TypeError):
        raise SealedError("bad-signature",
                          f"not signed by {e.sender!r}'s identity key") from None
    if not now - max_age <= e.ts <= now + max_ahead:
        raise SealedError("stale", f"sealed {now - e.ts} ms ago, outside the replay window")
    return e.payload


def open_(kind: str, sender: str, to: str, sealed: Any, private_key: X25519PrivateKey,
          sender_key: bytes, now: int, *, max_age: int = MAX_AGE_MS,
          max_ahead: int = MAX_AHEAD_MS) -> tuple[Any, int]:
    """``(payload, ts)``: ``unseal`` then ``verify``."""
    envelope = unseal(kind, sender, to, sealed, private_key)
    return verify(envelope, sender_key, now, max_age=max_age, max_ahead=max_ahead), envelope.ts


class ReplayGuard:
    """The ``enc`` of every message opened within the window: a second one is a replay.
    Bounded: past ``capacity`` the oldest is forgotten."""

    def __init__(self, window_ms: int = MAX_AGE_MS + MAX_AHEAD_MS,
                 capacity: int = REPLAY_MEMORY) -> None:
        self.window, self.capacity = window_ms, capacity
        self._seen: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def check(self, enc: str, now: int) -> None:
        """``enc`` as received: compared as bytes, since one value has several base64
        spellings (the last character's unused bits) and a replay could use another."""
        raw = _unb64(enc)
        if raw is None:
            raise SealedError("malformed", "'sealed.enc' is not base64")
        while self._seen and (next(iter(self._seen.values())) < now - self.window
                              or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if raw in self._seen:
            raise SealedError("replayed", "this sealed message was delivered before")
        self._seen[raw] = now


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
