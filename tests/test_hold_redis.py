"""Offers held for an offline callee across workers and hosts: 2 gunicorn servers x 2
workers on a real redis-server (and the cluster and Sentinel for the cross-server test). The held
offer lives in Redis: the callee may come back anywhere, even on a server started after
the offer was held."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis as redis_client

from conftest import Client
from workers import worker_of
from volli.backends import Claim

CALLEE = "callee@volli.app"
OFFER = {"type": "offer", "sdp": "v=0 held"}


def hold_offer(caller: Client, seconds: int = 30) -> dict:
    caller.send({"type": "offer", "to": CALLEE, "offer": OFFER, "hold": seconds,
                 "requestId": "h1"})
    reply = caller.recv()
    assert reply == {"type": "held", "to": CALLEE, "expiresIn": seconds, "requestId": "h1"}
    for n in range(3):
        caller.send({"type": "ice-candidate", "to": CALLEE, "candidate": {"candidate": f"c{n}"}})
    caller.send({"type": "ping", "requestId": "p"})  # candidates are held without a reply
    assert caller.recv() == {"type": "pong", "requestId": "p"}
    return reply


def register_callee(client: Client) -> list[dict]:
    """Register the callee; the frames held for it that follow ``registered``."""
    client.send({"type": "register", "userId": CALLEE, "publicKey": "cHVibGljLWtleQ=="})
    assert client.recv()["type"] == "registered"
    got = []
    while True:
        try:
            got.append(client.recv(timeout=1.0))
        except TimeoutError:
            return got


@pytest.mark.parametrize("deployment", ("single", "cluster"), indirect=True)
def test_a_held_offer_reaches_the_callee_on_another_server(nodes, open_client):
    a, b = nodes(), nodes()  # 2 servers x 2 workers
    caller = open_client(a)
    caller.register("caller@volli.app")
    hold_offer(caller)
    time.sleep(0.5)
    got = register_callee(open_client(b))
    assert [m["type"] for m in got] == ["offer", "ice-candidate", "ice-candidate",
                                        "ice-candidate"], got
    assert all(m["from"] == "caller@volli.app" and 500 <= m["heldFor"] < 5000 for m in got)
    assert got[0]["offer"] == OFFER
    assert [m["candidate"]["candidate"] for m in got[1:]] == ["c0", "c1", "c2"]
    assert caller.recv(timeout=5) == {"type": "delivered", "to": CALLEE}


def test_held_offers_outlive_the_server_the_callee_comes_back_to(nodes, open_client, redis):
    a = nodes()
    caller = open_client(a)
    caller.register("caller@volli.app")
    hold_offer(caller)
    store = redis_client.Redis.from_url(redis.url)
    assert store.hlen(f"{nodes.prefix}held:{CALLEE}") == 1
    late = nodes(workers=2)  # started after the offer was held
    got = register_callee(open_client(late))
    assert [m["type"] for m in got][:1] == ["offer"] and len(got) == 4
    assert caller.recv(timeout=5)["type"] == "delivered"
    assert not store.exists(f"{nodes.prefix}held:{CALLEE}")


def test_expiry_and_cancellation(nodes, open_client, redis):
    a, b = nodes(), nodes()
    caller = open_client(a)
    caller.register("caller@volli.app")
    hold_offer(caller, seconds=2)
    assert caller.recv(timeout=4) == {"type": "expired", "to": CALLEE}
    assert register_callee(open_client(b)) == []
    # A caller who leaves takes its offers with it.
    store = redis_client.Redis.from_url(redis.url)
    other = "other@volli.app"
    leaver = open_client(a)
    leaver.register("leaver@volli.app")
    leaver.send({"type": "offer", "to": other, "offer": OFFER, "hold": 30})
    assert leaver.recv()["type"] == "held"
    assert store.hlen(f"{nodes.prefix}held:{other}") == 1
    leaver.close()
    deadline = time.monotonic() + 5
    while store.hlen(f"{nodes.prefix}held:{other}"):
        assert time.monotonic() < deadline, "a departed caller's offer is still held"
        time.sleep(0.05)
    callee = open_client(b)
    assert callee.request({"type": "register", "userId": other,
                           "publicKey": "cHVibGljLWtleQ=="})["type"] == "registered"
    with pytest.raises(TimeoutError):
        callee.recv(timeout=1)


def test_per_callee_limit_is_shared_by_every_server(nodes, open_client):
    a, b = nodes(VOLLI_HOLD_PER_CALLEE="2"), nodes(VOLLI_HOLD_PER_CALLEE="2")
    replies = []
    for n, srv in enumerate((a, b, a)):
        caller = open_client(srv)
        caller.register(f"caller{n}@volli.app")
        caller.send({"type": "offer", "to": CALLEE, "offer": OFFER, "hold": 30})
        replies.append(caller.recv())
    assert [r["type"] for r in replies] == ["held", "held", "error"]
    assert replies[2]["limit"] == "held-for-peer"


def test_a_killed_callers_offer_is_not_delivered(nodes, open_client):
    """The caller's worker dies (no close, so no cancel): once its heartbeat has stopped,
    the callee who registers gets nothing from it, and another caller's offer still."""
    ttl = 2.0
    a, b = nodes(VOLLI_PRESENCE_TTL=str(ttl)), nodes(VOLLI_PRESENCE_TTL=str(ttl))
    doomed, alive = open_client(a), open_client(b)
    doomed.register("doomed@volli.app")
    alive.register("alive@volli.app")
    for caller in (doomed, alive):
        caller.send({"type": "offer", "to": CALLEE, "offer": OFFER, "hold": 30})
        assert caller.recv()["type"] == "held"
    deadline = time.monotonic() + 5
    while "doomed@volli.app" not in worker_of([a]):  # its registration's log line
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(worker_of([a])["doomed@volli.app"], signal.SIGKILL)
    time.sleep(ttl / 2 + 0.5)  # its alive key has expired
    got = register_callee(open_client(b))
    assert [(m["type"], m["from"]) for m in got] == [("offer", "alive@volli.app")]
    assert alive.recv(timeout=5) == {"type": "delivered", "to": CALLEE}


def test_a_registration_with_nothing_held_makes_no_take_round_trip(redis):
    """The register script says whether offers are held for the user (issue 16's storm
    path): with none, the hub's take costs no second script; with some, they are taken.
    In-process against a real redis-server, counting the take script's calls."""
    from test_attack2_kept_release_other_id import FakeSession, make_backend
    backend = make_backend(redis)
    takes = []
    real_take = backend.held._take

    def counting(keys, args, client=None):
        takes.append(keys[0])
        return real_take(keys=keys, args=args)
    backend.held._take = counting
    alice, bob = FakeSession(), FakeSession()
    assert backend.claim(alice, "alice@x", "QQ==", False) is Claim.OK
    assert backend.take_held("alice@x") == [] and takes == []  # spared
    backend.hold(alice, "bob@x", '{"type":"offer","from":"alice@x"}', 30, 8)
    assert backend.claim(bob, "bob@x", "Qg==", False) is Claim.OK
    offers = backend.take_held("bob@x")
    assert [o.caller for o in offers] == ["alice@x"] and len(takes) == 1
    assert backend.take_held("bob@x") == [] and len(takes) == 2  # only once spared
