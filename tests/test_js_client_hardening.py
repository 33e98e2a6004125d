"""Hostile peers against the browser client and the demo (real gunicorn, real headless
Chromium; the browser setup is tests/test_browser.py's).

- A relayed offer/answer/ice-candidate carries whatever `requestId` its sender chose. It must
  never settle (or silently swallow) a pending request of volli-signaling.js: the page's
  `discover()` still resolves with the real `discover-response`, and a request that gets no
  reply still rejects with `timeout`. Relays still arrive as events.
- The demo asks before it answers: an incoming caller gets nothing (no answer, no candidates,
  no media) until the user clicks Accept; Decline sends nothing.
"""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from conftest import Client
from test_browser import (WAIT_MS, browser, connect, open_page,  # noqa: F401 (fixtures)
                          page_log, web_server)

pytestmark = pytest.mark.timeout(180)

SETUP = """
async ({url, userId}) => {
  window.deadline = (promise, ms, what) => Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`hung: ${what}`)), ms))]);
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId, pingInterval: 0, reconnect: false});
  window.sig = sig;
  window.seen = [];  // every message, in arrival order
  sig.on("message", (msg) => window.seen.push({type: msg.type, requestId: msg.requestId ?? null,
                                               from: msg.from ?? null}));
  window.relays = {offer: 0, answer: 0, "ice-candidate": 0};
  for (const type of Object.keys(window.relays)) sig.on(type, () => window.relays[type]++);
  window.errors = [];
  sig.on("error", (e) => window.errors.push(e.code));
  await window.deadline(sig.connect(), 10000, "connect");
  return sig.state;
}
"""

# Runs as a task of its own: the main thread is kept busy for 3 s, so the hostile relays sent
# meanwhile wait in the socket, then discover() is sent and those relays are handled while it
# is pending, before its reply arrives.
DISCOVER_BEHIND_RELAYS = """
() => setTimeout(() => {
  const end = performance.now() + 3000;
  while (performance.now() < end) { /* busy */ }
  window.discovered = window.deadline(window.sig.discover("ghost@volli.app"), 10000, "discover")
    .then((reply) => ({reply}), (err) => ({error: err.code ?? err.message}));
}, 0)
"""

# A relay gets no reply on success, so this request can only end by its timeout (3 s).
UNANSWERED = """
() => {
  window.mark = window.seen.length;
  window.echoes = () => window.seen.slice(window.mark).filter(
    (m) => m.from === "mallory@volli.app" && m.requestId === window.probeId).length;
  window.unanswered = window.deadline(
    window.sig.request({type: "offer", to: "mallory@volli.app",
                        offer: {type: "offer", sdp: "v=0"}}, 3),
    8000, "unanswered request")
    .then((reply) => ({reply}),
          (err) => ({error: err.code ?? err.message, echoed: window.echoes()}));
}
"""


def hostile_relays(mallory: Client, to: str, request_ids) -> int:
    """Relay offers, answers and candidates to `to` that look like replies; returns the count."""
    sent = 0
    for rid in request_ids:
        lure = {"requestId": rid, "online": True, "userId": "ghost@volli.app",
                "publicKey": "ZXZpbA==", "code": "timeout", "iceServers": [], "nonce": "x"}
        mallory.send({"type": "offer", "to": to, "offer": {"type": "offer", "sdp": "v=0"}, **lure})
        mallory.send({"type": "answer", "to": to, "answer": {"type": "answer", "sdp": "v=0"},
                      **lure})
        mallory.send({"type": "ice-candidate", "to": to, "candidate": None, **lure})
        sent += 1
    return sent


