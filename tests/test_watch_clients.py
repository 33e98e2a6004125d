"""Presence subscriptions and held offers in both clients, against a real gunicorn server:
the asyncio Python client (volli/client.py) and the JS client in headless Chromium,
including its watches made again after a reconnect."""

from __future__ import annotations

import asyncio
import threading

import pytest

from playwright.sync_api import expect

from conftest import Client, Server
from test_browser import (WAIT_MS, browser, connect, open_page, page_log,  # noqa: F401
                          wait_chat_open)
from volli.client import VolliClient

pytestmark = pytest.mark.timeout(120)


def run_async(make) -> None:
    """asyncio.run in a thread of its own: Playwright's sync API keeps an event loop
    running in this one once a browser test has run."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the client did not finish within 60 s"
    if failure:
        raise failure[0]
DEBOUNCE = "0.5"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("watch"), {"VOLLI_PRESENCE_DEBOUNCE": DEBOUNCE})
    yield srv.wait_ready()
    srv.stop()


def test_the_python_client_watches_and_hears_changes(server):
    async def run():
        async with VolliClient(server.url, "py-watcher@x", public_key="a2V5",
                               proxy=None) as watcher:
            assert await watcher.watch("py-pal@x", "nobody@x") == {"py-pal@x": False,
                                                                   "nobody@x": False}
            async with VolliClient(server.url, "py-pal@x", public_key="a2V5", proxy=None):
                got = await watcher.recv(timeout=5)
                assert got == {"type": "presence", "userId": "py-pal@x", "online": True}
            got = await watcher.recv(timeout=5)
            assert got == {"type": "presence", "userId": "py-pal@x", "online": False}
            await watcher.unwatch("py-pal@x")
            async with VolliClient(server.url, "py-pal@x", public_key="a2V5", proxy=None):
                with pytest.raises(asyncio.TimeoutError):
                    await watcher.recv(timeout=1.5)
    run_async(run)


JS_WATCH = """
async ({url}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId: "js-watcher@x", pingInterval: 0,
                                         reconnectDelay: 0.2, maxReconnectDelay: 0.5});
  window.sig = sig;
  window.events = [];
  sig.on("presence", (e) => window.events.push([e.userId, e.online]));
  sig.on("registered", (e) => window.events.push(["registered", e.reconnected]));
  await sig.connect();
  return await sig.watch(["js-pal@x"]);
}
"""


def test_the_js_client_watches_and_watches_again_after_a_reconnect(server, open_page):
    page = open_page(f"http://127.0.0.1:{server.port}/health", "watch")
    assert page.evaluate(JS_WATCH, {"url": server.url}) == [
        {"userId": "js-pal@x", "online": False, "verified": False}]
    pal = Client(server.url)
    try:
        pal.register("js-pal@x")
        page.wait_for_function("window.events.length === 2")
        # Dropped: while the page reconnects, its pal leaves; the watch made again says so.
        page.evaluate("window.sig._ws.close()")
        pal.close()
        page.wait_for_function("window.events.length === 4")
        assert page.evaluate("window.events") == [
            ["registered", False], ["js-pal@x", True], ["registered", True],
            ["js-pal@x", False]]
        assert page.evaluate("Object.fromEntries(window.sig.presence)") == {"js-pal@x": False}
    finally:
        pal.close()
        page.evaluate("window.sig.close()")


def test_the_demo_shows_the_contacts_presence_live(server, open_page):
    alice = open_page(f"http://127.0.0.1:{server.port}/demo", "alice")
    connect(alice, "demo-alice@x")
    alice.fill("#peer-id", "demo-bob@x")  # watched once the typing stops
    presence = alice.locator("#peer-presence")
    expect(presence).to_have_attribute("data-state", "offline")
    bob = open_page(f"http://127.0.0.1:{server.port}/demo", "bob")
    connect(bob, "demo-bob@x")
    expect(presence).to_have_attribute("data-state", "online")
    expect(presence).to_have_text("online")
    bob.click("#disconnect")
    expect(presence).to_have_attribute("data-state", "offline")  # after the debounce


def test_the_python_client_holds_an_offer_for_an_offline_callee(server):
    async def run():
        async with VolliClient(server.url, "py-caller@x", public_key="a2V5",
                               proxy=None) as caller:
            await caller.send_offer("py-callee@x", {"type": "offer", "sdp": "v=0"}, hold=30)
            assert (await caller.recv(timeout=5))["type"] == "held"
            await caller.send_candidate("py-callee@x", {"candidate": "c1"})
            async with VolliClient(server.url, "py-callee@x", public_key="a2V5",
                                   proxy=None) as callee:
                got = [await callee.recv(timeout=5), await callee.recv(timeout=5)]
                assert [(m["type"], m["from"]) for m in got] == [
                    ("offer", "py-caller@x"), ("ice-candidate", "py-caller@x")]
                assert all(m["heldFor"] >= 0 for m in got)
            assert await caller.recv(timeout=5) == {"type": "delivered", "to": "py-callee@x"}
    run_async(run)


JS_HOLD = """
async ({url}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId: "js-caller@x", pingInterval: 0});
  window.sig = sig;
  window.events = [];
  for (const type of ["held", "delivered", "expired"]) {
    sig.on(type, (e) => window.events.push([type, e.to, e.expiresIn ?? null]));
  }
  await sig.connect();
  sig.sendOffer("js-callee@x", {type: "offer", sdp: "v=0"}, {hold: 20});
}
"""


def test_the_js_client_holds_an_offer_and_hears_it_delivered(server, open_page):
    page = open_page(f"http://127.0.0.1:{server.port}/health", "hold")
    page.evaluate(JS_HOLD, {"url": server.url})
    page.wait_for_function("window.events.length === 1")
    callee = Client(server.url)
    try:
        callee.register("js-callee@x")
        got = callee.recv()
        assert got["type"] == "offer" and got["from"] == "js-caller@x" and got["hold"] == 20
        page.wait_for_function("window.events.length === 2")
        assert page.evaluate("window.events") == [["held", "js-callee@x", 20],
                                                  ["delivered", "js-callee@x", None]]
    finally:
        callee.close()
        page.evaluate("window.sig.close()")


def test_the_demo_calls_an_offline_contact_who_opens_the_page_later(server, open_page):
    """A calls B, who is offline: the offer and A's candidates wait on the server; B opens
    the demo seconds later, accepts, and the data channel opens."""
    base = f"http://127.0.0.1:{server.port}/demo"
    alice = open_page(base, "alice")
    connect(alice, "hold-alice@x")
    alice.fill("#peer-id", "hold-bob@x")
    alice.click("#call")
    expect(alice.locator("#call-status")).to_contain_text("hold-bob@x is offline")
    alice.wait_for_timeout(3000)  # B is away a while; A's candidates are held too
    bob = open_page(base, "bob")
    connect(bob, "hold-bob@x")
    expect(bob.locator("#incoming-from")).to_have_text("hold-alice@x")
    assert "waited" in page_log(bob)
    bob.click("#accept")
    wait_chat_open(alice, bob)
    assert "hold-bob@x came online and got the call" in page_log(alice)
    alice.fill("#chat-input", "you were offline a moment ago")
    alice.click("#send")
    expect(bob.locator("#messages li.peer")).to_have_text(
        ["hold-alice@xyou were offline a moment ago"])
