"""The JS client's sealed signaling, after the attack5 review (docs/client-js.md
"Sealed signaling"), in headless Chromium against a real server:

- what is known of users is capped (4096, the oldest out);
- a message larger than the server's `maxMessageSize` (from `hello`) is never sent: the
  relay fails with `message-too-large` (sealed or in clear; UTF-8 bytes counted), a
  request rejects, `send()` throws, and the connection stays open;
- odd `discover-response`s (about another user, a `publicKey` that is not a string, a
  lookup that throws) end as `sealed-error` `unknown-sender`, and the sender's later
  relays are still delivered in order;
- a received offer looks its sender up again only once what is known is 30 s old, and
  every answer looks the peer up, so it is sealed to a restarted peer's new encryption key.
"""

from __future__ import annotations

import base64
import time

import pytest
from nacl.signing import SigningKey

from conftest import Client, Server
from test_browser import WAIT_MS, browser, open_page  # noqa: F401 (fixtures)
from volli.protocol import hpke, identity, sealing

pytestmark = pytest.mark.timeout(120)
MAX = 4096
OFFER = {"type": "offer", "sdp": "v=0\r\n"}

SETUP = """
async ({url, userId, signed}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId, keyPair: signed ? await m.generateKeyPair() : null,
                                         pingInterval: 0, reconnect: false});
  window.got = [];
  for (const type of ["offer", "answer", "ice-candidate", "sealed-error", "error", "sent"]) {
    sig.on(type, (d) => window.got.push({event: type, from: d.from ?? null, sealed: d.sealed ?? null,
      reason: d.reason ?? d.code ?? null, requestId: d.requestId ?? null,
      request: d.request ?? null}));
  }
  window.discovers = 0;
  sig.on("message", (d) => { if (d.type === "discover-response") window.discovers += 1; });
  window.sig = sig;
  await Promise.race([sig.connect(), new Promise((_, reject) =>
    setTimeout(() => reject(new Error("connect timed out")), 10000))]);
  return sig.state;
}
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("sealed-js-fixes"),
                    {"VOLLI_MAX_MESSAGE_SIZE": str(MAX)}).wait_ready()
    yield server
    server.stop()


class Sender:
    """A signed Python user publishing an encryption key."""

    def __init__(self, srv: Server, user_id: str, key: SigningKey | None = None) -> None:
        self.user_id, self.key = user_id, key or SigningKey.generate()
        self.encryption = hpke.derive_key_pair(SigningKey.generate().encode())
        self.client = Client(srv.url)
        enc_key = sealing.b64(hpke.public_bytes(self.encryption))
        signature = self.key.sign(identity.register_payload(self.client.nonce, user_id)).signature
        reply = self.client.call({
            "type": "register", "userId": user_id,
            "publicKey": base64.b64encode(bytes(self.key.verify_key)).decode(),
            "signature": base64.b64encode(signature).decode(),
            "encryptionKey": enc_key,
            "encryptionKeySignature": base64.b64encode(self.key.sign(
                identity.encryption_key_payload(user_id, enc_key)).signature).decode()})
        assert reply["type"] == "registered", reply

    def seal_to(self, to: str, kind: str, payload) -> None:
        found = self.client.call({"type": "discover", "userId": to})
        sealed = sealing.seal(kind, self.user_id, to, payload,
                              base64.b64decode(found["encryptionKey"]), self.key,
                              int(time.time() * 1000))
        self.client.send({"type": kind, "to": to, "sealed": sealed})

    def close(self) -> None:
        self.client.close()


def setup(page, srv, user_id, signed=True):
    assert page.evaluate(SETUP, {"url": srv.url, "userId": user_id, "signed": signed}) == "registered"


def test_known_peers_are_capped(srv, open_page, uid):
    page = open_page(f"http://127.0.0.1:{srv.port}/health", "cap")
    setup(page, srv, uid("cap"))
    size, first, last = page.evaluate("""async () => {
      for (let i = 0; i < 4100; i++) {
        await window.sig._notePeer(`u${i}`, {type: "discover-response", userId: `u${i}`, verified: false});
      }
      return [window.sig._peers.size, window.sig._peers.has("u0"), window.sig._peers.has("u4099")];
    }""")
    assert (size, first, last) == (4096, False, True)


def test_a_message_larger_than_max_message_size_is_not_sent(srv, open_page, uid):
    alice_id, bob_id, carol_id = uid("alice"), uid("bob"), uid("carol")
    base = f"http://127.0.0.1:{srv.port}/health"
    alice, bob, carol = open_page(base, "alice"), open_page(base, "bob"), open_page(base, "carol")
    setup(alice, srv, alice_id)
    setup(bob, srv, bob_id)
    setup(carol, srv, carol_id, signed=False)
    assert alice.evaluate("window.sig.maxMessageSize") == MAX
    # Sealed: the plaintext would fit (3000 characters), the sealed relay does not.
    r = alice.evaluate("""async ({bob}) => {
      const id = window.sig.sendOffer(bob, {type: "offer", sdp: "v=0\\r\\n" + "a".repeat(3000)});
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const small = window.sig.sendOffer(bob, {type: "offer", sdp: "v=0\\r\\n"});
      return {id, small};
    }""", {"bob": bob_id})
    bob.wait_for_function("window.got.some((g) => g.event === 'offer')", timeout=WAIT_MS)
    got = alice.evaluate("window.got")
    refused = [g for g in got if g["event"] == "error"]
    assert refused == [{"event": "error", "from": None, "sealed": None, "reason": "message-too-large",
                        "requestId": r["id"], "request": {"type": "offer", "to": bob_id}}], got
    assert [g["requestId"] for g in got if g["event"] == "sent"] == [r["small"]]
    assert [g for g in bob.evaluate("window.got") if g["event"] == "offer"] == [
        {"event": "offer", "from": alice_id, "sealed": True, "reason": None, "requestId": r["small"],
         "request": None}]
    # In clear, counted in UTF-8 bytes: 2500 "é" are 2500 characters but 5000 bytes.
    r = carol.evaluate("""async ({bob}) => {
      const id = window.sig.sendOffer(bob, {type: "offer", sdp: "é".repeat(2500)});
      let threw = null;
      try { window.sig.send({type: "ping", pad: "x".repeat(5000)}); } catch (err) { threw = err.code; }
      const rejected = await window.sig.request({type: "ping", pad: "x".repeat(5000)})
        .then(() => null, (err) => err.code);
      await new Promise((resolve) => setTimeout(resolve, 200));
      return {id, threw, rejected, rtt: await window.sig.ping(), state: window.sig.state};
    }""", {"bob": bob_id})
    assert (r["threw"], r["rejected"], r["state"]) == (
        "message-too-large", "message-too-large", "registered"), r
    errors = [g for g in carol.evaluate("window.got") if g["event"] == "error"]
    assert [(g["reason"], g["requestId"]) for g in errors] == [("message-too-large", r["id"])]


ODD_DISCOVER = """
async ({mode}) => {
  const sig = window.sig, request = sig.request.bind(sig);
  sig.request = async (message, timeout) => {
    if (message.type !== "discover") return request(message, timeout);
    const reply = await request(message, timeout);
    if (mode === "other-user") return {...reply, userId: "someone-else"};
    if (mode === "key-not-string") return {...reply, publicKey: {length: 32}};
    if (mode === "null") return null;
    throw new TypeError("boom");
  };
}
"""


@pytest.mark.parametrize("mode", ["other-user", "key-not-string", "null", "throws"])
def test_odd_discover_responses_end_as_sealed_errors(srv, open_page, uid, mode):
    victim_id = uid("victim")
    page = open_page(f"http://127.0.0.1:{srv.port}/health", "victim")
    setup(page, srv, victim_id)
    page.evaluate(ODD_DISCOVER, {"mode": mode})
    sender = Sender(srv, uid("sender"))
    try:
        sender.seal_to(victim_id, "offer", OFFER)
        for i in range(3):
            sender.client.send({"type": "ice-candidate", "to": victim_id,
                                "candidate": {"candidate": f"c{i}"}})
        page.wait_for_function("window.got.length >= 4", timeout=WAIT_MS)
        got = page.evaluate("window.got")
        assert [(g["event"], g["reason"], g["sealed"]) for g in got] == [
            ("sealed-error", "unknown-sender", None)] + [("ice-candidate", None, False)] * 3, got
        assert page.evaluate("(id) => window.sig._peers.get(id)?.identityKey ?? null",
                             sender.user_id) is None
        # A reply about another user is not taken as that user's keys either.
        assert page.evaluate("window.sig._peers.has('someone-else')") is False
    finally:
        sender.close()


def test_received_offers_look_up_their_sender_once_and_answers_seal_to_the_newest_key(
        srv, open_page, uid):
    victim_id, peer_id = uid("victim"), uid("peer")
    page = open_page(f"http://127.0.0.1:{srv.port}/health", "victim")
    setup(page, srv, victim_id)
    page.evaluate("""() => { window.answering = true; window.sig.on("offer", (d) => {
      if (window.answering) window.sig.sendAnswer(d.from, {type: "answer", sdp: "v=0\\r\\n"});
    }); }""")
    key = SigningKey.generate()
    peer = Sender(srv, peer_id, key)

    def sent() -> int:
        return page.evaluate("window.got.filter((g) => g.event === 'sent').length")

    def opens(answer: dict) -> None:
        assert answer["type"] == "answer" and answer["from"] == victim_id, answer
        sealing.open_("answer", victim_id, peer_id, answer["sealed"], peer.encryption,
                      base64.b64decode(page.evaluate("""async () => {
                        const m = await import("/volli-signaling.js");
                        return m.exportPublicKey(window.sig.keyPair.publicKey); }""")),
                      int(time.time() * 1000))
    try:
        peer.seal_to(victim_id, "offer", OFFER)
        page.wait_for_function("window.got.filter((g) => g.event === 'sent').length >= 1",
                               timeout=WAIT_MS)
        # One lookup to attribute the offer, one before the answer (every answer has one).
        assert page.evaluate("window.discovers") == 2
        opens(peer.client.recv())
        page.evaluate("() => { window.answering = false; }")
        for _ in range(3):  # more offers within 30 s, unanswered: no lookup of their own
            peer.seal_to(victim_id, "offer", OFFER)
        page.wait_for_function("window.got.filter((g) => g.event === 'offer').length >= 4",
                               timeout=WAIT_MS)
        assert page.evaluate("window.discovers") == 2 and sent() == 1
        # The peer restarts with a new encryption key and calls again at once: the answer
        # is sealed to the new key (the answer's own lookup), the offer caused none.
        peer.close()
        peer = Sender(srv, peer_id, key)
        page.evaluate("() => { window.answering = true; }")
        peer.seal_to(victim_id, "offer", OFFER)
        opens(peer.client.recv())
        assert page.evaluate("window.discovers") == 3
    finally:
        peer.close()
