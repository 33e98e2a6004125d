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
                                    "online": False, "publicKey": None, "requestId": rid}}, result
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
