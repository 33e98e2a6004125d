"""Sealed signaling through a real server (docs/protocol.md 5e): headless Chromium pages
running volli-signaling.js call each other through a real gunicorn Volli server, and a
real WebSocket man-in-the-middle (tests/signaling_mitm.py) plays a malicious server.

- Chromium <-> Chromium: the data channel opens, and no frame either page sent or got
  from the server holds SDP (`v=0`, `a=fingerprint`) or a candidate (`candidate:`) in
  clear; offers, answers and candidates were all relayed sealed. The same on a server
  with VOLLI_REQUIRE_SEALED=1. With an unsigned peer the SDP shows (the check can fail).
- The demo seals by default and says so.
- A substituted encryption key in discover-response is reported and never sealed to
  (seal "always": nothing goes out in clear either); a substituted identity key is
  caught by a pinned key; a sealed relay relabelled on its way is refused, a replayed one
  is delivered once.
"""

from __future__ import annotations

import base64
import json

import pytest
from nacl.signing import SigningKey
from playwright.sync_api import Page, expect

from conftest import Server
from signaling_mitm import Mitm, rewrite_json
from test_browser import (browser, connect, open_page, wait_chat_open,  # noqa: F401 (fixtures)
                          page_log, screenshot)

pytestmark = pytest.mark.timeout(180)

CLEAR_MARKERS = ("v=0", "a=fingerprint", "candidate:")


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("sealed")).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sealed_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("require-sealed"), {"VOLLI_REQUIRE_SEALED": "1"})
    yield srv.wait_ready()
    srv.stop()


def capture(page: Page) -> dict[str, list[str]]:
    """Every WebSocket text frame the page sends and receives from now on."""
    frames: dict[str, list[str]] = {"sent": [], "received": []}

    def on_ws(ws) -> None:
        ws.on("framesent", lambda payload: frames["sent"].append(
            payload if isinstance(payload, str) else payload.decode(errors="replace")))
        ws.on("framereceived", lambda payload: frames["received"].append(
            payload if isinstance(payload, str) else payload.decode(errors="replace")))
    page.on("websocket", on_ws)
    return frames


def in_clear(frames: dict[str, list[str]]) -> list[str]:
    """The frames, sent or received, that show SDP or a candidate."""
    return [f for way in ("sent", "received") for f in frames[way]
            if any(m in f for m in CLEAR_MARKERS)]


def relays(frames: list[str]) -> list[dict]:
    out = []
    for text in frames:
        msg = json.loads(text)
        if msg.get("type") in ("offer", "answer", "ice-candidate"):
            out.append(msg)
    return out


# A caller or callee on a bare page: trickle ICE through Volli, a data channel.
PEER = """
async ({url, userId, peer, caller, signed, seal}) => {
  const m = await import("/volli-signaling.js");
  const keyPair = signed ? await m.generateKeyPair() : null;
  const sig = new m.VolliSignaling(url, {userId, keyPair, seal, pingInterval: 0, reconnect: false});
  window.sig = sig;
  const got = window.got = {offer: [], answer: [], "ice-candidate": [], errors: [], sent: []};
  const pc = window.pc = new RTCPeerConnection({iceServers: []});
  const queued = [];
  const flush = async () => { for (const c of queued.splice(0)) await pc.addIceCandidate(c); };
  pc.onicecandidate = ({candidate}) => sig.sendCandidate(peer, candidate);
  sig.on("offer", async (msg) => {
    got.offer.push(msg.sealed);
    await pc.setRemoteDescription(msg.offer);
    await flush();
    await pc.setLocalDescription();
    sig.sendAnswer(peer, pc.localDescription);
  });
  sig.on("answer", async (msg) => {
    got.answer.push(msg.sealed);
    await pc.setRemoteDescription(msg.answer);
    await flush();
  });
  sig.on("ice-candidate", async (msg) => {
    got["ice-candidate"].push(msg.sealed);
    if (!msg.candidate) return;
    if (!pc.remoteDescription) queued.push(msg.candidate);
    else await pc.addIceCandidate(msg.candidate);
  });
  for (const type of ["sealed-error", "key-mismatch", "error"]) {
    sig.on(type, (e) => got.errors.push({type, reason: e.reason ?? e.code ?? null}));
  }
  sig.on("sent", (e) => got.sent.push([e.type, e.sealed]));
  window.message = new Promise((resolve) => {
    const use = (dc) => {
      window.dc = dc;
      dc.onmessage = ({data}) => resolve(data);
      dc.onopen = () => dc.send(`hello from ${userId}`);
    };
    if (caller) use(pc.createDataChannel("chat"));
    else pc.ondatachannel = ({channel}) => use(channel);
  });
  await sig.connect();
}
"""

