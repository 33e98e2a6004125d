"""HPKE (RFC 9180) base mode, single shot, for one suite: DHKEM(X25519, HKDF-SHA256),
HKDF-SHA256, AES-128-GCM.

Built on `cryptography`'s X25519, HMAC and AES-GCM. `cryptography` ships HPKE too
(``hazmat.primitives.hpke.Suite``), but its single-shot API takes no AAD, which sealed
signaling binds the routing fields into, and cannot be given a fixed ephemeral key, which
the RFC's test vectors need. tests/test_hpke.py checks this module against the RFC 9180
A.1 vectors and against ``Suite`` itself (with an empty AAD, both ways).
Names follow RFC 9180 section 4 and 5.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0001
N_SECRET, N_ENC, N_PK, N_SK = 32, 32, 32, 32
N_K, N_N, N_H = 16, 12, 32
MODE_BASE = 0

_KEM_SUITE_ID = b"KEM" + KEM_ID.to_bytes(2, "big")
_HPKE_SUITE_ID = (b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big")
                  + AEAD_ID.to_bytes(2, "big"))
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class OpenError(Exception):
    """The ciphertext does not open with this key, info and AAD."""


def _extract(salt: bytes, ikm: bytes) -> bytes:
    mac = hmac.HMAC(salt or bytes(N_H), hashes.SHA256())
    mac.update(ikm)
    return mac.finalize()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        mac = hmac.HMAC(prk, hashes.SHA256())
        mac.update(block + info + bytes((counter,)))
        block = mac.finalize()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes,
                    length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info,
                   length)


def derive_key_pair(ikm: bytes) -> X25519PrivateKey:
    """DeriveKeyPair (RFC 9180 7.1.3): the key pair the test vectors derive from ``ikm``."""
    dkp_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    return X25519PrivateKey.from_private_bytes(
        _labeled_expand(_KEM_SUITE_ID, dkp_prk, b"sk", b"", N_SK))


def _shared_secret(dh: bytes, enc: bytes, pk_r: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", enc + pk_r, N_SECRET)


def _key_schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    psk_id_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"info_hash", info)
    context = bytes((MODE_BASE,)) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE_ID, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE_ID, secret, b"key", context, N_K)
    base_nonce = _labeled_expand(_HPKE_SUITE_ID, secret, b"base_nonce", context, N_N)
    return key, base_nonce  # sequence number 0: the nonce is base_nonce itself


def seal(pk_r: bytes, info: bytes, aad: bytes, plaintext: bytes,
         sk_e: X25519PrivateKey | None = None) -> tuple[bytes, bytes]:
    """SealBase: ``(enc, ct)`` for the raw X25519 public key ``pk_r``. ``sk_e`` fixes the
    ephemeral key (test vectors only: reusing one breaks the scheme)."""
    sk_e = sk_e or X25519PrivateKey.generate()
    enc = sk_e.public_key().public_bytes(*_RAW)
    dh = sk_e.exchange(X25519PublicKey.from_public_bytes(pk_r))
    key, nonce = _key_schedule(_shared_secret(dh, enc, pk_r), info)
    return enc, AESGCM(key).encrypt(nonce, plaintext, aad)


def open_(sk_r: X25519PrivateKey, enc: bytes, info: bytes, aad: bytes, ct: bytes) -> bytes:
    """OpenBase: the plaintext, or OpenError."""
    pk_r = sk_r.public_key().public_bytes(*_RAW)
    try:
        dh = sk_r.exchange(X25519PublicKey.from_public_bytes(enc))
        key, nonce = _key_schedule(_shared_secret(dh, enc, pk_r), info)
        return AESGCM(key).decrypt(nonce, ct, aad)
    except (InvalidTag, ValueError) as exc:  # ValueError: a bad or small-order enc
        raise OpenError("the sealed message does not open") from exc


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(*_RAW)
