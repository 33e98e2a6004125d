"""Presence subscriptions in both clients, against a real gunicorn server: the asyncio
Python client (volli/client.py) and the JS client in headless Chromium, including its
watches made again after a reconnect."""

from __future__ import annotations

import asyncio

import pytest

from playwright.sync_api import expect

from conftest import Client, Server
from test_browser import browser, connect, open_page  # noqa: F401 (fixtures)
from volli.client import VolliClient

pytestmark = pytest.mark.timeout(120)
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
    asyncio.run(run())


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
