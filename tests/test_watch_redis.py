"""Presence subscriptions across workers and hosts: 2 gunicorn servers x 2 workers on a
real redis-server (and the cluster and Sentinel for the cross-server test)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis as redis_client

from conftest import DEPLOYMENTS, Client
from test_redis import _kill_worker_holding
from workers import spread_users

TARGET = "target@volli.app"


def presence_events(client: Client, until: float) -> list[tuple[str, bool]]:
    """The presence messages ``client`` gets until the monotonic time ``until``."""
    got = []
    while (left := until - time.monotonic()) > 0:
        try:
            message = client.recv(timeout=left)
        except TimeoutError:
            break
        assert message["type"] == "presence", message
        got.append((message["userId"], message["online"]))
    return got


def next_presence(client: Client, timeout: float) -> tuple[str, bool]:
    message = client.recv(timeout=timeout)
    assert message["type"] == "presence", message
    return message["userId"], message["online"]


def watch_all(watchers: dict[str, Client], *user_ids: str) -> list[dict]:
    replies = [c.call({"type": "watch", "userIds": list(user_ids)})
               for c in watchers.values()]
    assert all(r["type"] == "watching" for r in replies), replies
    return replies


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_a_change_on_one_worker_reaches_watchers_on_every_worker(nodes, open_client):
    servers = [nodes(VOLLI_PRESENCE_DEBOUNCE="1"), nodes(VOLLI_PRESENCE_DEBOUNCE="1")]
    watchers, _ = spread_users(servers, open_client, workers_total=4)
    for reply in watch_all(watchers, TARGET):
        assert reply["presence"] == [{"userId": TARGET, "online": False, "verified": False}]
    target = open_client(servers[0])
    target.register(TARGET)
    for watcher in watchers.values():
        assert next_presence(watcher, 5) == (TARGET, True)
    closed_at = time.monotonic()
    target.close()
    for watcher in watchers.values():
        assert next_presence(watcher, 6) == (TARGET, False)
    assert time.monotonic() - closed_at >= 1.0  # not before the debounce
    # A watcher that registers later is told where things stand.
    late = open_client(servers[1])
    late.register("late@volli.app")
    reply = late.call({"type": "watch", "userIds": [TARGET, *watchers]})
    assert [(p["userId"], p["online"]) for p in reply["presence"]] == \
        [(TARGET, False)] + [(user, True) for user in watchers]


def test_a_user_back_within_the_debounce_is_never_announced_offline(nodes, open_client):
    servers = [nodes(VOLLI_PRESENCE_DEBOUNCE="3"), nodes(VOLLI_PRESENCE_DEBOUNCE="3")]
    watchers, _ = spread_users(servers, open_client, workers_total=4)
    target = open_client(servers[0])
    target.register(TARGET)
    watch_all(watchers, TARGET)
    target.close()
    deadline = time.monotonic() + 5
    while True:  # back on the other server, as soon as its ID is free
        again = open_client(servers[1])
        if again.request({"type": "register", "userId": TARGET,
                          "publicKey": "cHVibGljLWtleQ=="})["type"] == "registered":
            break
        assert time.monotonic() < deadline, "the ID was not released"
        again.close()
    quiet_until = time.monotonic() + 4  # past the debounce
    for watcher in watchers.values():
        assert presence_events(watcher, quiet_until) == []
    again.close()  # and now gone for good
    for watcher in watchers.values():
        assert next_presence(watcher, 8) == (TARGET, False)


def watched_on_every_other_worker(nodes, open_client, ttl: float, debounce: float):
    """2 servers x 2 workers, a user on each worker; the other workers' users watch the
    first one. Returns (servers, {userId: client}, {userId: worker pid}, that user, the
    watchers)."""
    env = {"VOLLI_PRESENCE_TTL": str(ttl), "VOLLI_PRESENCE_DEBOUNCE": str(debounce)}
    servers = [nodes(**env), nodes(**env)]
    reps, pids = spread_users(servers, open_client, workers_total=4)
    watched = next(iter(reps))
    others = {u: c for u, c in reps.items() if pids[u] != pids[watched]}
    watch_all(others, watched)
    return servers, reps, pids, watched, others


def test_a_killed_workers_users_are_announced_offline_within_the_ttl(nodes, open_client):
    ttl = 2.0
    servers, reps, pids, victim_user, survivors = watched_on_every_other_worker(
        nodes, open_client, ttl, debounce=0.5)
    _kill_worker_holding(servers, pids, reps)
    killed_at = time.monotonic()
    for watcher in survivors.values():
        assert next_presence(watcher, ttl + 3) == (victim_user, False)
    print(f"announced offline {time.monotonic() - killed_at:.1f}s after the kill")
    assert time.monotonic() - killed_at < ttl + 1.5


def test_unwatch_and_a_closed_watcher_stop_the_events_and_expire_in_redis(
        nodes, open_client, redis):
    ttl = 2.0
    env = {"VOLLI_PRESENCE_TTL": str(ttl), "VOLLI_PRESENCE_DEBOUNCE": "0"}
    a, b = nodes(workers=1, **env), nodes(workers=1, **env)
    stays, leaves = open_client(a), open_client(b)
    stays.register("stays@volli.app")
    leaves.register("leaves@volli.app")
    watch_all({"s": stays, "l": leaves}, TARGET)
    store = redis_client.Redis.from_url(redis.url)
    key = f"{nodes.prefix}watch:{TARGET}"
    assert store.zcard(key) == 2  # one entry per watching node
    reply = stays.call({"type": "unwatch", "userIds": [TARGET]})
    assert (reply["type"], reply["userIds"]) == ("unwatched", [TARGET])
    leaves.close()
    target = open_client(a)
    target.register(TARGET)
    assert presence_events(stays, time.monotonic() + 1.5) == []
    # Neither node renews its entry any more: it expires with the TTL.
    deadline = time.monotonic() + ttl + 2
    while store.exists(key):
        assert time.monotonic() < deadline, store.zrange(key, 0, -1, withscores=True)
        time.sleep(0.1)


def test_a_stalled_worker_is_announced_offline_then_online_when_it_resumes(
        nodes, open_client):
    """SIGSTOP for longer than half a TTL: the worker's heartbeat (its alive key) lapses
    and watchers announce its user offline; its presence is still there when it resumes,
    and no script runs then: the watchers' heartbeat finds it beating again."""
    ttl = 4.0
    _, reps, pids, stalled_user, survivors = watched_on_every_other_worker(
        nodes, open_client, ttl, debounce=0.2)
    os.kill(pids[stalled_user], signal.SIGSTOP)
    try:
        for watcher in survivors.values():
            assert next_presence(watcher, ttl) == (stalled_user, False)
    finally:
        os.kill(pids[stalled_user], signal.SIGCONT)
    for watcher in survivors.values():
        assert next_presence(watcher, ttl) == (stalled_user, True)
    assert reps[stalled_user].call({"type": "ping"})["type"] == "pong"  # it lived on