CALL = """
async ({peer}) => {
  await window.pc.setLocalDescription();
  window.sig.sendOffer(peer, window.pc.localDescription);
}
"""


def start_call(open_page, server: Server, tag: str, *, callee_signed: bool = True,
               seal: str = "auto"):
    base = f"http://127.0.0.1:{server.port}/health"
    alice_id, bob_id = f"alice-{tag}@x", f"bob-{tag}@x"
    alice, bob = open_page(base, f"alice-{tag}"), open_page(base, f"bob-{tag}")
    frames = {"alice": capture(alice), "bob": capture(bob)}
    bob.evaluate(PEER, {"url": server.url, "userId": bob_id, "peer": alice_id, "caller": False,
                        "signed": callee_signed, "seal": seal})
    alice.evaluate(PEER, {"url": server.url, "userId": alice_id, "peer": bob_id, "caller": True,
                          "signed": True, "seal": seal})
    alice.evaluate(CALL, {"peer": bob_id})
    return alice, bob, frames


def wait_connected(alice: Page, bob: Page) -> None:
    for page, other in ((alice, "bob"), (bob, "alice")):
        got = page.evaluate("window.message")
        assert got.startswith(f"hello from {other}-"), got


@pytest.mark.parametrize("which", ["plain_server", "sealed_server"])
def test_chromium_calls_chromium_with_sealed_signaling(request, open_page, which):
    server = request.getfixturevalue(which)
    alice, bob, frames = start_call(open_page, server, which)
    wait_connected(alice, bob)
    bob.wait_for_timeout(300)  # the last candidates (end of candidates) arrive
    for name, page in (("alice", alice), ("bob", bob)):
        got = page.evaluate("window.got")
        assert got["errors"] == [], (name, got["errors"])
        assert all(sealed for kind, sealed in got["sent"]), (name, got["sent"])
        for kind in ("offer", "answer", "ice-candidate"):
            assert all(s is True for s in got[kind]), (name, kind, got[kind])
        assert not in_clear(frames[name]), (name, in_clear(frames[name])[:2])
    received = relays(frames["alice"]["received"] + frames["bob"]["received"])
    sent = relays(frames["alice"]["sent"] + frames["bob"]["sent"])
    for kind in ("offer", "answer", "ice-candidate"):
        got_kind = [m for m in received if m["type"] == kind]
        assert got_kind and all("sealed" in m and {"offer", "answer", "candidate"}.isdisjoint(m)
                                for m in got_kind), (kind, got_kind[:1])
    assert len(received) == len(sent)  # every relay sent arrived, sealed
    assert [m["type"] for m in received].count("ice-candidate") >= 2


def test_an_unsigned_peer_gets_sdp_in_clear_and_the_check_sees_it(plain_server, open_page):
    alice, bob, frames = start_call(open_page, plain_server, "unsigned", callee_signed=False)
    wait_connected(alice, bob)
    assert in_clear(frames["alice"]) and in_clear(frames["bob"])
    assert alice.evaluate("window.got.answer") == [False]
    assert bob.evaluate("window.got.offer") == [False]


def test_a_require_sealed_server_refuses_an_unsigned_peers_relays(sealed_server, open_page):
    alice, bob, frames = start_call(open_page, sealed_server, "refused", callee_signed=False)
    alice.wait_for_function("window.got.errors.length > 0")
    assert {"type": "error", "reason": "sealed-required"} in alice.evaluate("window.got.errors")
    assert not any(m["type"] == "offer" for m in relays(frames["bob"]["received"]))


