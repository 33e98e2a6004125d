"""Bug (JS client): a sealed relay's payload is delivered whatever JSON type it is, so
sealing drops the guarantee the server gives plaintext relays (an offer or answer is an
object, a candidate an object or null).

The server refuses ``"offer": null`` / ``"offer": 42`` / ``"candidate": "x"`` in clear
(``invalid-message``). ``unseal`` in volli-signaling.js delivers ``JSON.parse(body)`` with
no check, so any signed user's sealed offer can reach the app's ``offer`` handler with
``offer: null`` (``pc.setRemoteDescription(null)``...) or a candidate that is a string.
docs/protocol.md 5e defines ``body`` as "the object that would have been offer, answer or
candidate, or null for end of candidates".

Fixed behaviour: each such relay gives a ``sealed-error`` (``malformed``), never an
``offer`` / ``answer`` / ``ice-candidate`` event.
"""

from __future__ import annotations

import base64
import time

import pytest
from nacl.signing import SigningKey

from conftest import Client, Server
from test_browser import WAIT_MS, browser, open_page  # noqa: F401 (fixtures)
from volli.protocol import identity, sealing

pytestmark = pytest.mark.timeout(120)
CASES = [("offer", None), ("offer", 42), ("answer", ["v=0"]), ("ice-candidate", "x")]

SETUP = """
async ({url, userId}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId, keyPair: await m.generateKeyPair(),
                                         pingInterval: 0, reconnect: false});
  window.got = [];
  for (const type of ["offer", "answer", "ice-candidate"]) {
    sig.on(type, (d) => window.got.push({event: type, sealed: d.sealed,
      payload: JSON.stringify(d[type === "ice-candidate" ? "candidate" : type])}));
  }
  sig.on("sealed-error", (d) => window.got.push({event: "sealed-error", reason: d.reason}));
  window.sig = sig;
  await Promise.race([sig.connect(), new Promise((_, reject) =>
    setTimeout(() => reject(new Error("connect timed out")), 10000))]);
  return sig.state;
}
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("attack5-js-type")).wait_ready()
    yield server
    server.stop()


def test_sealed_payload_of_the_wrong_type_is_not_delivered(srv, open_page, uid):
    victim_id, sender_id = uid("victim"), uid("sender")
    page = open_page(f"http://127.0.0.1:{srv.port}/health", "victim")
    assert page.evaluate(SETUP, {"url": srv.url, "userId": victim_id}) == "registered"
    key = SigningKey.generate()
    sender = Client(srv.url)
    try:
        signature = key.sign(identity.register_payload(sender.nonce, sender_id)).signature
        reply = sender.call({"type": "register", "userId": sender_id,
                             "publicKey": base64.b64encode(bytes(key.verify_key)).decode(),
                             "signature": base64.b64encode(signature).decode()})
        assert reply["type"] == "registered", reply
        victim_key = base64.b64decode(
            sender.call({"type": "discover", "userId": victim_id})["encryptionKey"])
        for kind, payload in CASES:
            sealed = sealing.seal(kind, sender_id, victim_id, payload, victim_key, key,
                                  int(time.time() * 1000))
            sender.send({"type": kind, "to": victim_id, "sealed": sealed})
        page.wait_for_function(f"window.got.length >= {len(CASES)}", timeout=WAIT_MS)
        got = page.evaluate("window.got")
        delivered = [g for g in got if g["event"] != "sealed-error"]
        assert not delivered, ("sealed relays whose payload has a type the server refuses "
                               f"in clear were delivered: {delivered}")
        assert [g["reason"] for g in got] == ["malformed"] * len(CASES), got
    finally:
        sender.close()
