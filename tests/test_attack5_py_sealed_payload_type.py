"""Bug: a sealed relay's payload is delivered whatever JSON type it is, so sealing drops
the guarantee the server gives plaintext relays (an offer/answer is an object, a candidate
an object or null).

For a plaintext relay the server refuses ``"offer": null`` or ``"offer": "x"``
(``invalid-message``), and apps written against docs/protocol.md section 5 rely on it. A
sealed relay's payload is hidden from the server, and ``sealing.open_`` /
``VolliClient._opened`` deliver ``json.loads(body)`` as it is: any signed user can get
``offer: None``, ``offer: 42`` or ``candidate: "x"`` into the victim's handler, exactly the
shapes the server check exists to keep out (an app doing ``offer["sdp"]`` or
``candidate_from_dict`` then raises). protocol.md 5e defines ``body`` as "the object that
would have been offer, answer or candidate, or null for end of candidates".

Fixed behaviour: such a relay is refused as ``sealed-error`` (``malformed``), like any
other sealed relay that is not what the scheme defines.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from nacl.signing import SigningKey

from conftest import Server
from signing import signed_client
from volli.client import VolliClient
from volli.protocol import sealing

pytestmark = pytest.mark.timeout(60)
OPTIONS = {"open_timeout": 5, "proxy": None}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("attack5-type")).wait_ready()
    yield server
    server.stop()


@pytest.mark.parametrize("kind, payload", [("offer", None), ("offer", 42),
                                           ("answer", ["v=0"]), ("ice-candidate", "x")])
def test_sealed_payload_of_the_wrong_type_is_not_delivered(srv, uid, kind, payload):
    victim_id, sender_id = uid("victim"), uid("sender")
    sender_key = SigningKey.generate()
    sender = signed_client(srv.url, sender_id, bytes(sender_key))
    # The same payload in clear is refused by the server.
    field = {"offer": "offer", "answer": "answer", "ice-candidate": "candidate"}[kind]

    async def scenario():
        async with VolliClient(srv.url, victim_id, SigningKey.generate(), **OPTIONS) as victim:
            plain = await asyncio.to_thread(
                sender.call, {"type": kind, "to": victim_id, field: payload})
            assert plain["code"] == "invalid-message", plain
            found = await asyncio.to_thread(
                sender.call, {"type": "discover", "userId": victim_id})
            sealed = sealing.seal(kind, sender_id, victim_id, payload,
                                  base64.b64decode(found["encryptionKey"]), sender_key,
                                  int(time.time() * 1000))
            await asyncio.to_thread(sender.send, {"type": kind, "to": victim_id,
                                                  "sealed": sealed})
            got = await victim.recv(timeout=5)
            assert got["type"] == "sealed-error" and got["reason"] == "malformed", (
                f"a sealed {kind} whose payload is {payload!r} was delivered: {got}")

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        sender.close()
