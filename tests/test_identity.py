"""Proof of key ownership: signed registration, bindings, takeover, rotation."""

from __future__ import annotations

import base64
import time

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import Client
from signing import Identity
from volli.protocol import ErrorCode, ProtocolError
from volli.protocol import identity

# The test vector of docs/protocol.md ("Signed registration").
VECTOR_SEED = bytes(range(32))
VECTOR_NONCE = "bm9uY2Utb2YtdGhlLXRlc3Qh"
VECTOR_PUBLIC_KEY = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
VECTOR_SIGNATURE = ("5vf8lnJ/TzqcHHJn4bcP4Cbts4y5lkfSfXvF48Fgx+SCqi8nB7ETX+44cc6L5whfWlyuTTPAAtq9"
                    "ikAHPC8/AA==")
VECTOR_NEW_KEY = "Kay64UG8yvCyLhqU000LxzYeUm0L/hLIl5S8kyKWbdc="
VECTOR_ROTATE_SIGNATURE = ("lYUb25LBpsrxqP2jAcdZWoS0asEJ8omc/H2J4yfHWtHNTcRAAOQ7aClqr0tr5lit91g"
                           "HDn1RXqD9VsDKBCo8Cg==")


def test_vector():
    me = Identity(VECTOR_SEED)
    assert me.public == VECTOR_PUBLIC_KEY
    payload = identity.register_payload(VECTOR_NONCE, "alice@volli.app")
    assert payload == b"volli/register/v1\nbm9uY2Utb2YtdGhlLXRlc3Qh\nalice@volli.app"
    assert me.sign(payload) == VECTOR_SIGNATURE
    identity.verify(VECTOR_PUBLIC_KEY, VECTOR_SIGNATURE, payload)
    rotate = identity.rotate_payload(VECTOR_NONCE, "alice@volli.app", VECTOR_NEW_KEY)
    assert me.sign(rotate) == VECTOR_ROTATE_SIGNATURE
    identity.verify(VECTOR_PUBLIC_KEY, VECTOR_ROTATE_SIGNATURE, rotate)


@pytest.mark.parametrize("key,signature,user", [
    (VECTOR_PUBLIC_KEY, VECTOR_SIGNATURE, "bob@volli.app"),  # other userId
    (VECTOR_NEW_KEY, VECTOR_SIGNATURE, "alice@volli.app"),  # other key
    (VECTOR_PUBLIC_KEY, VECTOR_ROTATE_SIGNATURE, "alice@volli.app"),  # other context
])
def test_signatures_do_not_transfer(key, signature, user):
    with pytest.raises(ProtocolError) as info:
        identity.verify(key, signature, identity.register_payload(VECTOR_NONCE, user))
    assert info.value.code == ErrorCode.BAD_SIGNATURE


def test_small_order_keys_never_verify():
    # With this key and "signature", a bare RFC 8032 check passes for every message.
    weak_key = base64.b64encode(bytes([1]) + bytes(31)).decode()
    weak_signature = base64.b64encode(bytes([1]) + bytes(63)).decode()
    with pytest.raises(ProtocolError) as info:
        identity.verify(weak_key, weak_signature, identity.register_payload("n", "alice"))
    assert info.value.code == ErrorCode.BAD_SIGNATURE


def test_signed_keys_must_be_raw_ed25519():
    with pytest.raises(ProtocolError) as info:
        identity.verify("base64-encoded-public-key", VECTOR_SIGNATURE, b"x")
    assert info.value.code == ErrorCode.INVALID_MESSAGE


def test_hello_gives_a_fresh_nonce_per_connection(clients):
    a, b = clients(), clients()
    assert a.hello["version"] == 1 and b.hello["version"] == 1
    assert len(a.nonce) >= 24 and a.nonce != b.nonce