def test_relayed_request_ids_never_settle_requests(web_server, open_page):
    page = open_page(f"http://127.0.0.1:{web_server.port}/health", "victim")
    victim = "victim@volli.app"
    assert page.evaluate(SETUP, {"url": web_server.url, "userId": victim}) == "registered"
    mallory = Client(web_server.url)
    try:
        mallory.register("mallory@volli.app")

        # 1. discover() pending while relays carrying requestIds 1..50 arrive first.
        page.evaluate(DISCOVER_BEHIND_RELAYS)
        n = hostile_relays(mallory, victim, range(1, 51))
        page.wait_for_function("window.discovered !== undefined", timeout=WAIT_MS)
        result = page.evaluate("window.discovered")
        seen = page.evaluate("window.seen")
        reply_at = next(i for i, m in enumerate(seen) if m["type"] == "discover-response")
        rid = seen[reply_at]["requestId"]
        lures = [i for i, m in enumerate(seen)
                 if m["from"] == "mallory@volli.app" and m["requestId"] == rid]
        # The attack really happened: relays with discover's requestId came before its reply.
        assert lures and lures[0] < reply_at, ("setup: the relays did not arrive while "
                                               f"discover was pending: {seen}")
        assert result == {"reply": {"type": "discover-response", "userId": "ghost@volli.app",
                                    "online": False, "publicKey": None, "verified": False,
                                    "requestId": rid}}, result
        # Every relay still arrived as its event.
        page.wait_for_function(f"Object.values(window.relays).every((x) => x === {n})",
                               timeout=WAIT_MS)

        # 2. A request whose reply never comes rejects with timeout, even though the peer
        #    echoes its requestId back in relays before then.
        page.evaluate(UNANSWERED)
        probe = mallory.recv(timeout=5)
        assert probe["type"] == "offer" and probe["from"] == victim, probe
        page.evaluate("(id) => { window.probeId = id; }", probe["requestId"])
        hostile_relays(mallory, victim, [probe["requestId"]])
        page.wait_for_function("window.echoes() === 3", timeout=WAIT_MS)
        started = time.monotonic()
        outcome = page.evaluate("window.unanswered")
        assert outcome == {"error": "timeout", "echoed": 3}, outcome
        assert time.monotonic() - started < 5, "the timeout took far longer than 3 s"

        # The client still works, and none of the lures became an error event.
        assert page.evaluate("window.deadline(window.sig.ping(), 5000, 'ping')") >= 0
        assert page.evaluate("window.errors") == []
    finally:
        mallory.close()
        page.evaluate("window.sig?.close()")


REAL_OFFER = """
async () => {
  const pc = new RTCPeerConnection();
  pc.createDataChannel("chat");
  await pc.setLocalDescription();
  return pc.localDescription.toJSON();
}
"""


def test_demo_asks_before_answering_and_decline_sends_nothing(web_server, open_page):
    base = f"http://127.0.0.1:{web_server.port}"
    bob = open_page(f"{base}/demo", "bob")
    connect(bob, "bob@volli.app")
    bob.click("#camera")  # the camera is on: a demo that answered would send it
    expect(bob.locator("#camera")).to_have_text("Stop camera")
    incoming = bob.locator("#incoming")
    expect(incoming).to_be_hidden()

    # A caller that is a raw Python peer sees everything bob's page sends it. Its offer is a
    # real one (from another browser), so a demo that answered by itself would answer it.
    offer = open_page(f"{base}/health", "offerer").evaluate(REAL_OFFER)
    caller = "<b>mallory</b>@volli.app"  # shown as text, never as markup
    mallory = Client(web_server.url)
    try:
        mallory.register(caller)
        mallory.send({"type": "offer", "to": "bob@volli.app", "offer": offer})
        for port in (50000, 50001, 50002):
            mallory.send({"type": "ice-candidate", "to": "bob@volli.app", "candidate": {
                "candidate": f"candidate:1 1 udp 2122260223 127.0.0.1 {port} typ host",
                "sdpMid": "0", "sdpMLineIndex": 0}})
        with pytest.raises(TimeoutError):  # no answer, no candidates before Accept
            print("mallory got:", mallory.recv(timeout=3))
        expect(incoming).to_be_visible()
        expect(bob.locator("#incoming-from")).to_have_text(caller)
        expect(bob.locator("#peer-name")).to_have_text("–")
        assert bob.evaluate("window.volliDemo.call") is None

        bob.click("#decline")
        expect(incoming).to_be_hidden()
        assert f"declined the call from {caller}" in page_log(bob)
        with pytest.raises(TimeoutError):  # Decline sends nothing either
            print("mallory got:", mallory.recv(timeout=2))
        assert bob.evaluate("window.volliDemo.call") is None
        # Candidates of the declined call are dropped with it; nothing reaches Accept later.
        mallory.send({"type": "ice-candidate", "to": "bob@volli.app", "candidate": None})
        with pytest.raises(TimeoutError):
            print("mallory got:", mallory.recv(timeout=1))
        expect(incoming).to_be_hidden()
    finally:
        mallory.close()

    # A real browser caller that is declined stays unanswered.
    alice = open_page(f"{base}/demo", "alice")
    connect(alice, "alice@volli.app")
    alice.fill("#peer-id", "bob@volli.app")
    alice.click("#call")
    expect(bob.locator("#incoming-from")).to_have_text("alice@volli.app")
    bob.click("#decline")
    expect(incoming).to_be_hidden()
    alice.wait_for_timeout(2000)
    expect(alice.locator("#signaling-state")).to_have_text("have-local-offer")
    expect(alice.locator("#call-status")).to_have_text("Calling bob@volli.app…")
    assert "← answer" not in page_log(alice)
    expect(bob.locator("#peer-name")).to_have_text("–")
