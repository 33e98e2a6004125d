"""Sealed signaling on a real server (docs/protocol.md 5e): published encryption keys,
sealed relays passed on unread, VOLLI_REQUIRE_SEALED, on both backends and across servers
sharing Redis. The crypto itself: test_hpke.py, test_sealing.py."""

from __future__ import annotations

import base64
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl.signing import SigningKey

from conftest import Client
from signing import Identity
from volli.protocol import hpke, identity, sealing


class Peer:
    """A signed user with an identity key, an encryption key pair, and a connection."""

    def __init__(self, client: Client, user_id: str) -> None:
        self.client, self.user_id = client, user_id
        self.seed = SigningKey.generate()
        self.identity = Identity(bytes(self.seed))
        self.enc_private = X25519PrivateKey.generate()
        self.enc_key = sealing.b64(hpke.public_bytes(self.enc_private))

    def enc_signature(self, key: str | None = None, signer: Identity | None = None) -> str:
        return (signer or self.identity).sign(
            identity.encryption_key_payload(self.user_id, key or self.enc_key))

    def register(self, publish: bool = True, **fields) -> dict:
        message = {"type": "register", "userId": self.user_id,
                   "publicKey": self.identity.public,
                   "signature": self.identity.sign(
                       identity.register_payload(self.client.nonce, self.user_id))}
        if publish:
            message.update(encryptionKey=self.enc_key,
                           encryptionKeySignature=self.enc_signature())
        message.update(fields)
        reply = self.client.call({k: v for k, v in message.items() if v is not None})
        if reply["type"] == "registered":
            self.client.nonce = reply["nonce"]
        return reply

    def seal(self, kind: str, to: "Peer", payload) -> dict:
        return sealing.seal(kind, self.user_id, to.user_id, payload,
                            base64.b64decode(to.enc_key), self.seed, _now_ms())

    def open(self, message: dict, sender: "Peer"):
        payload, _ = sealing.open_(message["type"], message["from"], self.user_id,
                                   message["sealed"], self.enc_private,
                                   bytes(sender.seed.verify_key), _now_ms())
        return payload


def _now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def peers(clients, uid):
    def make(name: str, url: str | None = None) -> Peer:
        return Peer(clients(url), uid(name))
    return make


def published(peer: Peer) -> dict:
    return {"encryptionKey": peer.enc_key, "encryptionKeySignature": peer.enc_signature()}


