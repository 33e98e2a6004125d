"""The Python client's sealed signaling (docs/client-python.md) against a real server:
it publishes a key, seals on its own, opens what it gets, and reports (never delivers) what
does not open or verify. Raw socket peers (test_sealed_server.Peer) stand in for a server
that lies or replays."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from nacl.signing import SigningKey

from conftest import Client, Server
from test_sealed_server import Peer
from volli.client import VolliClient, VolliError
from volli.protocol import sealing

OPTIONS = {"open_timeout": 5, "proxy": None}
OFFER = {"type": "offer", "sdp": "v=0\r\na=fingerprint:sha-256 AB:CD\r\n"}


@pytest.fixture(scope="module")
def volli_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sealed-client")).wait_ready()  # memory backend
    yield srv
    srv.stop()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def client(srv: Server, user_id: str, **options) -> VolliClient:
    return VolliClient(srv.url, user_id, SigningKey.generate(), **OPTIONS, **options)


def test_two_clients_seal_and_open_on_their_own(volli_server, uid):
    alice_id, bob_id = uid("alice"), uid("bob")
    raw = Peer(Client(volli_server.url), uid("watcher"))

    async def scenario():
        async with client(volli_server, alice_id) as alice, \
                client(volli_server, bob_id) as bob:
            found = await alice.discover(bob_id)
            assert found["verified"] and found["encryptionKey"]
            await alice.send_offer(bob_id, OFFER, callId="c1")
            got = await bob.recv(timeout=5)
            assert got == {"type": "offer", "to": bob_id, "offer": OFFER, "callId": "c1",
                           "from": alice_id, "sealed": True}
            await bob.send_answer(alice_id, {"type": "answer", "sdp": "v=0"})
            await bob.send_candidate(alice_id, None)
            answer, end = await alice.recv(timeout=5), await alice.recv(timeout=5)
            assert (answer["answer"], answer["sealed"]) == ({"type": "answer", "sdp": "v=0"},
                                                            True)
            assert (end["type"], end["candidate"], end["sealed"]) == ("ice-candidate", None,
                                                                     True)
            # What crossed the server, as a raw receiver sees it: no SDP in clear.
            await asyncio.to_thread(raw.register)
            await alice.send_offer(raw.user_id, OFFER)
            wire = await asyncio.to_thread(raw.client.recv)
            assert "offer" not in wire and "v=0" not in str(wire)
            assert raw.open(wire, _peer_of(alice)) == OFFER
    try:
        run(scenario())
    finally:
        raw.client.close()


def _peer_of(volli: VolliClient) -> Peer:
    """A Peer shell holding ``volli``'s identity key (to check its seals)."""
    shell = Peer.__new__(Peer)
    shell.seed, shell.user_id = volli.signing_key, volli.user_id
    return shell


def test_plaintext_peers_still_work_and_always_refuses_them(volli_server, uid):
    alice_id, plain_id, strict_id = uid("alice"), uid("plain"), uid("strict")

    async def scenario():
        async with client(volli_server, alice_id) as alice, \
                VolliClient(volli_server.url, plain_id, public_key="cGxhaW4=",
                            **OPTIONS) as plain, \
                client(volli_server, strict_id, seal="always") as strict:
            # An unsigned peer publishes nothing: alice falls back to plaintext...
            await alice.send_offer(plain_id, OFFER)
            got = await plain.recv(timeout=5)
            assert (got["offer"], got["sealed"]) == (OFFER, False)
            # ... a strict client refuses to send in clear, and sends nothing.
            with pytest.raises(VolliError) as refused:
                await strict.send_offer(plain_id, OFFER)
            assert refused.value.code == "no-encryption-key"
            # ... and refuses what arrives in clear, without delivering it.
            await plain.send_offer(strict_id, OFFER)
            got = await strict.recv(timeout=5)
            assert got == {"type": "sealed-error", "reason": "not-sealed", "from": plain_id,
                           "messageType": "offer"}
            await asyncio.sleep(0.3)
            with pytest.raises(asyncio.TimeoutError):
                await plain.recv(timeout=0.3)  # strict's refusal sent nothing
    run(scenario())


