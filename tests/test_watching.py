"""Presence subscriptions without I/O: the watch table (volli/watching.py), the watch
messages (volli/protocol), and the hub's rules over the in-memory backend with a clock
the test moves."""

import json

import pytest

from test_hub import RecordingSession
from volli.backends import BackendUnavailable, MemoryBackend
from volli.config import Settings
from volli.hub import Hub
from volli.protocol import ProtocolError, Unwatch, Watch, parse
from volli.protocol.messages import WATCH_IDS_MAX
from volli.watching import Watching


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make_hub(clock, **settings):
    """A hub over the in-memory backend, both on ``clock``, with small limits."""
    base = {"presence_debounce": 3.0, "watch_max": 4, "watch_per_minute": 5}
    return Hub(Settings(**{**base, **settings}),
               lambda events: MemoryBackend(events=events, clock=clock), clock=clock)


@pytest.fixture
def hub(clock):
    return make_hub(clock)


def join(hub, user_id):
    session = RecordingSession()
    hub.connect(session)
    hub.receive_text(session, json.dumps({"type": "register", "userId": user_id,
                                          "publicKey": "AAAA"}))
    assert session.sent[1]["type"] == "registered"  # (frames held for it may follow)
    return session


def leave(hub, session):
    session.close(1000)
    hub.disconnect(session)


def watch(hub, session, *user_ids, request_id=None):
    message = {"type": "watch", "userIds": list(user_ids)}
    if request_id is not None:
        message["requestId"] = request_id
    hub.receive_text(session, json.dumps(message))
    return session.last()


def presence_events(session):
    return [(m["userId"], m["online"]) for m in session.sent if m["type"] == "presence"]


# -- messages ---------------------------------------------------------------------------

def test_watch_and_unwatch_parse_distinct_ids_in_order():
    assert parse('{"type":"watch","userIds":["b","a","b"],"requestId":7}') == \
        Watch(["b", "a"], 7)
    assert parse('{"type":"unwatch","userIds":["a"]}') == Unwatch(["a"])


@pytest.mark.parametrize("body, code", [
    ({}, "invalid-message"),
    ({"userIds": []}, "invalid-message"),
    ({"userIds": "alice"}, "invalid-message"),
    ({"userIds": [1]}, "invalid-message"),
    ({"userIds": ["ok", " padded"]}, "invalid-user-id"),
    ({"userIds": ["a"] * (WATCH_IDS_MAX + 1)}, "invalid-message"),
])
def test_bad_watch_lists_are_refused_with_their_code(body, code):
    with pytest.raises(ProtocolError) as caught:
        parse(json.dumps({"type": "watch", **body, "requestId": "r"}))
    assert caught.value.code == code and caught.value.request_id == "r"


# -- the table --------------------------------------------------------------------------

def test_an_offline_within_the_debounce_is_never_told():
    table, alice = Watching(debounce=3.0), RecordingSession()
    table.add(alice, ["bob"])
    table.settle({"bob": True})
    assert table.changed("bob", False, now=10.0) == []
    assert table.changed("bob", True, now=12.9) == []  # back in time: nothing to tell
    assert table.due(now=20.0) == []
    assert table.told("bob") is True


def test_an_offline_that_lasts_is_told_once_then_online_again():
    table, alice = Watching(debounce=3.0), RecordingSession()
    table.add(alice, ["bob"])
    table.settle({"bob": True})
    table.changed("bob", False, now=10.0)
    table.changed("bob", False, now=11.0)  # a repeat does not move the deadline
    assert table.due(now=12.9) == []
    assert table.due(now=13.0) == [("bob", [alice])]
    assert table.due(now=99.0) == []
    assert table.changed("bob", True, now=14.0) == [alice]
    assert table.changed("bob", True, now=15.0) == []


def test_a_change_reported_during_the_lookup_wins_over_the_lookup():
    table, alice = Watching(debounce=3.0), RecordingSession()
    assert table.add(alice, ["bob"]) == (["bob"], ["bob"])
    assert table.changed("bob", True, now=1.0) == []  # nobody was told anything yet
    table.settle({"bob": False})  # the lookup began before bob registered
    assert table.told("bob") is True