def test_signed_registration_binds_the_user_id(clients, uid):
    alice, user = Identity(), uid("alice")
    first = clients()
    reply = alice.register(first, user)
    assert reply["type"] == "registered" and reply["userId"] == user
    assert reply["nonce"] != first.hello["nonce"]  # the used nonce is replaced
    first.close()
    watcher = clients()
    watcher.register(uid("w"))
    deadline = time.monotonic() + 5
    while watcher.call({"type": "discover", "userId": user})["online"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Offline, but bound: an unsigned claim and a claim by another key are refused.
    thief = clients()
    reply = thief.call({"type": "register", "userId": user, "publicKey": "AAAA"})
    assert reply["code"] == "identity-bound"
    assert Identity().register(thief, user)["code"] == "bad-signature"
    assert watcher.call({"type": "discover", "userId": user})["publicKey"] == alice.public
    # The owner gets it back.
    assert alice.register(clients(), user)["type"] == "registered"


def test_bad_signatures_and_reused_nonces_are_refused(clients, uid):
    alice, user = Identity(), uid("alice")
    c = clients()
    forged = c.call({"type": "register", "userId": user, "publicKey": alice.public,
                     "signature": Identity().sign(identity.register_payload(c.nonce, user))})
    assert forged["code"] == "bad-signature"
    used = c.nonce
    assert alice.register(c, user)["type"] == "registered"
    # A signature over a nonce already used (or another connection's) never verifies.
    other = clients()
    assert alice.register(other, user, nonce=used)["code"] == "bad-signature"
    malformed = other.call({"type": "register", "userId": user, "publicKey": "AAAA",
                            "signature": "AAAA"})
    assert malformed["code"] == "invalid-message"


def test_signed_takeover_replaces_the_old_session(clients, uid):
    alice, user, peer_id = Identity(), uid("alice"), uid("peer")
    old, peer = clients(), clients()
    alice.register(old, user)
    peer.register(peer_id)
    new = clients()
    assert alice.register(new, user)["type"] == "registered"
    assert old.recv() == {"type": "session-replaced"}
    with pytest.raises(ConnectionClosed) as info:
        old.recv()
    assert info.value.rcvd.code == 4000
    # The old socket's close removed nothing: the new session gets every message.
    time.sleep(0.2)
    for n in range(5):
        peer.send({"type": "offer", "to": user, "offer": {"n": n}})
    assert [new.recv()["offer"]["n"] for _ in range(5)] == list(range(5))
    assert peer.call({"type": "discover", "userId": user})["online"] is True


def test_takeover_needs_the_holders_key(clients, uid):
    user = uid("alice")
    holder = clients()
    holder.register(user)  # unsigned, key cHVibGljLWtleQ==
    mallory = clients()
    assert Identity().register(mallory, user)["code"] == "user-id-taken"
    holder.send({"type": "ping"})
    assert holder.recv() == {"type": "pong"}


def test_require_signature(make_server):
    srv = make_server({"VOLLI_REQUIRE_SIGNATURE": "1"})
    c = Client(srv.url)
    try:
        reply = c.call({"type": "register", "userId": "plain@volli.app", "publicKey": "AAAA"})
        assert reply["code"] == "signature-required"
        assert Identity().register(c, "signed@volli.app")["type"] == "registered"
    finally:
        c.close()


def test_rotate_key(clients, uid):
    alice, successor, user = Identity(), Identity(), uid("alice")
    c, watcher = clients(), clients()
    alice.register(c, user)
    watcher.register(uid("w"))
    rotate = {"type": "rotate-key", "newPublicKey": successor.public}
    forged = c.call({**rotate, "signature": successor.sign(
        identity.rotate_payload(c.nonce, user, successor.public))})
    assert forged["code"] == "bad-signature"
    reply = c.call({**rotate, "signature": alice.sign(
        identity.rotate_payload(c.nonce, user, successor.public))})
    assert reply["type"] == "key-rotated" and reply["publicKey"] == successor.public
    assert watcher.call({"type": "discover", "userId": user})["publicKey"] == successor.public
    c.close()
    time.sleep(0.3)
    assert alice.register(clients(), user)["code"] == "bad-signature"  # old key unbound
    assert successor.register(clients(), user)["type"] == "registered"


def test_rotate_key_needs_a_signed_registration(clients, uid):
    c = clients()
    c.register(uid("plain"))
    reply = c.call({"type": "rotate-key", "newPublicKey": Identity().public,
                    "signature": "AAAA"})
    assert reply["code"] == "signature-required"