def test_the_demo_seals_and_says_so(plain_server, open_page):
    base = f"http://127.0.0.1:{plain_server.port}/demo"
    alice, bob = open_page(base, "alice"), open_page(base, "bob")
    frames = {"alice": capture(alice), "bob": capture(bob)}
    connect(alice, "demo-sealed-alice@x")
    connect(bob, "demo-sealed-bob@x")
    alice.fill("#peer-id", "demo-sealed-bob@x")
    alice.click("#call")
    expect(bob.locator("#incoming-sealed")).to_have_attribute("data-state", "sealed")
    bob.click("#accept")
    wait_chat_open(alice, bob)
    for page in (alice, bob):
        sealing = page.locator("#sealing")
        expect(sealing).to_have_attribute("data-state", "sealed")
        expect(sealing).to_contain_text("Sealed end to end")
    for name in ("alice", "bob"):
        assert not in_clear(frames[name]), (name, in_clear(frames[name])[:2])
    assert "(sealed)" in page_log(bob) and "(sealed)" in page_log(alice)
    screenshot(bob, "demo-sealed-bob.png")


# ---- a malicious server (the man in the middle) ----------------------------------------

TWO_CLIENTS = """
async ({url, proxyUrl, seal, pin, tag}) => {
  const m = await import("/volli-signaling.js");
  const [aliceId, bobId] = [`mitm-alice-${tag}@x`, `mitm-bob-${tag}@x`];
  const bobKey = await m.generateKeyPair();
  const bob = new m.VolliSignaling(url, {userId: bobId, keyPair: bobKey, pingInterval: 0});
  const pinnedKeys = pin ? {[bobId]: await m.exportPublicKey(bobKey.publicKey)} : {};
  const alice = new m.VolliSignaling(proxyUrl, {userId: aliceId, pingInterval: 0, seal,
    keyPair: await m.generateKeyPair(), pinnedKeys, reconnect: false});
  window.bob = bob; window.alice = alice;
  const log = window.log = [];
  for (const [name, s] of [["alice", alice], ["bob", bob]]) {
    for (const type of ["offer", "ice-candidate", "sealed-error", "key-mismatch", "sent"]) {
      s.on(type, (e) => log.push({who: name, type, sealed: e.sealed ?? null,
                                  reason: e.reason ?? null, offer: e.offer ?? null}));
    }
  }
  await bob.connect();
  await alice.connect();
}
"""


def fresh_key() -> str:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from volli.protocol import hpke
    return base64.b64encode(hpke.public_bytes(X25519PrivateKey.generate())).decode()


@pytest.mark.parametrize("seal", ["auto", "always"])
def test_a_substituted_encryption_key_is_reported_and_never_sealed_to(plain_server, open_page,
                                                                      seal):
    evil = fresh_key()

    def swap(msg):
        if msg.get("type") == "discover-response" and msg.get("encryptionKey"):
            msg["encryptionKey"] = evil  # the signature is left as it was: it cannot be made
        return msg

    with Mitm(plain_server.url, to_client=rewrite_json(swap)) as proxy:
        page = open_page(f"http://127.0.0.1:{plain_server.port}/health", f"mitm-{seal}")
        page.evaluate(TWO_CLIENTS, {"url": plain_server.url, "proxyUrl": proxy.url,
                                    "seal": seal, "pin": False, "tag": f"swap-{seal}"})
        page.evaluate(f"window.alice.sendOffer('mitm-bob-swap-{seal}@x', "
                      "{type: 'offer', sdp: 'v=0 secret'})")
        page.wait_for_function("window.log.some((e) => e.who === 'alice' && "
                               "['sent', 'sealed-error'].includes(e.type))")
        page.wait_for_timeout(500)
        log = page.evaluate("window.log")
        discovered = [m for m in proxy.sent("to-client") if m["type"] == "discover-response"]
        assert discovered and discovered[0]["encryptionKey"] == evil  # the rewrite happened
        offers = [m for m in proxy.sent("to-server") if m["type"] == "offer"]
        assert all("sealed" not in m for m in offers)  # never sealed to the substituted key
        mismatch = [e for e in log if e["type"] == "key-mismatch"]
        assert mismatch and mismatch[0]["reason"] == "bad-encryption-key-signature"
        assert not page.evaluate(f"window.alice.canSeal('mitm-bob-swap-{seal}@x')")
        if seal == "always":
            assert offers == []  # nothing in clear either
            assert {"who": "alice", "type": "sealed-error", "sealed": None,
                    "reason": "no-encryption-key", "offer": None} in log
            assert not [e for e in log if e["who"] == "bob" and e["type"] == "offer"]
        else:  # "auto" falls back to clear, and the receiver is told it was not sealed
            assert offers and offers[0]["offer"]["sdp"] == "v=0 secret"
            page.wait_for_function("window.log.some((e) => e.who === 'bob' && e.type === 'offer')")
            got = [e for e in page.evaluate("window.log") if e["who"] == "bob"
                   and e["type"] == "offer"]
            assert got[0]["sealed"] is False


