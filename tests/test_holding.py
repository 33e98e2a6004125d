"""Offers held for an offline callee, without I/O: the hub's rules over the in-memory
backend with a clock the test moves (the Redis store: tests/test_hold_redis.py)."""

import json

import pytest

from test_watching import Clock, join, leave
from test_watching import make_hub as watching_hub
from volli.protocol import ProtocolError, parse


@pytest.fixture
def clock():
    return Clock()


def make_hub(clock, **settings):
    return watching_hub(clock, **{"hold_max": 60, "hold_per_caller": 2, "hold_per_callee": 2,
                                  "hold_candidates": 2, "hold_bytes": 4096, **settings})


@pytest.fixture
def hub(clock):
    return make_hub(clock)


def offer(hub, session, to, hold=None, sdp="v=0", **extra):
    message = {"type": "offer", "to": to, "offer": {"type": "offer", "sdp": sdp}, **extra}
    if hold is not None:
        message["hold"] = hold
    hub.receive_text(session, json.dumps(message))


def candidate(hub, session, to, text):
    hub.receive_text(session, json.dumps({"type": "ice-candidate", "to": to,
                                          "candidate": {"candidate": text}}))


def test_hold_is_an_offers_whole_number_of_seconds():
    assert parse('{"type":"offer","to":"b","offer":{},"hold":30}').hold == 30
    assert parse('{"type":"answer","to":"b","answer":{},"hold":30}').hold is None
    for bad in ('"30"', "0", "-1", "1.5", "true", "86401"):
        with pytest.raises(ProtocolError) as caught:
            parse('{"type":"offer","to":"b","offer":{},"hold":%s}' % bad)
        assert caught.value.code == "invalid-message"


def test_a_held_offer_and_its_candidates_reach_the_callee_when_it_registers(hub, clock):
    alice = join(hub, "alice")
    offer(hub, alice, "bob", hold=30, requestId="o1")
    assert alice.last() == {"type": "held", "to": "bob", "expiresIn": 30, "requestId": "o1"}
    candidate(hub, alice, "bob", "c1")
    candidate(hub, alice, "bob", "c2")
    assert len(alice.sent) == 3  # hello, registered, held: candidates held quietly
    clock.now += 2.5
    bob = join(hub, "bob")
    got = bob.sent[2:]
    assert [m["type"] for m in got] == ["offer", "ice-candidate", "ice-candidate"]
    assert all(m["from"] == "alice" and m["heldFor"] == 2500 for m in got)
    assert got[0]["offer"] == {"type": "offer", "sdp": "v=0"} and got[0]["hold"] == 30
    assert [m["candidate"]["candidate"] for m in got[1:]] == ["c1", "c2"]
    assert alice.last() == {"type": "delivered", "to": "bob"}
    clock.now += 60
    hub.announce_due()
    assert alice.last() == {"type": "delivered", "to": "bob"}  # no expired after delivery
    assert hub.metrics["held-delivered"] == 1


def test_an_offer_not_taken_in_time_expires_and_the_caller_is_told(hub, clock):
    alice = join(hub, "alice")
    offer(hub, alice, "bob", hold=600)  # cut to VOLLI_HOLD_MAX
    assert alice.last()["expiresIn"] == 60
    clock.now += 59.9
    hub.announce_due()
    assert alice.last()["type"] == "held"
    clock.now += 0.2
    hub.announce_due()
    assert alice.last() == {"type": "expired", "to": "bob"}
    bob = join(hub, "bob")
    assert [m["type"] for m in bob.sent] == ["hello", "registered"]


def test_a_caller_who_leaves_cancels_its_offers(hub, clock):
    alice = join(hub, "alice")
    offer(hub, alice, "bob", hold=30)
    leave(hub, alice)
    bob = join(hub, "bob")
    assert [m["type"] for m in bob.sent] == ["hello", "registered"]


def test_a_new_offer_replaces_the_held_one_and_its_candidates(hub, clock):
    alice = join(hub, "alice")
    offer(hub, alice, "bob", hold=30, sdp="first")
    candidate(hub, alice, "bob", "c1")
    offer(hub, alice, "bob", hold=30, sdp="second")
    bob = join(hub, "bob")
    assert [m.get("offer", {}).get("sdp") for m in bob.sent[2:]] == ["second"]


def test_an_offer_to_an_online_callee_is_relayed_as_it_is(hub):
    alice, bob = join(hub, "alice"), join(hub, "bob")
    offer(hub, alice, "bob", hold=30)
    assert bob.last()["hold"] == 30 and "heldFor" not in bob.last()
    assert alice.last()["type"] == "registered"


def test_the_server_stamps_held_for(hub, clock):
    alice = join(hub, "alice")
    for key in ("heldFor", "HELDFOR"):  # the server's key: a caller may not write it
        offer(hub, alice, "bob", hold=30, **{key: 999999})
        assert alice.last()["code"] == "invalid-message"
    offer(hub, alice, "bob", hold=30)
    clock.now += 1
    bob = join(hub, "bob")
    assert bob.sent[2]["heldFor"] == 1000


def test_the_limits_of_holding(hub, clock):
    alice, carol, dave = join(hub, "alice"), join(hub, "carol"), join(hub, "dave")
    offer(hub, alice, "bob", hold=30)
    offer(hub, alice, "erin", hold=30)
    offer(hub, alice, "frank", hold=30, requestId=3)
    assert alice.last() == {"type": "error", "code": "rate-limited", "limit": "held-offers",
                            "max": 2, "retryAfter": 0, "requestId": 3,
                            "message": "held-offers limit (2) reached: nothing more is held "
                                       "for 'frank'"}
    offer(hub, carol, "bob", hold=30)
    offer(hub, dave, "bob", hold=30)  # a third caller for bob
    assert dave.last()["limit"] == "held-for-peer"
    candidate(hub, alice, "bob", "c1")
    candidate(hub, alice, "bob", "c2")
    candidate(hub, alice, "bob", "c3")
    assert alice.last()["limit"] == "held-candidates"
    offer(hub, carol, "erin", hold=30, sdp="x" * 4000)
    assert carol.last()["limit"] == "held-bytes"
    candidate(hub, dave, "bob", "no offer held")
    assert dave.last()["code"] == "peer-offline"


def test_holding_can_be_switched_off(clock):
    hub = make_hub(clock, hold_max=0)
    alice = join(hub, "alice")
    offer(hub, alice, "bob", hold=30)
    assert alice.last()["code"] == "peer-offline"


def test_a_callee_after_the_expiry_gets_nothing_and_the_caller_is_still_told(hub, clock):
    """Between an offer's expiry and the caller's next tick, neither a registering callee
    nor another caller's offer may take the expired offer away unseen."""
    alice, carol = join(hub, "alice"), join(hub, "carol")
    offer(hub, alice, "bob", hold=10)
    clock.now += 10.1
    offer(hub, carol, "bob", hold=10)
    bob = join(hub, "bob")
    assert [m["from"] for m in bob.sent[2:]] == ["carol"]
    hub.announce_due()
    assert alice.last() == {"type": "expired", "to": "bob"}
    assert carol.last() == {"type": "delivered", "to": "bob"}
