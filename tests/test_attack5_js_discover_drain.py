"""Attack: any user drains the JS client's discover budget with sealed offers, and the
victim then refuses genuine sealed calls (``unknown-sender``).

``VolliSignaling._openRelay`` looks the sender of every sealed **offer** up afresh
(``_peerInfo(from, true)``) once the ciphertext opens, before checking its signature.
Anyone can seal to a published encryption key, so an unsigned attacker sends 190 sealed
offers (within the default message burst); each costs the victim one ``discover`` and the
server allows 120 a minute (VOLLI_DISCOVER_PER_MINUTE, the default kept here). With the
bucket empty, the next genuine sealed offer from a verified caller is refused as
``unknown-sender`` (the failed discover is turned into "no key", even though nothing about
the caller is wrong). Two offers a second keep the bucket empty for good.

Fixed behaviour: a sender the client already found to have no verified key (or a failed
lookup) does not cost a discover per message, and genuine calls keep working.
"""

from __future__ import annotations

import base64
import time

import pytest
from nacl.signing import SigningKey

from conftest import Client, Server
from signing import signed_client
from test_browser import WAIT_MS, browser, open_page  # noqa: F401 (fixtures)
from volli.protocol import sealing

pytestmark = pytest.mark.timeout(120)
FLOOD = 190  # > 120, the default discover budget (plus its refill meanwhile); < 200, the
# default message burst
OFFER = {"type": "offer", "sdp": "v=0\r\n"}

SETUP = """
async ({url, userId}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId, keyPair: await m.generateKeyPair(),
                                         pingInterval: 0, reconnect: false});
  window.got = [];
  sig.on("offer", (d) => window.got.push({event: "offer", from: d.from, sealed: d.sealed}));
  sig.on("sealed-error", (d) => window.got.push({event: "sealed-error", from: d.from,
                                                 reason: d.reason}));
  window.msgs = {};
  sig.on("message", (d) => { const k = d.type + ":" + (d.limit ?? ""); window.msgs[k] = (window.msgs[k] ?? 0) + 1; });
  window.sig = sig;
  await Promise.race([sig.connect(), new Promise((_, reject) =>
    setTimeout(() => reject(new Error("connect timed out")), 10000))]);
  return sig.state;
}
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {"VOLLI_DISCOVER_PER_MINUTE": "120", "VOLLI_RATE_MESSAGES": "50",
           "VOLLI_RATE_BURST": "200"}
    server = Server(tmp_path_factory.mktemp("attack5-js-drain"), env).wait_ready()
    yield server
    server.stop()


def test_sealed_offer_flood_does_not_stop_a_genuine_sealed_call(srv, open_page, uid):
    victim_id, attacker_id, caller_id = uid("victim"), uid("attacker"), uid("caller")
    page = open_page(f"http://127.0.0.1:{srv.port}/health", "victim")
    assert page.evaluate(SETUP, {"url": srv.url, "userId": victim_id}) == "registered"

    attacker = Client(srv.url)
    caller_key = SigningKey.generate()
    caller = signed_client(srv.url, caller_id, bytes(caller_key))
    try:
        attacker.register(attacker_id)  # unsigned: it never gets a verified key
        found = attacker.call({"type": "discover", "userId": victim_id})
        victim_key = base64.b64decode(found["encryptionKey"])
        junk_signer = SigningKey.generate()
        for _ in range(FLOOD):
            sealed = sealing.seal("offer", attacker_id, victim_id, OFFER, victim_key,
                                  junk_signer, int(time.time() * 1000))
            attacker.send({"type": "offer", "to": victim_id, "sealed": sealed})
        page.wait_for_function(f"window.got.length >= {FLOOD}", timeout=WAIT_MS)
        refused = page.evaluate("window.got")
        assert all(g["from"] == attacker_id and g["event"] == "sealed-error"
                   for g in refused), refused[:3]

        # A genuine, verified caller now seals an offer to the victim.
        sealed = sealing.seal("offer", caller_id, victim_id, OFFER, victim_key, caller_key,
                              int(time.time() * 1000))
        caller.send({"type": "offer", "to": victim_id, "sealed": sealed})
        page.wait_for_function(f"window.got.length > {FLOOD}", timeout=WAIT_MS)
        last = page.evaluate("window.got")[-1]
        assert last == {"event": "offer", "from": caller_id, "sealed": True}, (
            f"a genuine sealed offer was refused after {FLOOD} sealed offers from an "
            f"unsigned user: {last}; the victim got {page.evaluate('window.msgs')}")
    finally:
        attacker.close()
        caller.close()