def test_a_substituted_identity_key_is_caught_by_a_pin(plain_server, open_page):
    """The proxy swaps bob's identity key and encryption key for its own, consistently
    signed: without a pin alice would seal to the proxy; with bob's key pinned, she refuses."""
    evil_identity = SigningKey.generate()
    evil_public = base64.b64encode(bytes(evil_identity.verify_key)).decode()
    evil_encryption = fresh_key()

    def swap(msg):
        if msg.get("type") == "discover-response" and msg.get("userId", "").startswith("mitm-bob"):
            text = f"volli/encryption-key/v1\n{msg['userId']}\n{evil_encryption}".encode()
            msg.update(publicKey=evil_public, verified=True, encryptionKey=evil_encryption,
                       encryptionKeySignature=base64.b64encode(
                           evil_identity.sign(text).signature).decode())
        return msg

    for pin in (False, True):
        with Mitm(plain_server.url, to_client=rewrite_json(swap)) as proxy:
            page = open_page(f"http://127.0.0.1:{plain_server.port}/health", f"pin-{pin}")
            page.evaluate(TWO_CLIENTS, {"url": plain_server.url, "proxyUrl": proxy.url,
                                        "seal": "always", "pin": pin, "tag": f"pin-{pin}"})
            page.evaluate(f"window.alice.sendOffer('mitm-bob-pin-{pin}@x', "
                          "{type: 'offer', sdp: 'v=0'})")
            page.wait_for_function("window.log.some((e) => e.who === 'alice' && "
                                   "['sent', 'sealed-error'].includes(e.type))")
            log = page.evaluate("window.log")
            offers = [m for m in proxy.sent("to-server") if m["type"] == "offer"]
            if not pin:  # the limit of an unpinned key: sealed to the proxy's key
                assert len(offers) == 1 and "sealed" in offers[0]
                page.wait_for_function("window.log.some((e) => e.type === 'sealed-error' && "
                                       "e.who === 'bob')")
                assert [e["reason"] for e in page.evaluate("window.log")
                        if e["who"] == "bob" and e["type"] == "sealed-error"] == ["does-not-open"]
            else:
                assert offers == []
                assert [e["reason"] for e in log if e["type"] == "key-mismatch"] == ["pinned-key"]
                assert [e["reason"] for e in log if e["type"] == "sealed-error"] == [
                    "no-encryption-key"]
            page.evaluate("window.alice.close(); window.bob.close()")