def test_watchers_share_a_user_and_the_last_one_out_unwatches_it():
    table, alice, carol = Watching(debounce=0.0), RecordingSession(), RecordingSession()
    table.add(alice, ["bob", "dave"])
    assert table.add(carol, ["bob"]) == (["bob"], [])
    table.settle({"bob": False, "dave": False})
    assert sorted(s.id for s in table.changed("bob", True, now=1.0)) == \
        sorted([alice.id, carol.id])
    assert table.drop(alice) == ["dave"]
    assert table.remove(carol, ["bob", "never"]) == ["bob"]
    assert table.told("bob") is None and table.count(carol) == 0


# -- the hub ----------------------------------------------------------------------------

def test_watching_reports_presence_then_changes_are_pushed(hub, clock):
    alice, bob = join(hub, "alice"), join(hub, "bob")
    assert watch(hub, alice, "bob", "carol", request_id="w1") == {
        "type": "watching", "requestId": "w1", "presence": [
            {"userId": "bob", "online": True, "verified": False},
            {"userId": "carol", "online": False, "verified": False}]}
    carol = join(hub, "carol")
    assert alice.last() == {"type": "presence", "userId": "carol", "online": True}
    leave(hub, carol)
    clock.now += 2.9
    hub.announce_due()
    assert presence_events(alice) == [("carol", True)]
    clock.now += 0.2
    hub.announce_due()
    assert presence_events(alice) == [("carol", True), ("carol", False)]
    assert hub.metrics["presence-events"] == 2
    assert presence_events(bob) == []


def test_a_reconnect_within_the_debounce_is_not_announced(hub, clock):
    alice, bob = join(hub, "alice"), join(hub, "bob")
    watch(hub, alice, "bob")
    leave(hub, bob)
    clock.now += 1.0
    bob = join(hub, "bob")
    clock.now += 10.0
    hub.announce_due()
    assert presence_events(alice) == []


def test_unwatch_and_close_stop_the_events(hub, clock):
    alice, carol = join(hub, "alice"), join(hub, "carol")
    watch(hub, alice, "bob")
    watch(hub, carol, "bob")
    hub.receive_text(alice, '{"type":"unwatch","userIds":["bob","zed"],"requestId":2}')
    assert alice.last() == {"type": "unwatched", "userIds": ["bob", "zed"], "requestId": 2}
    leave(hub, carol)
    join(hub, "bob")
    assert presence_events(alice) == presence_events(carol) == []
    assert hub.watching.told("bob") is None  # nobody watches it here any more


def test_the_watched_ids_cap_and_the_watch_rate_are_rate_limited(hub):
    alice = join(hub, "alice")
    assert watch(hub, alice, "a", "b", "c")["type"] == "watching"
    assert watch(hub, alice, "a", "b", "c", "d")["type"] == "watching"  # 4: the cap
    refused = watch(hub, alice, "e", request_id=9)
    assert refused == {"type": "error", "code": "rate-limited", "limit": "watched-ids",
                       "max": 4, "retryAfter": 0, "requestId": 9,
                       "message": "a connection may watch at most 4 user IDs; unwatch some "
                                  "first"}
    assert hub.watching.count(alice) == 4
    watch(hub, alice, "a")
    watch(hub, alice, "a")  # the fifth watch request within the minute
    limited = watch(hub, alice, "a")
    assert limited["code"] == "rate-limited" and limited["limit"] == "watch-rate"


def test_watch_needs_a_registered_connection(hub):
    session = RecordingSession()
    hub.connect(session)
    hub.receive_text(session, '{"type":"watch","userIds":["bob"]}')
    assert session.last()["code"] == "not-registered"


def test_a_store_that_fails_the_watch_leaves_nothing_watched(clock):
    class Failing(MemoryBackend):
        def watch(self, user_ids):
            raise BackendUnavailable("down")

    hub = Hub(Settings(), lambda events: Failing(events=events), clock=clock)
    alice = join(hub, "alice")
    assert watch(hub, alice, "bob")["code"] == "unavailable"
    assert hub.watching.count(alice) == 0 and hub.watching.told("bob") is None
