"""Web Push in headless Chromium: the JS client's push-subscribe reaches a real push
service (tests/push_service.py) through a real server, and the demo's service worker
shows the incoming call a push carries (delivered with the DevTools protocol, as a push
service would: Chromium's own needs the network)."""

from __future__ import annotations

import json
import time

import pytest

from conftest import Client, Server
from push_service import PushService
from test_browser import browser, open_page  # noqa: F401 (fixtures)
from volli.push import generate_keys

pytestmark = pytest.mark.timeout(120)
SUBJECT = "mailto:ops@volli.app"


@pytest.fixture(scope="module")
def pushing(tmp_path_factory):
    private, public = generate_keys()
    service = PushService(public, SUBJECT)
    srv = Server(tmp_path_factory.mktemp("push"), {
        "VOLLI_VAPID_PRIVATE_KEY": private, "VOLLI_VAPID_SUBJECT": SUBJECT,
        "VOLLI_PUSH_SERVICES": service.url}).wait_ready()
    yield srv, service
    srv.stop()
    service.close()


JS_SUBSCRIBE = """
async ({url, subscription}) => {
  const m = await import("/volli-signaling.js");
  const sig = new m.VolliSignaling(url, {userId: "js-bob@x", pingInterval: 0,
                                         keyPair: await m.generateKeyPair()});
  await sig.connect();
  const reply = await sig.pushSubscribe(subscription);
  sig.close();
  return reply.type;
}
"""


def test_the_js_client_subscribes_and_a_held_offer_pushes(pushing, open_page):
    srv, service = pushing
    page = open_page(f"http://127.0.0.1:{srv.port}/health", "push")
    subscription = service.subscription("js-bob")
    assert page.evaluate(JS_SUBSCRIBE, {"url": srv.url, "subscription": subscription.json}) \
        == "push-subscribed"
    caller = Client(srv.url)
    try:
        caller.register("js-alice@x")
        deadline = time.monotonic() + 5
        while True:  # js-bob's close is released as soon as its socket closes
            caller.send({"type": "offer", "to": "js-bob@x", "hold": 20, "offer": {}})
            if caller.recv()["type"] == "held":
                break
            assert time.monotonic() < deadline
        push = service.wait(1)[0]
        assert push["payload"]["from"] == "js-alice@x" and push["name"] == "js-bob"
    finally:
        caller.close()


# The notifications the demo's service worker shows, once there is one (10 s at most).
NOTIFICATIONS = """
async () => {
  const registration = await navigator.serviceWorker.ready;
  for (let i = 0; i < 100; i++) {
    const list = await registration.getNotifications();
    if (list.length) return list.map((n) => ({title: n.title, body: n.body, data: n.data}));
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return [];
}
"""


def test_the_demo_service_worker_shows_a_pushed_call(pushing, browser):  # noqa: F811
    srv, _ = pushing
    origin = f"http://127.0.0.1:{srv.port}"
    context = browser.new_context()
    try:
        context.grant_permissions(["notifications"], origin=origin)
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        registrations = []
        cdp.on("ServiceWorker.workerRegistrationUpdated",
               lambda event: registrations.extend(event["registrations"]))
        cdp.send("ServiceWorker.enable")
        page.goto(f"{origin}/demo")
        page.wait_for_function("navigator.serviceWorker.ready.then(() => true)")
        deadline = time.monotonic() + 10
        while not any(r["scopeURL"] == f"{origin}/" for r in registrations):
            assert time.monotonic() < deadline, registrations
            page.wait_for_timeout(100)
        registration = next(r for r in registrations if r["scopeURL"] == f"{origin}/")
        call = {"type": "incoming-call", "from": "alice@x", "to": "bob@x",
                "expiresAt": int(time.time() * 1000) + 30000}
        cdp.send("ServiceWorker.deliverPushMessage", {
            "origin": origin, "registrationId": registration["registrationId"],
            "data": json.dumps(call)})
        shown = page.evaluate(NOTIFICATIONS)
        assert [n["title"] for n in shown] == ["alice@x is calling you"], shown
        assert shown[0]["data"] == call and "30" not in shown[0]["title"]
    finally:
        context.close()
