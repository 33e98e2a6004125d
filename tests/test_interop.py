"""Chromium <-> aiortc through a real Volli server: the demo page in headless Chromium (JS
client, trickle ICE) and an aiortc peer driven by volli.client (candidates inside its SDP),
in both call directions, with data-channel messages both ways, with sealed signaling
(issue 15) and in clear.

The aiortc peer runs its own asyncio loop in a thread, because Playwright's sync API owns
this one. Fixtures (server, browser, pages, loopback ICE) come from the browser and aiortc
test modules.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection
from nacl.signing import SigningKey
from playwright.sync_api import expect

from signaling_mitm import Mitm
from test_aiortc import OPTIONS, loopback_ice  # noqa: F401 (fixture)
from test_browser import WAIT_MS, browser, connect, open_page, page_log, web_server  # noqa: F401
from test_sealed_browser import capture, in_clear, relays
from volli.client import (VolliClient, candidate_from_dict, description_from_dict,
                          description_to_dict)

pytestmark = pytest.mark.timeout(180)


class AiortcPeer:
    """An aiortc peer registered at Volli that echoes every data-channel message."""

    def __init__(self, url: str, user_id: str, signing_key: SigningKey | None = None) -> None:
        """With ``signing_key`` it registers signed, and so seals (volli.client's default)."""
        self.url, self.user_id, self.signing_key = url, user_id, signing_key
        self.received: list[str] = []
        self.relays: list[tuple[str, bool | None]] = []  # (type, sealed) of each relay got
        self.refused: list[dict] = []  # sealed-error and key-mismatch messages
        self.ready = threading.Event()
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self._call: str | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def start(self, call: str | None = None) -> "AiortcPeer":
        self._call = call
        self.thread.start()
        assert self.ready.wait(15), f"aiortc peer did not register: {self.error}"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)

    def _main(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._run(), 120))
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.ready.set()

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if self.signing_key is None:
            client = VolliClient(self.url, self.user_id, public_key="YWlvcnRjLXBlZXI=",
                                 **OPTIONS)
        else:
            client = VolliClient(self.url, self.user_id, self.signing_key, **OPTIONS)

        def attach(channel: RTCDataChannel) -> None:
            @channel.on("open")
            def _open() -> None:
                self.connected.set()

            @channel.on("message")
            def _message(text) -> None:
                self.received.append(text)
                channel.send(f"echo: {text}")

            if channel.readyState == "open":
                self.connected.set()

        pc.on("datachannel", attach)

        async def on_offer(message: dict) -> None:
            self.relays.append(("offer", message.get("sealed")))
            await pc.setRemoteDescription(description_from_dict(message["offer"]))
            await pc.setLocalDescription(await pc.createAnswer())
            await client.send_answer(message["from"], pc.localDescription)

        async def on_answer(message: dict) -> None:
            self.relays.append(("answer", message.get("sealed")))
            await pc.setRemoteDescription(description_from_dict(message["answer"]))

        async def on_candidate(message: dict) -> None:
            self.relays.append(("ice-candidate", message.get("sealed")))
            await pc.addIceCandidate(candidate_from_dict(message["candidate"]))

        client.on("offer", on_offer)
        client.on("answer", on_answer)
        client.on("ice-candidate", on_candidate)
        client.on("sealed-error", self.refused.append)
        client.on("key-mismatch", self.refused.append)
        try:
            await client.connect()
            self.ready.set()
            if self._call:  # aiortc calls the browser: candidates travel inside the SDP
                attach(pc.createDataChannel("chat"))
                await pc.setLocalDescription(await pc.createOffer())
                await client.send_offer(self._call, description_to_dict(pc.localDescription))
                await client.send_candidate(self._call, None)
            await self._stop.wait()
        finally:
            await client.close()
            await pc.close()


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize("caller", ["chromium", "aiortc"])
def test_chromium_and_aiortc_talk_through_volli(web_server, open_page, loopback_ice, caller,
                                               sealed):
    """``sealed``: the aiortc peer signs, so both sides seal (the demo does by default):
    every frame the browser got (DevTools capture) and the aiortc peer got (a forwarding
    WebSocket proxy in front of it, tests/signaling_mitm.py) holds no SDP or candidate in
    clear. Unsigned, the aiortc peer publishes no key and the signaling goes in clear."""
    page = open_page(f"http://127.0.0.1:{web_server.port}/demo", "chromium")
    browser_frames = capture(page)
    tag = f"{caller}-{'sealed' if sealed else 'plain'}"
    browser_id, aiortc_id = f"chromium-{tag}@interop", f"aiortc-{tag}@interop"
    connect(page, browser_id)
    with Mitm(web_server.url) as proxy:
        peer = AiortcPeer(proxy.url, aiortc_id, SigningKey.generate() if sealed else None)
        peer.start(call=browser_id if caller == "aiortc" else None)
        try:
            assert peer.error is None, peer.error
            if caller == "chromium":
                page.fill("#peer-id", aiortc_id)
                page.click("#call")
            else:  # the demo asks before it answers
                expect(page.locator("#incoming-from")).to_have_text(aiortc_id,
                                                                    timeout=WAIT_MS)
                page.click("#accept")
            status = page.locator("#call-status")
            try:
                expect(status).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
            except AssertionError:
                raise AssertionError(f"no connection; page log:\n{page_log(page)}\n"
                                     f"aiortc error: {peer.error}") from None
            expect(page.locator("#channel-state")).to_have_text('"chat" open')
            assert peer.connected.wait(15), "aiortc's data channel did not open"
            page.fill("#chat-input", "hello from chromium")
            page.click("#send")
            expect(page.locator("#messages li.peer")).to_have_text(
                [f"{aiortc_id}echo: hello from chromium"])
            assert peer.received == ["hello from chromium"]
            expect(page.locator("#sealing")).to_have_attribute(
                "data-state", "sealed" if sealed else "clear")
            page.wait_for_timeout(300)  # the last candidates arrive
        finally:
            peer.stop()
        aiortc_frames = {"received": [text for way, text, _ in proxy.frames
                                      if way == "to-client"],
                         "sent": [text for way, text, _ in proxy.frames if way == "to-server"]}
    assert peer.error is None and peer.refused == [], (peer.error, peer.refused)
    assert peer.relays and all(s is sealed for _, s in peer.relays), peer.relays
    for name, frames in (("chromium", browser_frames), ("aiortc", aiortc_frames)):
        got = relays(frames["received"])
        assert got, name
        if sealed:
            assert not in_clear(frames), (name, in_clear(frames)[:2])
            assert all("sealed" in m for m in got), (name, got[:1])
        else:  # the check can fail: in clear, it sees the SDP
            assert in_clear(frames) and not any("sealed" in m for m in got), name
