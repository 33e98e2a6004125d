"""The sealed envelope (docs/protocol.md 5e): the worked example byte for byte, and every
way a sealed message must fail to open. No I/O."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl.signing import SigningKey

from volli.protocol import hpke, identity, sealing

EXAMPLE = json.loads((Path(__file__).parent / "vectors" / "sealed-example.json").read_text())
H = bytes.fromhex
ALICE = SigningKey(H(EXAMPLE["senderIdentitySeed"]))
BOB = SigningKey(H(EXAMPLE["receiverIdentitySeed"]))
BOB_ENC = X25519PrivateKey.from_private_bytes(H(EXAMPLE["receiverEncryptionPrivateKey"]))
TS = EXAMPLE["ts"]


def test_the_worked_example_byte_for_byte():
    assert sealing.b64(bytes(ALICE.verify_key)) == EXAMPLE["senderPublicKey"]
    assert sealing.b64(bytes(BOB.verify_key)) == EXAMPLE["receiverPublicKey"]
    assert sealing.b64(hpke.public_bytes(BOB_ENC)) == EXAMPLE["encryptionKey"]
    signed = identity.encryption_key_payload("bob", EXAMPLE["encryptionKey"])
    assert signed.decode() == EXAMPLE["encryptionKeySignedText"]
    assert sealing.b64(BOB.sign(signed).signature) == EXAMPLE["encryptionKeySignature"]
    body = json.dumps(EXAMPLE["payload"], separators=(",", ":"))
    assert body == EXAMPLE["body"]
    assert sealing.signed_bytes("offer", "alice", "bob", TS, body).decode() == \
        EXAMPLE["signedText"]
    sealed = sealing.seal("offer", "alice", "bob", EXAMPLE["payload"],
                          base64.b64decode(EXAMPLE["encryptionKey"]), ALICE, TS,
                          ephemeral=X25519PrivateKey.from_private_bytes(
                              H(EXAMPLE["ephemeralPrivateKey"])))
    assert sealed == EXAMPLE["sealed"]
    assert base64.b64decode(sealed["ct"]).hex() == EXAMPLE["ctHex"]
    plaintext = hpke.open_(BOB_ENC, base64.b64decode(sealed["enc"]), b"volli/sealed/v1",
                           b"offer\nalice\nbob", base64.b64decode(sealed["ct"]))
    assert plaintext.decode() == EXAMPLE["plaintext"]
    assert sealing.open_("offer", "alice", "bob", sealed, BOB_ENC, bytes(ALICE.verify_key),
                         TS) == (EXAMPLE["payload"], TS)


def _open(sealed=None, kind="offer", sender="alice", to="bob", key=None, now=TS):
    return sealing.open_(kind, sender, to, sealed or EXAMPLE["sealed"], BOB_ENC,
                         key or bytes(ALICE.verify_key), now)


@pytest.mark.parametrize("change, reason", [
    ({"kind": "answer"}, "does-not-open"),
    ({"sender": "mallory"}, "does-not-open"),
    ({"to": "carol"}, "does-not-open"),
    ({"sealed": {**EXAMPLE["sealed"], "enc": sealing.b64(bytes(31) + b"\x09")}},
     "does-not-open"),
    ({"sealed": {**EXAMPLE["sealed"], "ct": "A" + EXAMPLE["sealed"]["ct"][1:]}},
     "does-not-open"),
    ({"sealed": {"enc": "AAAA", "ct": "AAAA"}}, "malformed"),
    ({"sealed": {"enc": EXAMPLE["sealed"]["enc"]}}, "malformed"),
    ({"key": bytes(BOB.verify_key)}, "bad-signature"),
    ({"now": TS + sealing.MAX_AGE_MS + 1}, "stale"),
    ({"now": TS - sealing.MAX_AHEAD_MS - 1}, "stale"),
])
def test_tampering_and_staleness_are_detected(change, reason):
    with pytest.raises(sealing.SealedError) as failed:
        _open(**change)
    assert failed.value.reason == reason


def test_a_seal_signed_by_someone_else_names_bad_signature():
    """The server (or anyone with bob's public key) can seal to bob, but cannot sign as
    alice: a seal made with another identity key fails on alice's key."""
    forged = sealing.seal("offer", "alice", "bob", {"sdp": "v=0"}, hpke.public_bytes(BOB_ENC),
                          SigningKey.generate(), TS)
    with pytest.raises(sealing.SealedError) as failed:
        _open(forged)
    assert failed.value.reason == "bad-signature"


def test_a_plaintext_that_is_not_an_envelope_is_malformed():
    enc, ct = hpke.seal(hpke.public_bytes(BOB_ENC), sealing.INFO,
                        sealing.aad("offer", "alice", "bob"), b'{"body": 1}')
    with pytest.raises(sealing.SealedError) as failed:
        _open({"enc": sealing.b64(enc), "ct": sealing.b64(ct)})
    assert failed.value.reason == "malformed"


def test_the_replay_guard_refuses_a_second_open_and_forgets_after_the_window():
    guard = sealing.ReplayGuard(window_ms=1000, capacity=3)
    a, others = sealing.b64(b"a" * 32), [sealing.b64(bytes([n]) * 32) for n in range(5)]
    guard.check(a, now=0)
    with pytest.raises(sealing.SealedError) as failed:
        guard.check(a, now=500)
    assert failed.value.reason == "replayed"
    guard.check(a, now=1501)  # outside the window: a stale ts is refused anyway
    for n, enc in enumerate(others):
        guard.check(enc, now=1600 + n)
    assert len(guard._seen) <= 3  # bounded


def test_a_replay_in_another_base64_spelling_is_still_a_replay():
    """32 bytes leave 2 unused bits in the last base64 character: the same enc has four
    spellings, and a decoder takes them all."""
    enc = EXAMPLE["sealed"]["enc"]
    last = enc[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    respelled = enc[:-2] + alphabet[alphabet.index(last) ^ 1] + "="
    assert respelled != enc and base64.b64decode(respelled) == base64.b64decode(enc)
    sealed = {**EXAMPLE["sealed"], "enc": respelled}
    assert _open(sealed) == (EXAMPLE["payload"], TS)  # it opens: HPKE sees the same bytes
    guard = sealing.ReplayGuard()
    guard.check(EXAMPLE["sealed"]["enc"], TS)
    with pytest.raises(sealing.SealedError) as failed:
        guard.check(respelled, TS)
    assert failed.value.reason == "replayed"