def test_a_replayed_a_relabelled_and_a_forged_seal_are_reported_not_delivered(
        volli_server, uid):
    mallory = Peer(Client(volli_server.url), uid("mallory"))
    alice = Peer(Client(volli_server.url), uid("alice"))
    bob_id = uid("bob")

    async def scenario():
        async with client(volli_server, bob_id) as bob:
            alice.register()
            mallory.register()
            await asyncio.to_thread(alice.client.call, {"type": "discover", "userId": bob_id})
            target = Peer.__new__(Peer)
            target.user_id = bob_id
            target.enc_key = sealing.b64(bob.encryption_key.public_key().public_bytes_raw())
            sealed = alice.seal("offer", target, OFFER)
            alice.client.send({"type": "offer", "to": bob_id, "sealed": sealed})
            first = await bob.recv(timeout=5)
            assert (first["offer"], first["sealed"]) == (OFFER, True)
            alice.client.send({"type": "offer", "to": bob_id, "sealed": sealed})  # replayed
            # mallory passes alice's seal off as its own: sealed for another sender
            mallory.client.send({"type": "offer", "to": bob_id, "sealed": sealed})
            # mallory seals to bob's key in alice's name, but cannot sign as alice
            forged = sealing.seal("offer", mallory.user_id, bob_id, OFFER,
                                  base64.b64decode(target.enc_key), SigningKey.generate(),
                                  int(time.time() * 1000))
            mallory.client.send({"type": "offer", "to": bob_id, "sealed": forged})
            got = [await bob.recv(timeout=5) for _ in range(3)]  # two senders: any order
            assert sorted((m["from"], m["reason"]) for m in got) == sorted([
                (alice.user_id, "replayed"), (mallory.user_id, "does-not-open"),
                (mallory.user_id, "bad-signature")])
    try:
        run(scenario())
    finally:
        mallory.client.close()
        alice.client.close()


def test_a_rotated_identity_key_republishes_the_encryption_key(volli_server, uid):
    alice_id, bob_id = uid("alice"), uid("bob")

    async def scenario():
        async with client(volli_server, alice_id) as alice, \
                client(volli_server, bob_id) as bob:
            await bob.rotate_key(SigningKey.generate())
            found = await alice.discover(bob_id)
            assert found["publicKey"] == bob.public_key and found["encryptionKey"]
            await alice.send_offer(bob_id, OFFER)
            got = await bob.recv(timeout=5)
            assert (got["offer"], got["sealed"]) == (OFFER, True)
    run(scenario())


def test_a_substituted_key_is_detected_and_never_sealed_to(volli_server, uid):
    """A man in the middle (a real proxy in front of alice) rewrites what discover
    answers: another encryption key (not signed by bob's identity key), or bob's identity
    key too (signed by the attacker's own key): only a pin catches the second."""
    from signaling_mitm import Mitm, rewrite_json
    alice_id, bob_id = uid("alice"), uid("bob")
    attacker, attacker_enc = SigningKey.generate(), sealing.b64(bytes(range(1, 33)))
    alice_key = SigningKey.generate()
    mode = {"swap": "encryption"}

    def swap(msg: dict) -> dict:
        if msg.get("type") == "discover-response" and msg.get("userId") == bob_id:
            msg["encryptionKey"] = attacker_enc
            if mode["swap"] == "identity":
                msg["publicKey"] = sealing.b64(bytes(attacker.verify_key))
                msg["encryptionKeySignature"] = sealing.b64(attacker.sign(
                    f"volli/encryption-key/v1\n{bob_id}\n{attacker_enc}".encode()).signature)
        return msg

    async def scenario(proxy_url: str):
        async with client(volli_server, bob_id) as bob:
            bob_key = bob.public_key
            async with VolliClient(proxy_url, alice_id, alice_key, seal="always",
                                   **OPTIONS) as alice:
                with pytest.raises(VolliError) as refused:
                    await alice.send_offer(bob_id, OFFER)
                assert refused.value.code == "no-encryption-key"
                assert (await alice.recv(timeout=5)) == {
                    "type": "key-mismatch", "reason": "bad-encryption-key-signature",
                    "userId": bob_id}
            mode["swap"] = "identity"  # now a self-consistent forgery: signatures verify
            async with VolliClient(proxy_url, alice_id, alice_key,
                                   pinned_keys={bob_id: bob_key}, **OPTIONS) as alice:
                await alice.send_offer(bob_id, OFFER)  # "auto": in clear, never to the fake
                assert (await alice.recv(timeout=5))["reason"] == "pinned-key"
                got = await bob.recv(timeout=5)
                assert (got["offer"], got["sealed"]) == (OFFER, False)
            async with VolliClient(proxy_url, alice_id, alice_key,
                                   **OPTIONS) as alice:  # no pin: the forgery is believed
                await alice.send_offer(bob_id, OFFER)
                got = await bob.recv(timeout=5)
                assert got["type"] == "sealed-error" and got["reason"] == "does-not-open"

    with Mitm(volli_server.url, to_client=rewrite_json(swap)) as proxy:
        run(scenario(proxy.url))