def test_watchers_learn_the_truth_after_redis_restarted_empty(nodes, open_client, redis):
    """The store forgets every watch and presence: a user who leaves meanwhile (its
    release finds no watchers to tell) is still announced offline, and one who comes back
    is announced online, once the watching node has looked its users up again."""
    env = {"VOLLI_PRESENCE_TTL": "2", "VOLLI_PRESENCE_DEBOUNCE": "0"}
    a, b = nodes(workers=1, **env), nodes(workers=1, **env)
    watcher, leaver = open_client(a), open_client(b)
    watcher.register("watcher@volli.app")
    leaver.register("leaver@volli.app")
    assert watcher.call({"type": "watch", "userIds": ["leaver@volli.app", TARGET]})[
        "presence"][0]["online"] is True
    redis.restart_empty()
    leaver.close()
    assert next_presence(watcher, 8) == ("leaver@volli.app", False)
    deadline = time.monotonic() + 8
    while True:  # registrations are refused during the recovery window
        target = open_client(b)
        if target.request({"type": "register", "userId": TARGET,
                           "publicKey": "cHVibGljLWtleQ=="})["type"] == "registered":
            break
        assert time.monotonic() < deadline, "still refused after the recovery window"
        target.close()
        time.sleep(0.2)
    assert next_presence(watcher, 8) == (TARGET, True)


def test_a_presence_gone_without_a_release_is_announced_offline(nodes, open_client, redis):
    """A release that failed leaves the presence to expire by its TTL while its node goes on
    beating: no script runs, yet watchers must not believe the user online for ever."""
    env = {"VOLLI_PRESENCE_TTL": "2", "VOLLI_PRESENCE_DEBOUNCE": "0"}
    a, b = nodes(workers=1, **env), nodes(workers=1, **env)
    watcher, target = open_client(a), open_client(b)
    watcher.register("watcher@volli.app")
    target.register(TARGET)
    assert watcher.call({"type": "watch", "userIds": [TARGET]})["presence"][0]["online"]
    store = redis_client.Redis.from_url(redis.url)
    store.delete(f"{nodes.prefix}presence:{TARGET}")  # as if it had expired
    target.close()  # its release then finds nothing to delete, and announces nothing
    assert next_presence(watcher, 5) == (TARGET, False)
