"""Regression test of a second attack on 1784929 (issue 12), which failed there and passes
now; what follows describes the bug as it was found.

ATTACK2 K: the fix for "a timed-out claim leaves a ghost" keeps the failed give-back
(userId, session) in `_unreleased`, and a later claim by the same session drops every
entry kept for that session (volli/backends/redis.py claim() -> _drop_kept_releases,
which matches on the session id only, not on the userId). So a connection whose register
of U lost its reply (the script ran) while the node was cut off from Redis, and which then
registers ANOTHER ID V (refused `unavailable` too, or accepted), makes the node forget
U's give-back: once Redis answers again, U stays online, held by a session that holds
nothing, until the presence TTL runs out; U's owner gets `user-id-taken` from the ghost.
With the same ID retried, the give-back is re-queued and nothing is left (control).

In-process against a real redis-server; the faults are injected at the client: a claim
whose script ran but whose reply was lost (ConnectionError after the script), then Redis
unreachable for this node (releases and the next claim fail), then reachable again.
"""

from __future__ import annotations

import secrets

import pytest
import redis as redis_client

from volli.backends import BackendUnavailable, Claim
from volli.backends.redis import RedisBackend
from volli.config import load


class FakeSession:
    def __init__(self) -> None:
        self.id = secrets.token_hex(8)
        self.user_id = self.public_key = None
        self.signed = False
        self.encryption_key = None
        self.remote_addr = "127.0.0.1"
        self.nonce = ""
        self.closed = False

    def send(self, text, origin=None):
        return True

    def close(self, code, reason=""):
        self.closed = True


def make_backend(redis) -> RedisBackend:
    settings = load({}, {"redis_url": redis.url, "presence_ttl": 60.0, "redis_prefix": "kr:"})
    backend = RedisBackend(settings)
    backend.heartbeat.beat()  # what start() does: adopt the store's epoch
    return backend


def faulty_run(backend, real):
    """The script runs, then its reply is lost."""
    def run(keys, args, client=None):
        real(keys=keys, args=args)
        raise redis_client.ConnectionError("reply lost")
    return run


def unreachable(keys, args, client=None):
    raise redis_client.ConnectionError("redis unreachable")


def run_case(redis, second_id: str) -> tuple[dict, Claim]:
    store = redis_client.Redis.from_url(redis.url)
    store.flushall()
    backend = make_backend(redis)
    real_claim, real_quick = backend.presence._claim, backend.presence._quick
    dead = redis_client.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    s = FakeSession()
    # 1. register U: the script ran, the reply was lost; this node is cut off from Redis.
    backend.presence._claim = faulty_run(backend, real_claim)
    backend.presence._quick = dead
    with pytest.raises(BackendUnavailable):
        backend.claim(s, "u@x", "QQ==", False)
    # 2. the client (still unregistered) registers again while Redis is unreachable.
    backend.presence._claim = unreachable
    with pytest.raises(BackendUnavailable):
        backend.claim(s, second_id, "QQ==", False)
    # 3. Redis answers again: the node's next release run (a close, a claim, the heartbeat).
    backend.presence._claim, backend.presence._quick = real_claim, real_quick
    backend.presence.release_queued()
    presence = {k.decode(): v.decode() for k, v in store.hgetall("kr:presence:u@x").items()}
    owner = FakeSession()
    backend.heartbeat.beat()  # no heartbeat greenlet here: stamp the epoch as it would
    return presence, (presence.get("session") == s.id and s.user_id is None,
                      backend.claim(owner, "u@x", "QQ==", False), store.pttl("kr:presence:u@x"))


def test_same_id_retried_leaves_no_ghost(redis):  # control: passes
    presence, (ghost, owner, pttl) = run_case(redis, "u@x")
    print("same id:", presence, ghost, owner, pttl)
    assert not ghost and owner is Claim.OK


def test_other_id_leaves_a_ghost(redis):
    presence, (ghost, owner, pttl) = run_case(redis, "v@x")
    print("other id:", presence, ghost, owner, pttl)
    assert not ghost, (f"u@x is held by a session that holds nothing ({presence}); its owner "
                       f"gets {owner} for {pttl} ms more")
