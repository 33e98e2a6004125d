"""Real browsers against a real server: headless Chromium (Debian's `chromium`, driven by
Playwright) loads /demo and /volli-signaling.js from a gunicorn Volli server.

- Two pages in separate browser contexts connect, one calls the other, the callee is asked
  and gets no answer out before clicking Accept, then WebRTC connects
  over loopback with trickle ICE relayed by Volli, and chat messages cross the data channel
  both ways. Screenshots of both pages go to tests/artifacts/.
- The JS client's signed registration (WebCrypto Ed25519) works against the server:
  the docs' test vector, `registered` with a nonce, takeover by a second connection of
  the same key (the first gets session-replaced and does not reconnect), and refusals.
- The JS client reconnects and registers again after a server restart (close 1001).

Runs on the in-memory backend only (one server per test module, not per backend).
Chromium: `bash tests/run.sh` installs it; never `playwright install`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conftest import ROOT, Client, Server

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
# Loopback-only WebRTC needs --allow-loopback-in-peer-connection plus camera/microphone
# permission on the context (without it Chromium hides host addresses behind mDNS names).
# Do not pass --disable-features: it would replace Playwright's own list.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--allow-loopback-in-peer-connection",
                 # getUserMedia gets a synthetic camera (the demo's optional video).
                 "--use-fake-device-for-media-stream"]
WAIT_MS = 30_000  # every browser-side wait is bounded by this

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """One Volli server (memory backend, permissive limits) for this module's browsers."""
    srv = Server(tmp_path_factory.mktemp("browser")).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`bash tests/run.sh` "
                    "does); never `playwright install`")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def open_page(browser):
    """Open a URL in a new, isolated browser context; the page's console is printed at the
    end of the test (pytest shows it when the test fails)."""
    contexts = []
    logs: list[str] = []

    def open_(url: str, name: str) -> Page:
        context = browser.new_context(permissions=["camera", "microphone"],
                                      viewport={"width": 1000, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda msg: logs.append(f"[{name} console.{msg.type}] {msg.text}"))
        page.on("pageerror", lambda exc: logs.append(f"[{name} pageerror] {exc}"))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    print("\n".join(logs))


def connect(page: Page, user_id: str) -> None:
    page.fill("#user-id", user_id)
    page.click("#connect")
    expect(page.locator("#status")).to_have_attribute("data-state", "registered")
    expect(page.locator("#status")).to_have_text(f"Registered as {user_id} (signed)")


def page_log(page: Page) -> str:
    return page.locator("#log").inner_text()


def wait_chat_open(alice: Page, bob: Page) -> None:
    """Both demo pages' data channel is open, or fail with both pages' logs."""
    for page in (alice, bob):
        try:
            expect(page.locator("#channel-state")).to_have_text('"chat" open', timeout=WAIT_MS)
        except AssertionError:
            raise AssertionError(f"no data channel; alice's log:\n{page_log(alice)}\n"
                                 f"bob's log:\n{page_log(bob)}") from None


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_demo_pages_chat_peer_to_peer(web_server, open_page):
    base = f"http://127.0.0.1:{web_server.port}"
    alice = open_page(f"{base}/demo", "alice")
    bob = open_page(f"{base}/demo", "bob")
    connect(alice, "alice@volli.app")
    connect(bob, "bob@volli.app")

    alice.fill("#peer-id", "bob@volli.app")
    alice.click("#call")
    # Bob is asked first; until he accepts, alice gets no answer.
    expect(bob.locator("#incoming")).to_be_visible()
    expect(bob.locator("#incoming-from")).to_have_text("alice@volli.app")
    bob.wait_for_timeout(2000)  # an answer sent without asking would be back by now
    expect(alice.locator("#signaling-state")).to_have_text("have-local-offer")
    expect(alice.locator("#peer-state")).to_have_text("new")
    assert "← answer" not in page_log(alice)
    expect(bob.locator("#peer-name")).to_have_text("–")
    bob.click("#accept")
    expect(bob.locator("#incoming")).to_be_hidden()
    for page in (alice, bob):
        status = page.locator("#call-status")
        try:
            expect(status).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        except AssertionError:
            raise AssertionError(f"no peer-to-peer connection within {WAIT_MS / 1000:.0f}s; "
                                 f"alice's log:\n{page_log(alice)}\nbob's log:\n"
                                 f"{page_log(bob)}") from None
        expect(status).to_have_text("Connected (peer-to-peer)")
        expect(page.locator("#peer-state")).to_have_text("connected")
        expect(page.locator("#channel-state")).to_have_text('"chat" open')
        # The selected candidate pair is direct: no TURN relay in between. (The remote side
        # can be prflx when its connectivity check beat its trickled candidate.)
        expect(page.locator("#route")).to_have_text(re.compile(
            r"^host \S+:\d+/udp ⇄ (host|prflx) \S+:\d+/udp$"))
    expect(bob.locator("#peer-name")).to_have_text("alice@volli.app")
    expect(bob.locator("#peer-id")).to_have_value("alice@volli.app")

    alice.fill("#chat-input", "Hi Bob, this went peer to peer!")
    alice.click("#send")
    expect(bob.locator("#messages li.peer")).to_have_text(
        ["alice@volli.appHi Bob, this went peer to peer!"])
    bob.fill("#chat-input", "Hello Alice, ¡hola! ✓")
    bob.press("#chat-input", "Enter")  # the form submits on Enter too
    expect(alice.locator("#messages li.peer")).to_have_text(["bob@volli.appHello Alice, ¡hola! ✓"])
    expect(alice.locator("#messages li.me")).to_have_text(["YouHi Bob, this went peer to peer!"])

    # The camera (Chromium's fake device) renegotiates from alice's side; bob sees video.
    alice.click("#camera")
    expect(alice.locator("#camera")).to_have_text("Stop camera")
    bob.wait_for_function("document.querySelector('#remote-video').videoWidth > 0")
    expect(bob.locator("#call-status")).to_have_attribute("data-state", "connected")

    screenshot(alice, "demo-alice.png")
    screenshot(bob, "demo-bob.png")

    # Hanging up on one side ends the call on the other (the data channel closes).
    alice.click("#hangup")
    expect(alice.locator("#call-status")).to_have_text("You hung up")
    expect(bob.locator("#call-status")).to_have_text("alice@volli.app hung up")
    expect(bob.locator("#chat-input")).to_be_disabled()
    # Signaling stays up after the call.
    expect(bob.locator("#status")).to_have_attribute("data-state", "registered")


SIGNED_SCRIPT = """
async ({url, userId}) => {
  const deadline = (promise, ms, what) => Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`timed out: ${what}`)), ms))]);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const failure = async (promise) => {
    try { await deadline(promise, 10000, "refusal"); return null; }
    catch (err) { return {code: err.code, message: err.message}; }
  };
  const m = await import("/volli-signaling.js");

  // docs/protocol.md, section 3a: the test vector's key (seed 00..1f) and signature.
  const seed = Uint8Array.from({length: 32}, (_, i) => i);
  const pkcs8 = new Uint8Array([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b,
                                0x65, 0x70, 0x04, 0x22, 0x04, 0x20, ...seed]);
  const vectorKey = await crypto.subtle.importKey("pkcs8", pkcs8, {name: "Ed25519"}, false, ["sign"]);
  const vector = await m.signRegistration(vectorKey, "bm9uY2Utb2YtdGhlLXRlc3Qh", "alice@volli.app");

  const keyPair = await m.generateKeyPair();
  const publicKey = await m.exportPublicKey(keyPair.publicKey);
  const first = new m.VolliSignaling(url, {userId, keyPair, pingInterval: 0, reconnectDelay: 0.1});
  const firstEvents = [];
  for (const type of ["registered", "session-replaced", "close", "reconnecting"]) {
    first.on(type, (detail) => firstEvents.push({type, code: detail.code ?? null,
                                                 willReconnect: detail.willReconnect ?? null}));
  }
  const firstReply = await deadline(first.connect(), 10000, "first connect");
  const firstClosed = new Promise((resolve) => first.on("close", resolve));

  // The same key on a second connection takes over.
  const second = new m.VolliSignaling(url, {userId, keyPair, pingInterval: 0});
  const secondReply = await deadline(second.connect(), 10000, "second connect");
  await deadline(firstClosed, 10000, "first replaced");
  await sleep(1500); // a reconnect (first delay 0.05-0.1 s) would have happened by now
  const found = await deadline(second.discover(userId), 10000, "discover");
  const rtt = await deadline(second.ping(), 10000, "ping");

  // Refusals: unsigned for a bound ID, another key, and a plain user ID taken.
  const unsigned = await failure(new m.VolliSignaling(url, {userId, publicKey: "c29tZS1rZXk="}).connect());
  const otherKey = await failure(new m.VolliSignaling(url, {userId, keyPair: await m.generateKeyPair()}).connect());
  const missing = await failure(second.discover(""));

  // Relays and their errors: to self comes back with from set; to nobody gets peer-offline.
  const selfOffer = new Promise((resolve) => second.on("offer", resolve));
  second.sendOffer(userId, {type: "offer", sdp: "v=0"});
  const relayed = await deadline(selfOffer, 10000, "relay to self");
  const offline = new Promise((resolve) => second.on("error", resolve));
  const requestId = second.sendCandidate("nobody@volli.app", null);
  const offlineError = await deadline(offline, 10000, "peer-offline");

  // rotate-key: the new key signs the next registration.
  const newKeyPair = await m.generateKeyPair();
  const rotated = await deadline(second.rotateKey(newKeyPair), 10000, "rotate-key");
  second.close();
  await sleep(200);
  const third = new m.VolliSignaling(url, {userId, keyPair: newKeyPair, pingInterval: 0});
  const thirdReply = await deadline(third.connect(), 10000, "connect with the rotated key");
  const oldKey = await failure(new m.VolliSignaling(url, {userId, keyPair}).connect());
  third.close();
  return {vector, publicKey, firstReply, secondReply, firstEvents, firstState: first.state,
          secondState: second.state, found, rtt, unsigned, otherKey, missing, relayed,
          requestId, offlineError, rotated, newPublicKey: await m.exportPublicKey(newKeyPair.publicKey),
          thirdReply, oldKey};
}
"""


def test_js_client_signed_registration_and_takeover(web_server, open_page):
    page = open_page(f"http://127.0.0.1:{web_server.port}/health", "signed")
    user_id = "carol@volli.app"
    r = page.evaluate(SIGNED_SCRIPT, {"url": web_server.url, "userId": user_id})

    assert r["vector"] == ("5vf8lnJ/TzqcHHJn4bcP4Cbts4y5lkfSfXvF48Fgx+SCqi8nB7ETX+44cc6L5whfWlyu"
                           "TTPAAtq9ikAHPC8/AA==")
    assert r["firstReply"]["userId"] == user_id
    assert len(r["firstReply"]["nonce"]) == 24, r["firstReply"]
    assert len(r["secondReply"]["nonce"]) == 24
    assert r["secondReply"]["nonce"] != r["firstReply"]["nonce"]
    # The first connection was replaced (message, then close 4000) and stayed closed.
    assert r["firstEvents"] == [
        {"type": "registered", "code": None, "willReconnect": None},
        {"type": "session-replaced", "code": None, "willReconnect": None},
        {"type": "close", "code": 4000, "willReconnect": False},
    ], r["firstEvents"]
    assert r["firstState"] == "closed"
    assert r["found"]["online"] is True and r["found"]["publicKey"] == r["publicKey"]
    assert r["rtt"] >= 0
    assert r["unsigned"]["code"] == "identity-bound", r["unsigned"]
    assert r["otherKey"]["code"] == "bad-signature", r["otherKey"]
    assert r["missing"]["code"] == "invalid-user-id", r["missing"]
    assert r["relayed"]["from"] == user_id and r["relayed"]["offer"] == {"type": "offer",
                                                                        "sdp": "v=0"}
    assert r["offlineError"]["code"] == "peer-offline"
    assert r["offlineError"]["requestId"] == r["requestId"]
    assert r["offlineError"]["request"] == {"type": "ice-candidate", "to": "nobody@volli.app"}
    assert r["rotated"]["type"] == "key-rotated"
    assert r["rotated"]["publicKey"] == r["newPublicKey"]
    assert r["secondState"] == "closed"
    assert len(r["thirdReply"]["nonce"]) == 24
    assert r["oldKey"]["code"] == "bad-signature", r["oldKey"]


RECONNECT_SETUP = """
async ({url, userId}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId, keyPair: await m.generateKeyPair(),
                                         pingInterval: 1, reconnectDelay: 0.2,
                                         maxReconnectDelay: 1});
  window.events = [];
  for (const type of ["registered", "close", "reconnecting", "session-replaced"]) {
    sig.on(type, (d) => window.events.push({type, code: d.code ?? null,
                                            willReconnect: d.willReconnect ?? null,
                                            reconnected: d.reconnected ?? null}));
  }
  window.sig = sig;
  await Promise.race([sig.connect(), new Promise((_, reject) =>
    setTimeout(() => reject(new Error("connect timed out")), 10000))]);
  return sig.state;
}
"""


def test_js_client_reconnects_after_server_restart(tmp_path, open_page):
    first = Server(tmp_path).wait_ready()
    servers = [first]
    try:
        port = first.port
        page = open_page(f"http://127.0.0.1:{port}/health", "reconnect")
        user_id = "dave@volli.app"
        assert page.evaluate(RECONNECT_SETUP, {"url": first.url, "userId": user_id}) \
            == "registered"
        page.wait_for_function("window.events.length >= 1 && window.sig.state === 'registered'")

        first.stop()  # SIGTERM: every connection is closed with 1001
        page.wait_for_function("window.events.some(e => e.type === 'close')")
        page.wait_for_function(  # at least one failed attempt while the port is closed
            "window.events.filter(e => e.type === 'reconnecting').length >= 2")

        second = Server(tmp_path, {"PORT": str(port)})
        second.port = port  # Server picked another free port; PORT above overrides it
        servers.append(second)
        second.wait_ready()
        page.wait_for_function("window.sig.state === 'registered' && "
                               "window.events.at(-1).type === 'registered'")
        events = page.evaluate("window.events")
        assert events[0] == {"type": "registered", "code": None, "willReconnect": None,
                             "reconnected": False}
        assert events[1] == {"type": "close", "code": 1001, "willReconnect": True,
                             "reconnected": None}, events
        assert events[-1]["reconnected"] is True, events
        assert {e["type"] for e in events[2:-1]} <= {"reconnecting", "close"}, events

        # The new server sees the user online; the app ping keeps working.
        observer = Client(second.url)
        try:
            observer.register("observer@volli.app")
            reply = observer.call({"type": "discover", "userId": user_id})
            assert reply["online"] is True, reply
        finally:
            observer.close()
        assert page.evaluate("window.sig.ping()") >= 0
        page.evaluate("window.sig.close()")
        assert page.evaluate("window.sig.state") == "closed"
    finally:
        for srv in servers:
            srv.stop()
