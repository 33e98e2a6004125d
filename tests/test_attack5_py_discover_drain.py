"""Attack: any user drains a Python client's discover budget with junk sealed relays,
and the victim can then neither receive nor place sealed calls.

``VolliClient._opened`` discovers the sender of every sealed relay whose cached entry has
no identity key, *before* trying to open it. An unsigned sender never gets one, so each
sealed relay from it costs the victim one ``discover``; the server allows a connection 120
a minute (VOLLI_DISCOVER_PER_MINUTE, the default kept here). The attacker needs no key and
no valid ciphertext: ``sealed`` only has to have the right shape. 190 such relays (within
the default message burst) leave the victim's discover bucket empty, so for the next
minute:

- a genuine sealed offer from a new caller is refused as ``unknown-sender``;
- the victim's own ``send_offer`` (which discovers first) raises ``rate-limited``.

Fixed behaviour: junk from a sender the client already found unverifiable (or relays that
do not even open) does not cost a discover each, so genuine calls keep working.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from nacl.signing import SigningKey

from conftest import Client, Server
from volli.client import VolliClient

pytestmark = pytest.mark.timeout(90)
OPTIONS = {"open_timeout": 5, "proxy": None}
OFFER = {"type": "offer", "sdp": "v=0\r\n"}
FLOOD = 190  # > 120, the default discover budget (plus its refill meanwhile); < 200, the
# default message burst


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # Default discover and message limits (conftest makes them permissive otherwise).
    env = {"VOLLI_DISCOVER_PER_MINUTE": "120", "VOLLI_RATE_MESSAGES": "50",
           "VOLLI_RATE_BURST": "200"}
    server = Server(tmp_path_factory.mktemp("attack5-drain"), env).wait_ready()
    yield server
    server.stop()


def _junk(to: str) -> dict:
    return {"type": "ice-candidate", "to": to,
            "sealed": {"enc": base64.b64encode(os.urandom(32)).decode(),
                       "ct": base64.b64encode(os.urandom(48)).decode()}}


async def _flood(srv: Server, attacker_id: str, victim: VolliClient) -> None:
    """An unsigned attacker sends FLOOD junk sealed relays; wait until the victim has
    reported every one."""
    raw = Client(srv.url)
    try:
        raw.register(attacker_id)
        for _ in range(FLOOD):
            raw.send(_junk(victim.user_id))
        for n in range(FLOOD):
            got = await victim.recv(timeout=10)
            assert got["type"] == "sealed-error" and got["from"] == attacker_id, (n, got)
    finally:
        raw.close()


def test_junk_sealed_relays_do_not_stop_a_genuine_sealed_call(srv, uid):
    victim_id, attacker_id, caller_id = uid("victim"), uid("attacker"), uid("caller")

    async def scenario():
        async with VolliClient(srv.url, victim_id, SigningKey.generate(), **OPTIONS) as victim, \
                VolliClient(srv.url, caller_id, SigningKey.generate(), **OPTIONS) as caller:
            await _flood(srv, attacker_id, victim)
            await caller.send_offer(victim_id, OFFER)
            got = await victim.recv(timeout=10)
            assert got.get("type") == "offer" and got.get("sealed") is True, (
                f"a genuine sealed offer from {caller_id} was not delivered after "
                f"{FLOOD} junk relays from another user: {got}")

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_junk_sealed_relays_do_not_stop_the_victim_calling_out(srv, uid):
    victim_id, attacker_id, callee_id = uid("victim"), uid("attacker"), uid("callee")

    async def scenario():
        async with VolliClient(srv.url, victim_id, SigningKey.generate(), **OPTIONS) as victim, \
                VolliClient(srv.url, callee_id, SigningKey.generate(), **OPTIONS) as callee:
            await _flood(srv, attacker_id, victim)
            await victim.send_offer(callee_id, OFFER)  # rate-limited today
            got = await callee.recv(timeout=10)
            assert got.get("type") == "offer" and got.get("sealed") is True, got

    asyncio.run(asyncio.wait_for(scenario(), 60))
