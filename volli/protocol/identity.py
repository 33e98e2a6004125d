"""Proof of key ownership: Ed25519 signatures over domain-separated, nonce-bound bytes.

The exact bytes signed are defined in docs/protocol.md (with a test vector); keep both
in step. Verification is libsodium's (PyNaCl), never hand-written crypto: unlike a bare
RFC 8032 check it refuses small-order and non-canonical keys, for which a "signature"
would verify for any message.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from .errors import ErrorCode, ProtocolError

REGISTER_CONTEXT = "volli/register/v1"
ROTATE_CONTEXT = "volli/rotate-key/v1"
ENCRYPTION_KEY_CONTEXT = "volli/encryption-key/v1"
NONCE_BYTES = 18  # 24 characters of base64url


def new_nonce() -> str:
    return secrets.token_urlsafe(NONCE_BYTES)


def register_payload(nonce: str, user_id: str) -> bytes:
    """The bytes a client signs to register ``user_id`` on the connection that got ``nonce``."""
    return f"{REGISTER_CONTEXT}\n{nonce}\n{user_id}".encode()


def rotate_payload(nonce: str, user_id: str, new_public_key: str) -> bytes:
    """The bytes the old key signs to bind ``new_public_key`` to ``user_id``."""
    return f"{ROTATE_CONTEXT}\n{nonce}\n{user_id}\n{new_public_key}".encode()


def encryption_key_payload(user_id: str, encryption_key: str) -> bytes:
    """The bytes the identity key signs to publish ``encryption_key`` for sealed relays."""
    return f"{ENCRYPTION_KEY_CONTEXT}\n{user_id}\n{encryption_key}".encode()


def canonical_key(public_key: str, field: str = "publicKey") -> str:
    """The one spelling of a raw 32-byte Ed25519 key given in standard or URL-safe base64,
    padded or not: standard base64 with padding. Bound keys are stored and compared in
    it, so the same 32 bytes are the same key however a client spells them."""
    raw = _b64decode(public_key, field)
    if len(raw) != 32:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"'{field}' must be a raw 32-byte Ed25519 key in base64 "
                            "when the message is signed")
    return base64.b64encode(raw).decode()


def verify(public_key: str, signature: str, payload: bytes,
           failure: str = "signature does not verify for this key, nonce and userId") -> None:
    """Raise ProtocolError(bad-signature, ``failure``) unless ``signature`` is valid for
    ``payload``. ``public_key`` is in any spelling ``canonical_key`` accepts."""
    key = VerifyKey(base64.b64decode(canonical_key(public_key)))
    raw = _b64decode(signature, "signature")
    try:
        key.verify(payload, raw)
    except (BadSignatureError, ValueError):
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, failure) from None


def _b64decode(text: str, field: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{field}' is not valid base64") from None