def test_a_published_key_is_discovered_watched_and_kept_with_the_binding(peers):
    alice, bob = peers("alice"), peers("bob")
    assert alice.register(publish=False)["type"] == "registered"
    assert bob.register()["type"] == "registered"
    found = alice.client.call({"type": "discover", "userId": bob.user_id})
    assert found["verified"] is True and found["online"] is True
    assert {k: found[k] for k in published(bob)} == published(bob)
    # The signature verifies with the discovered identity key: what a client checks.
    identity.verify(found["publicKey"], found["encryptionKeySignature"],
                    identity.encryption_key_payload(bob.user_id, found["encryptionKey"]))
    watching = alice.client.call({"type": "watch", "userIds": [bob.user_id, alice.user_id]})
    assert watching["presence"][0] == {"userId": bob.user_id, "online": True,
                                       "verified": True, **published(bob)}
    assert "encryptionKey" not in watching["presence"][1]  # alice published none
    bob.client.close()
    deadline = time.monotonic() + 10
    while (found := alice.client.call({"type": "discover", "userId": bob.user_id}))["online"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Offline: the binding, and the key with it, stays (a held offer can be sealed to it).
    assert {k: found[k] for k in published(bob)} == published(bob)


def test_publishing_needs_a_valid_signature_by_the_registering_key(peers):
    bob = peers("bob")
    other = Identity()
    refused = [
        bob.register(encryptionKeySignature=bob.enc_signature(signer=other)),
        bob.register(encryptionKeySignature=bob.enc_signature(key=Peer(bob.client, "x").enc_key)),
    ]
    assert [r["code"] for r in refused] == ["bad-signature"] * 2, refused
    assert "encryptionKeySignature" in refused[0]["message"]
    invalid = [
        bob.register(encryptionKeySignature=None),  # one without the other
        bob.register(publish=False, encryptionKeySignature=bob.enc_signature()),
        bob.register(encryptionKey=bob.enc_key.rstrip("=")),  # not the canonical spelling
        bob.register(encryptionKey=base64.urlsafe_b64encode(b"\xfb" * 32).decode()),
        bob.register(encryptionKey=base64.b64encode(b"k" * 31).decode()),
        bob.register(encryptionKey=42),
    ]
    assert [r["code"] for r in invalid] == ["invalid-message"] * len(invalid), invalid
    unsigned = bob.client.call({"type": "register", "userId": bob.user_id,
                                "publicKey": bob.identity.public, **published(bob)})
    assert unsigned["code"] == "invalid-message" and "signed" in unsigned["message"]
    assert bob.register()["type"] == "registered"  # nothing above was held against it


def test_a_new_registration_or_a_rotation_replaces_the_published_key(peers, clients):
    alice, bob = peers("alice"), peers("bob")
    alice.register(publish=False)
    bob.register()

    def discovered() -> dict:
        found = alice.client.call({"type": "discover", "userId": bob.user_id})
        return {k: found.get(k) for k in ("publicKey", "encryptionKey",
                                           "encryptionKeySignature")}

    # A takeover by the same identity key with a new encryption key replaces it.
    bob.client = clients()
    bob.enc_private = X25519PrivateKey.generate()
    bob.enc_key = sealing.b64(hpke.public_bytes(bob.enc_private))
    assert bob.register()["type"] == "registered"
    assert discovered()["encryptionKey"] == bob.enc_key
    # Rotation re-signs it with the new identity key...
    new_seed = SigningKey.generate()
    new_identity = Identity(bytes(new_seed))
    rotate = {"type": "rotate-key", "newPublicKey": new_identity.public,
              "signature": bob.identity.sign(identity.rotate_payload(
                  bob.client.nonce, bob.user_id, new_identity.public))}
    bad = bob.client.call({**rotate, "encryptionKey": bob.enc_key,
                           "encryptionKeySignature": bob.enc_signature()})  # by the old key
    assert bad["code"] == "bad-signature", bad
    rotated = bob.client.call({**rotate, "encryptionKey": bob.enc_key,
                               "encryptionKeySignature": bob.enc_signature(signer=new_identity)})
    assert rotated["type"] == "key-rotated", rotated
    bob.client.nonce, bob.seed, bob.identity = rotated["nonce"], new_seed, new_identity
    assert discovered() == {"publicKey": new_identity.public, **published(bob)}
    # ... and a rotation without it drops the key its old identity key had signed.
    newer = Identity()
    rotated = bob.client.call({"type": "rotate-key", "newPublicKey": newer.public,
                               "signature": bob.identity.sign(identity.rotate_payload(
                                   bob.client.nonce, bob.user_id, newer.public))})
    assert rotated["type"] == "key-rotated", rotated
    assert discovered() == {"publicKey": newer.public, "encryptionKey": None,
                            "encryptionKeySignature": None}


def test_a_sealed_relay_is_passed_on_unread_and_opens_at_the_receiver(peers):
    alice, bob = peers("alice"), peers("bob")
    alice.register()
    bob.register()
    offer = {"type": "offer", "sdp": "v=0\r\na=fingerprint:sha-256 AB:CD\r\n"}
    sealed = alice.seal("offer", bob, offer)
    alice.client.send({"type": "offer", "to": bob.user_id, "sealed": sealed, "callId": "c1"})
    got = bob.client.recv()
    assert got == {"type": "offer", "to": bob.user_id, "sealed": sealed, "callId": "c1",
                   "from": alice.user_id}
    assert bob.open(got, alice) == offer
    for candidate in ({"candidate": "candidate:1 1 udp 1 192.0.2.1 5000 typ host",
                       "sdpMid": "0"}, None):
        alice.client.send({"type": "ice-candidate", "to": bob.user_id,
                           "sealed": alice.seal("ice-candidate", bob, candidate)})
        assert bob.open(bob.client.recv(), alice) == candidate
    # The server cannot re-type or re-route it unnoticed: the receiver's open fails.
    alice.client.send({"type": "answer", "to": bob.user_id, "sealed": sealed})
    with pytest.raises(sealing.SealedError) as failed:
        bob.open(bob.client.recv(), alice)
    assert failed.value.reason == "does-not-open"


@pytest.mark.parametrize("bad", [
    {"sealed": "text"},
    {"sealed": {"enc": "AAAA", "ct": "AAAA"}},  # enc not 32 bytes
    {"sealed": {"ct": base64.b64encode(bytes(16)).decode()}},
    {"sealed": {"enc": base64.b64encode(bytes(32)).decode(),
                "ct": base64.b64encode(bytes(15)).decode()}},  # shorter than a tag
    {"sealed": {"enc": base64.b64encode(bytes(32)).decode(),
                "ct": base64.b64encode(bytes(16)).decode(), "x": 1}},
    {"sealed": {"enc": base64.b64encode(bytes(32)).decode().rstrip("="),
                "ct": base64.b64encode(bytes(16)).decode()}},
    {"sealed": {"enc": base64.b64encode(bytes(32)).decode(),
                "ct": base64.b64encode(bytes(16)).decode() + "AAA"}},  # not a multiple of 4
    {"sealed": {"enc": base64.b64encode(bytes(32)).decode(), "ct": ["AAAA"] * 6}},
    {"sealed": {"enc": base64.b64encode(bytes(32)).decode(),
                "ct": base64.b64encode(bytes(16)).decode()}, "offer": {"sdp": "v=0"}},
])
def test_a_malformed_sealed_relay_is_refused(peers, bad):
    alice, bob = peers("alice"), peers("bob")
    alice.register()
    bob.register()
    reply = alice.client.call({"type": "offer", "to": bob.user_id, **bad})
    assert reply["code"] == "invalid-message", reply
    alice.client.send({"type": "ice-candidate", "to": bob.user_id, "candidate": None})
    assert bob.client.recv()["candidate"] is None  # nothing else reached bob


def test_a_sealed_offer_is_held_for_an_offline_callee_and_opens_later(peers, clients):
    alice, bob = peers("alice"), peers("bob")
    bob.register()
    bob.client.close()
    alice.register()
    time.sleep(0.3)  # bob's close is processed
    offer = {"type": "offer", "sdp": "v=0\r\n"}
    held = alice.client.call({"type": "offer", "to": bob.user_id, "hold": 30,
                              "sealed": alice.seal("offer", bob, offer)})
    assert held["type"] == "held", held
    bob.client = clients()
    bob.register()
    got = bob.client.recv()
    assert got["type"] == "offer" and "heldFor" in got
    assert bob.open(got, alice) == offer


def test_require_sealed_refuses_every_plaintext_relay(make_server, uid):
    srv = make_server({"VOLLI_REQUIRE_SEALED": "1"})
    alice, bob = Peer(Client(srv.url), uid("alice")), Peer(Client(srv.url), uid("bob"))
    try:
        alice.register()
        bob.register()
        plain = [{"type": "offer", "offer": {"sdp": "v=0"}},
                 {"type": "answer", "answer": {"sdp": "v=0"}},
                 {"type": "ice-candidate", "candidate": None}]
        for message in plain:
            reply = alice.client.call({**message, "to": bob.user_id})
            assert reply["code"] == "sealed-required", reply
        assert alice.client.call({"type": "discover", "userId": bob.user_id})["online"]
        alice.client.send({"type": "answer", "to": bob.user_id,
                           "sealed": alice.seal("answer", bob, {"sdp": "v=0"})})
        got = bob.client.recv()
        assert bob.open(got, alice) == {"sdp": "v=0"}
    finally:
        alice.client.close()
        bob.client.close()


def test_a_key_published_on_one_server_is_seen_on_another_and_survives_an_empty_restart(
        nodes, deployment, open_client, uid):
    servers = [nodes(), nodes()]
    alice = Peer(open_client(servers[0]), uid("alice"))
    bob = Peer(open_client(servers[1]), uid("bob"))
    alice.register(publish=False)
    bob.register()
    found = alice.client.call({"type": "discover", "userId": bob.user_id})
    assert {k: found[k] for k in published(bob)} == published(bob)
    deployment.restart_empty()
    # Every server announces its users again, each with the key it published.
    deadline = time.monotonic() + 30
    while True:
        found = alice.client.call({"type": "discover", "userId": bob.user_id})
        if found.get("online") and found.get("encryptionKey"):
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    assert {k: found[k] for k in published(bob)} == published(bob)
    sealed = alice.seal("offer", bob, {"sdp": "v=0"})
    alice.client.send({"type": "offer", "to": bob.user_id, "sealed": sealed})
    assert bob.open(bob.client.recv(), alice) == {"sdp": "v=0"}
