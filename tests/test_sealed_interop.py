"""Chromium <-> aiortc with sealed signaling through a real Volli server (issue 15): the
demo page (JS client, which seals by default) and an aiortc peer driven by volli.client
with a signing key (which seals by default), in both call directions. Every frame the
browser got is captured by Chromium's DevTools (Playwright), every frame the aiortc peer
got by a real WebSocket proxy in front of it (tests/signaling_mitm.py, forwarding as is):
no SDP line and no candidate appears in clear in any of them, and the call connects."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey
from playwright.sync_api import expect

from signaling_mitm import Mitm
from test_aiortc import loopback_ice  # noqa: F401 (fixture)
from test_browser import WAIT_MS, browser, connect, open_page, page_log, web_server  # noqa: F401
from test_interop import AiortcPeer
from test_sealed_browser import capture, in_clear, relays

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("caller", ["chromium", "aiortc"])
def test_chromium_and_aiortc_seal_their_signaling(web_server, open_page, loopback_ice, caller):
    page = open_page(f"http://127.0.0.1:{web_server.port}/demo", "chromium")
    browser_frames = capture(page)
    browser_id, aiortc_id = f"chromium-{caller}@sealed", f"aiortc-{caller}@sealed"
    connect(page, browser_id)
    with Mitm(web_server.url) as proxy:
        peer = AiortcPeer(proxy.url, aiortc_id, SigningKey.generate()).start(
            call=browser_id if caller == "aiortc" else None)
        try:
            assert peer.error is None, peer.error
            if caller == "chromium":
                page.fill("#peer-id", aiortc_id)
                page.click("#call")
            else:
                expect(page.locator("#incoming-from")).to_have_text(aiortc_id, timeout=WAIT_MS)
                expect(page.locator("#incoming-sealed")).to_have_attribute(
                    "data-state", "sealed")
                page.click("#accept")
            try:
                expect(page.locator("#call-status")).to_have_attribute(
                    "data-state", "connected", timeout=WAIT_MS)
            except AssertionError:
                raise AssertionError(f"no connection; page log:\n{page_log(page)}\n"
                                     f"aiortc error: {peer.error}") from None
            assert peer.connected.wait(15), "aiortc's data channel did not open"
            page.fill("#chat-input", "hello from chromium")
            page.click("#send")
            expect(page.locator("#messages li.peer")).to_have_text(
                [f"{aiortc_id}echo: hello from chromium"])
            expect(page.locator("#sealing")).to_have_attribute("data-state", "sealed")
            page.wait_for_timeout(300)  # the last candidates arrive
        finally:
            peer.stop()
        aiortc_frames = {"received": [text for way, text, _ in proxy.frames
                                      if way == "to-client"],
                         "sent": [text for way, text, _ in proxy.frames if way == "to-server"]}
    assert peer.error is None and peer.refused == [], (peer.error, peer.refused)
    assert peer.relays and all(sealed is True for _, sealed in peer.relays), peer.relays
    for name, frames in (("chromium", browser_frames), ("aiortc", aiortc_frames)):
        assert not in_clear(frames), (name, in_clear(frames)[:2])
        got = relays(frames["received"])
        assert got and all("sealed" in m for m in got), (name, got[:1])
    # Both directions carried SDP (sealed): an offer one way, an answer the other.
    kinds = {name: {m["type"] for m in relays(frames["received"])}
             for name, frames in (("chromium", browser_frames), ("aiortc", aiortc_frames))}
    assert {"offer", "answer"} <= kinds["chromium"] | kinds["aiortc"], kinds
