"""Bug: sealing grows a relay by about half, so an offer the server takes in clear gets
the *sender* disconnected (close 1009) when the Python client seals it.

The server caps incoming messages at VOLLI_MAX_MESSAGE_SIZE (65536 characters by
default) and closes a connection that sends a bigger one with 1009. A sealed payload is
the SDP's JSON escaped twice (body inside the plaintext JSON: every CRLF becomes six
characters) and then base64 (4/3). ``VolliClient._relay`` seals and sends whatever comes
out: a 50 KB SDP (a call with many transceivers; about 52 KB as a relay) relays fine in clear, but sealed it passes
the cap, and the caller loses its whole signaling connection (its registration, its other
calls), with no error saying why.

Fixed behaviour: the sender keeps its connection: the sealed offer goes through, or
``send_offer`` refuses it with a clear error before sending.
"""

from __future__ import annotations

import asyncio

import pytest
from nacl.signing import SigningKey

from conftest import Server
from volli.client import VolliClient

pytestmark = pytest.mark.timeout(60)
OPTIONS = {"open_timeout": 5, "proxy": None}


def _sdp(size: int) -> str:
    lines = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    n = 0
    while sum(len(line) + 2 for line in lines) < size:
        lines.append(f"a=ssrc:{1000 + n} msid:stream-{n} track-{n}-0123456789abcdef")
        n += 1
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("attack5-size")).wait_ready()
    yield server
    server.stop()


def test_an_offer_that_relays_in_clear_does_not_disconnect_its_sealing_sender(srv, uid):
    caller_id, callee_id = uid("caller"), uid("callee")
    offer = {"type": "offer", "sdp": _sdp(50_000)}

    async def scenario():
        async with VolliClient(srv.url, callee_id, SigningKey.generate(), **OPTIONS) as callee:
            # In clear (seal="never") the offer is relayed.
            async with VolliClient(srv.url, uid("plain"), SigningKey.generate(), seal="never",
                                   **OPTIONS) as plain:
                await plain.send_offer(callee_id, offer)
                got = await callee.recv(timeout=5)
                assert got["offer"] == offer and got["sealed"] is False
            async with VolliClient(srv.url, caller_id, SigningKey.generate(),
                                   **OPTIONS) as caller:
                refused = None
                try:
                    await caller.send_offer(callee_id, offer)
                except Exception as exc:  # a clear refusal before sending is fine too
                    refused = exc
                if refused is None:
                    try:
                        got = await callee.recv(timeout=5)
                    except asyncio.TimeoutError:
                        got = None
                    await asyncio.sleep(0.5)
                    assert caller.close_code is None, (
                        f"the server closed the sealing sender with {caller.close_code} "
                        "for an offer it relays in clear")
                    assert got is not None and got["offer"] == offer and got["sealed"] is True
                else:
                    assert caller.close_code is None, refused

    asyncio.run(asyncio.wait_for(scenario(), 30))
