"""Web Push wake-up against a real push service (tests/push_service.py): it verifies each
push's VAPID JWT and decrypts its payload with the subscription's private key, as a push
service and a browser would. On a real gunicorn server, with either backend."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from push_service import PushService
from signing import Identity
from volli.push import generate_keys

SUBJECT = "mailto:ops@volli.app"


@pytest.fixture
def push(make_server):
    private, public = generate_keys()
    service = PushService(public, SUBJECT)
    srv = make_server({"VOLLI_VAPID_PRIVATE_KEY": private, "VOLLI_VAPID_SUBJECT": SUBJECT,
                       "VOLLI_PUSH_SERVICES": service.url, "VOLLI_PUSH_MAX_PER_USER": "2"})
    yield srv, service, public
    service.close()


def signed(open_client, srv, user_id: str):
    client = open_client(srv)
    assert Identity().register(client, user_id)["type"] == "registered"
    return client


def subscribe(client, subscription) -> dict:
    return client.call({"type": "push-subscribe", "subscription": subscription})


def hold_for(open_client, srv, caller: str, callee: str) -> None:
    client = open_client(srv)
    client.register(caller)
    client.send({"type": "offer", "to": callee, "hold": 30,
                 "offer": {"type": "offer", "sdp": "v=0\r\na=fingerprint:sha-256 AA"}})
    assert client.recv()["type"] == "held"
    client.send({"type": "ice-candidate", "to": callee,
                 "candidate": {"candidate": "candidate:1 1 udp 1 192.0.2.7 5000 typ host"}})


def test_a_held_offer_wakes_the_callee_through_its_push_subscriptions(push, open_client):
    srv, service, public = push
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/push/vapid-public-key") as r:
        assert json.loads(r.read()) == {"publicKey": public}
    bob = signed(open_client, srv, "bob@volli.app")
    phone, gone = service.subscription("phone"), service.subscription("gone")
    service.status["gone"] = 410  # its browser unsubscribed
    for sub in (phone, gone):
        assert subscribe(bob, sub.json)["type"] == "push-subscribed"
    bob.close()
    before = time.time()
    hold_for(open_client, srv, "alice@volli.app", "bob@volli.app")
    pushes = service.wait(2)
    by_name = {p["name"]: p for p in pushes}
    payload = by_name["phone"]["payload"]
    assert payload["type"] == "incoming-call" and payload["from"] == "alice@volli.app"
    assert payload["to"] == "bob@volli.app"
    assert before + 29 <= payload["expiresAt"] / 1000 <= time.time() + 31
    assert by_name["phone"]["ttl"] == 30
    text = json.dumps(pushes)
    assert "v=0" not in text and "fingerprint" not in text and "192.0.2.7" not in text
    # The gone subscription was removed: the next held offer pushes to the phone only.
    hold_for(open_client, srv, "carol@volli.app", "bob@volli.app")
    pushes = service.wait(3)
    time.sleep(0.5)
    assert [p["name"] for p in service.received[2:]] == ["phone"], service.received
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics") as r:
        metrics = r.read().decode()
    assert 'volli_pushes_total{outcome="sent"} 2.0' in metrics
    assert 'volli_pushes_total{outcome="gone"} 1.0' in metrics


def test_subscriptions_are_bounded_and_unsubscribe_works(push, open_client):
    srv, service, _ = push
    bob = signed(open_client, srv, "bob@volli.app")
    subs = [service.subscription(f"s{n}") for n in range(3)]
    for sub in subs:  # VOLLI_PUSH_MAX_PER_USER=2: the oldest goes
        assert subscribe(bob, sub.json)["type"] == "push-subscribed"
    reply = bob.call({"type": "push-unsubscribe", "endpoint": subs[2].json["endpoint"]})
    assert reply["type"] == "push-unsubscribed"
    bob.close()
    hold_for(open_client, srv, "alice@volli.app", "bob@volli.app")
    service.wait(1)
    time.sleep(0.5)
    assert [p["name"] for p in service.received] == ["s1"]


def test_bad_and_unsigned_subscriptions_are_refused(push, open_client):
    srv, service, _ = push
    good = service.subscription("x").json
    unsigned = open_client(srv)
    unsigned.register("plain@volli.app")
    assert subscribe(unsigned, good)["code"] == "signature-required"
    bob = signed(open_client, srv, "bob@volli.app")
    elsewhere = {**good, "endpoint": "https://evil.example/push/x"}
    for bad in (elsewhere, {**good, "keys": {**good["keys"], "auth": "AAAA"}},
                {**good, "keys": {**good["keys"], "p256dh": good["keys"]["auth"]}},
                {"endpoint": good["endpoint"]}, "nope",
                {**good, "endpoint": "ftp://127.0.0.1/x"}):
        assert subscribe(bob, bad)["code"] == "invalid-message", bad


def test_without_a_vapid_key_push_is_off(make_server, open_client):
    srv = make_server()
    bob = signed(open_client, srv, "bob@volli.app")
    sub = {"endpoint": "https://fcm.googleapis.com/fcm/send/x",
           "keys": {"p256dh": "B" + "A" * 86, "auth": "A" * 22}}
    assert subscribe(bob, sub)["code"] == "push-disabled"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/push/vapid-public-key")
    assert caught.value.code == 404


def test_a_subscription_made_on_one_server_is_pushed_from_another(nodes, open_client):
    """2 servers x 2 workers sharing Redis: the callee subscribes on one, the offer is held
    on the other, which sends the push."""
    private, public = generate_keys()
    service = PushService(public, SUBJECT)
    try:
        env = {"VOLLI_VAPID_PRIVATE_KEY": private, "VOLLI_VAPID_SUBJECT": SUBJECT,
               "VOLLI_PUSH_SERVICES": service.url}
        a, b = nodes(**env), nodes(**env)
        bob = signed(open_client, a, "bob@volli.app")
        assert subscribe(bob, service.subscription("phone").json)["type"] == "push-subscribed"
        bob.close()
        hold_for(open_client, b, "alice@volli.app", "bob@volli.app")
        assert service.wait(1)[0]["payload"]["from"] == "alice@volli.app"
    finally:
        service.close()