def test_a_relabelled_or_replayed_sealed_relay_is_refused(plain_server, open_page):
    """Bob sends sealed relays to alice through the proxy: the proxy relabels one offer's
    `from` (does-not-open), re-types one candidate as an answer (does-not-open), and
    sends one candidate twice (replayed). Alice gets the untouched ones, in order."""
    seen = {"offer": 0, "ice-candidate": 0}

    def tamper(msg):
        kind = msg.get("type")
        if kind in seen and "sealed" in msg:
            seen[kind] += 1
            if kind == "offer" and seen[kind] == 1:
                return {**msg, "from": "mitm-carol-relabel@x"}
            if kind == "ice-candidate" and seen[kind] == 1:
                return {**msg, "type": "answer"}
            if kind == "ice-candidate" and seen[kind] == 2:
                return [msg, msg]
        return msg

    with Mitm(plain_server.url, to_client=rewrite_json(tamper)) as proxy:
        page = open_page(f"http://127.0.0.1:{plain_server.port}/health", "relabel")
        page.evaluate(TWO_CLIENTS, {"url": plain_server.url, "proxyUrl": proxy.url,
                                    "seal": "auto", "pin": False, "tag": "relabel"})
        page.evaluate("""() => {
          const offer = (n) => ({type: "offer", sdp: `v=0 ${n}`});
          const to = "mitm-alice-relabel@x";
          window.bob.sendOffer(to, offer(1));
          window.bob.sendOffer(to, offer(2));
          for (const n of [1, 2, 3]) window.bob.sendCandidate(to, {candidate: `c${n}`});
        }""")
        page.wait_for_function("window.log.filter((e) => e.who === 'alice' && "
                               "['offer', 'ice-candidate', 'sealed-error'].includes(e.type)).length >= 6")
        page.wait_for_timeout(300)
        alice = [(e["type"], e["reason"] or e["sealed"], (e["offer"] or {}).get("sdp"))
                 for e in page.evaluate("window.log") if e["who"] == "alice"
                 and e["type"] in ("offer", "ice-candidate", "sealed-error")]
        assert alice == [("sealed-error", "does-not-open", None),   # offer 1 relabelled
                         ("offer", True, "v=0 2"),
                         ("sealed-error", "does-not-open", None),   # c1 re-typed
                         ("ice-candidate", True, None),              # c2
                         ("sealed-error", "replayed", None),         # c2 again
                         ("ice-candidate", True, None)], alice       # c3
        assert sum(1 for m in proxy.sent("to-client") if "sealed" in m) == 6


HOLD = """
async ({url}) => {
  const m = await import("/volli-signaling.js");
  const deadline = (promise, what) => Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`timed out: ${what}`)), 10000))]);
  // Bob registers once (his keys are bound and published), then leaves.
  const bobKeys = {keyPair: await m.generateKeyPair(),
                   encryptionKeyPair: await m.generateEncryptionKeyPair()};
  const first = new m.VolliSignaling(url, {userId: "hold-bob@x", ...bobKeys, pingInterval: 0});
  await first.connect();
  first.close();
  await new Promise((resolve) => setTimeout(resolve, 300));
  const alice = new m.VolliSignaling(url, {userId: "hold-alice@x", pingInterval: 0,
                                           keyPair: await m.generateKeyPair(), seal: "always"});
  await alice.connect();
  const events = [];
  for (const type of ["held", "delivered", "sent", "sealed-error", "error"]) {
    alice.on(type, (e) => events.push([type, e.sealed ?? e.reason ?? e.code ?? null]));
  }
  const held = new Promise((resolve) => alice.on("held", resolve));
  alice.sendOffer("hold-bob@x", {type: "offer", sdp: "v=0 held"}, {hold: 20});
  alice.sendCandidate("hold-bob@x", {candidate: "candidate:held", sdpMid: "0"});
  await deadline(held, "held");
  // Bob comes back with the same keys: the held offer and candidate open.
  const bob = new m.VolliSignaling(url, {userId: "hold-bob@x", ...bobKeys, pingInterval: 0});
  const got = [];
  const both = new Promise((resolve) => {
    bob.on("offer", (e) => { got.push(["offer", e.sealed, e.offer.sdp, e.heldFor >= 0]); });
    bob.on("ice-candidate", (e) => {
      got.push(["ice-candidate", e.sealed, e.candidate.candidate, e.heldFor >= 0]);
      resolve();
    });
    bob.on("sealed-error", (e) => { got.push(["sealed-error", e.reason]); resolve(); });
  });
  await bob.connect();
  await deadline(both, "held relays");
  await deadline(new Promise((resolve) => setTimeout(resolve, 300)), "settle");
  alice.close(); bob.close();
  return {events, got};
}
"""


def test_a_sealed_offer_is_held_for_an_offline_callee(plain_server, open_page):
    page = open_page(f"http://127.0.0.1:{plain_server.port}/health", "hold")
    frames = capture(page)
    r = page.evaluate(HOLD, {"url": plain_server.url})
    assert r["got"] == [["offer", True, "v=0 held", True],
                        ["ice-candidate", True, "candidate:held", True]], r
    # (the candidate may be sealed and sent before or after `held` comes back)
    assert sorted(map(tuple, r["events"])) == [("delivered", None), ("held", None),
                                               ("sent", True), ("sent", True)], r["events"]
    assert not in_clear(frames)
