"""Bug: the Python client answers a returning peer sealed to that peer's *old* encryption
key, so the callee's answer never opens and the call fails.

``VolliClient._relay`` discovers only before an offer (or for an unknown peer); answers
and candidates use the cached ``PeerKeys``. ``_opened`` does not refresh the cache when a
sealed offer opens with the cached identity key. A ``VolliClient`` makes a fresh X25519
key per instance by default, so every restart of a peer publishes a new encryption key.

Scenario: alice called bob once (her cache holds bob's key E1). bob restarts (same
identity key, new encryption key E2) and calls alice. alice opens the offer (the identity
key is unchanged) and answers sealed to E1: bob gets ``does-not-open`` and never the
answer. docs/protocol.md 5e promises "a peer that registered again with a new encryption
key is sealed to with the new one"; the JS client looks the sender of each sealed offer up
afresh and is not affected.

Fixed behaviour: bob receives alice's answer, sealed, and it opens.
"""

from __future__ import annotations

import asyncio

import pytest
from nacl.signing import SigningKey

from conftest import Server
from volli.client import VolliClient

pytestmark = pytest.mark.timeout(60)
OPTIONS = {"open_timeout": 5, "proxy": None}
OFFER = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
ANSWER = {"type": "answer", "sdp": "v=0\r\no=- 2 1 IN IP4 127.0.0.1\r\n"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("attack5-stale")).wait_ready()
    yield server
    server.stop()


def test_answer_to_a_restarted_caller_is_sealed_to_its_current_key(srv, uid):
    alice_id, bob_id = uid("alice"), uid("bob")
    bob_identity = SigningKey.generate()

    async def scenario():
        async with VolliClient(srv.url, alice_id, SigningKey.generate(), **OPTIONS) as alice:
            # A first call: alice -> bob (alice remembers bob's keys).
            async with VolliClient(srv.url, bob_id, bob_identity, **OPTIONS) as bob:
                await alice.send_offer(bob_id, OFFER)
                got = await bob.recv(timeout=5)
                assert got["type"] == "offer" and got["sealed"] is True, got
            # bob comes back (a restart: same identity, a new encryption key) and calls.
            async with VolliClient(srv.url, bob_id, bob_identity, **OPTIONS) as bob:
                await bob.send_offer(alice_id, OFFER)
                got = await alice.recv(timeout=5)
                assert got["type"] == "offer" and got["sealed"] is True, got
                await alice.send_answer(bob_id, ANSWER)
                answer = await bob.recv(timeout=5)
                assert answer.get("type") == "answer" and answer.get("sealed") is True, (
                    f"alice's answer did not open at the restarted bob: {answer}")
                assert answer["answer"] == ANSWER

    asyncio.run(asyncio.wait_for(scenario(), 30))
