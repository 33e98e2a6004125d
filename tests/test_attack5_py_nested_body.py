"""Attack: one sealed relay whose opened plaintext is deeply nested JSON kills the Python
client's dispatcher.

``VolliClient._run_handlers`` calls ``_opened`` outside its try block, and
``sealing.open_`` catches only ValueError/KeyError/TypeError around ``json.loads``. Python's
json raises RecursionError (a RuntimeError) on deep nesting, and the plaintext is parsed
*before* the signature is checked. Anyone can HPKE-seal to a published encryption key, so
any user with a signed registration (or a malicious server) sends one such relay: the
dispatcher task dies and the victim never receives another relay, presence or event.

Fixed behaviour: the bad relay is reported (a ``sealed-error``, reason ``malformed``) and
later messages keep arriving.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from nacl.signing import SigningKey

from conftest import Client, Server
from signing import Identity
from volli.client import VolliClient
from volli.protocol import hpke, sealing

pytestmark = pytest.mark.timeout(60)
OPTIONS = {"open_timeout": 5, "proxy": None}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("attack5-nested")).wait_ready()
    yield server
    server.stop()


def _attacker(srv: Server, user_id: str) -> Client:
    raw = Client(srv.url)
    reply = Identity().register(raw, user_id)
    assert reply["type"] == "registered", reply
    return raw


def _sealed(kind: str, sender: str, to: str, plaintext: bytes, encryption_key: str) -> dict:
    enc, ct = hpke.seal(base64.b64decode(encryption_key), sealing.INFO,
                        sealing.aad(kind, sender, to), plaintext)
    return {"enc": sealing.b64(enc), "ct": sealing.b64(ct)}


async def _next(victim: VolliClient) -> dict:
    try:
        return await victim.recv(timeout=5)
    except asyncio.TimeoutError:
        dispatcher = victim._tasks[1]
        died = dispatcher.exception() if dispatcher.done() else None
        pytest.fail(f"nothing delivered within 5 s; the dispatcher task died: {died!r}")


@pytest.mark.parametrize("where", ["plaintext", "body"])
def test_deeply_nested_sealed_relay_does_not_kill_the_dispatcher(srv, uid, where):
    victim_id, attacker_id = uid("victim"), uid("attacker")
    attacker = _attacker(srv, attacker_id)
    depth = 20_000
    nested = "[" * depth + "]" * depth
    if where == "plaintext":
        plaintext = nested.encode()
    else:  # a well-formed envelope; body is nested (the signature does not matter: it is
        # never reached)
        plaintext = json.dumps({"body": nested, "ts": int(time.time() * 1000),
                                "sig": base64.b64encode(bytes(64)).decode()}).encode()

    async def scenario():
        async with VolliClient(srv.url, victim_id, SigningKey.generate(), **OPTIONS) as victim:
            found = await asyncio.to_thread(
                attacker.call, {"type": "discover", "userId": victim_id})
            key = found["encryptionKey"]
            bomb = {"type": "offer", "to": victim_id,
                    "sealed": _sealed("offer", attacker_id, victim_id, plaintext, key)}
            await asyncio.to_thread(attacker.send, bomb)
            first = await _next(victim)
            assert first["type"] == "sealed-error", first
            # The next message, a plain one, must still be delivered.
            await asyncio.to_thread(attacker.send, {
                "type": "offer", "to": victim_id, "offer": {"type": "offer", "sdp": "v=0"}})
            second = await _next(victim)
            assert second["type"] == "offer" and second["sealed"] is False, second

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        attacker.close()
