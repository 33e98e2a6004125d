"""Presence and routing shared through Redis, for many workers and hosts.

Each worker is a node with its own pub/sub channel. A user's presence is a hash
``<prefix>presence:<userId>`` {node, session, publicKey} with a TTL that the node's
heartbeat renews while it still names this node's session (every change to it is a
compare-and-set on the session id); ``<prefix>key:<userId>`` keeps a signed user's bound
key with the binding retention as its TTL, renewed by each registration and each close;
``<prefix>epoch`` tells a store that lost its state, so that live users are announced
again before anyone may take their IDs.
Local users are served from memory (the MemoryBackend this extends) without touching
Redis; a relay to a user on another node is published to that node's channel by a
script that reads the presence and publishes in one round trip. That script also names
the node, which is then remembered for ROUTE_CACHE seconds: relays to a remembered node
are queued, and one greenlet publishes each node's queue as one message per round trip.
See docs/scaling.md.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter

import orjson
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..protocol import ProtocolError
from .base import (
    NO_EVENTS, BackendEvents, BackendUnavailable, Claim, Presence, Released, Session, Spawn,
    local_refusal, nothing,
)
from .memory import MemoryBackend

log = logging.getLogger("volli.redis")

# The store's epoch: a hash <prefix>epoch {id, until, beat, born, seq}, gone 20 TTLs after the
# last node stopped. Every node's heartbeat (each TTL/4) stamps `beat`. A store found
# without it (restarted empty) or with no beat for half a TTL (paused, or every node cut
# off: a node's presences, renewed at most a TTL/4 before the last beat of any node, may
# expire under live users a TTL/4 later) gets a new id, and registrations are refused
# until `until` (a TTL later) while every node, seeing the new id, announces its live
# users again. A node that had users can tell (it knew the old id); a new node cannot, so
# an old node that finds a young epoch begun without a window opens it. Shared by BEAT and
# CLAIM: KEYS[EPOCH], ARGV[TTL] ms, ARGV[NEW] a new id, MINE the node's epoch, RECOVER
# whether to open a window.
_EPOCH = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local e = redis.call('HMGET', KEYS[EPOCH], 'id', 'until', 'beat', 'born')
local lost = not e[1] or now - tonumber(e[3] or 0) > ARGV[TTL] / 2
if lost then
  local u = 0
  if RECOVER then u = now + ARGV[TTL] end
  redis.call('HSET', KEYS[EPOCH], 'id', ARGV[NEW], 'until', u, 'beat', now, 'born', now)
  e = {ARGV[NEW], u}
elseif MINE ~= '' and MINE ~= e[1] and tonumber(e[2]) < tonumber(e[4]) + ARGV[TTL] then
  -- A node from before sees a young epoch that a new node began without a window.
  e[2] = tonumber(e[4]) + ARGV[TTL]
  redis.call('HSET', KEYS[EPOCH], 'until', e[2])
end
"""


def _epoch(epoch: int, ttl: int, new: int, mine: int, recover: str) -> str:
    return (_EPOCH.replace("EPOCH", str(epoch)).replace("TTL", str(ttl))
            .replace("NEW", str(new)).replace("MINE", f"ARGV[{mine}]")
            .replace("RECOVER", recover))


# A node's heartbeat: KEYS epoch, the node's alive key (half a TTL: two heartbeats);
# ARGV ttl ms, new id, the node's epoch ("" when it has
# none yet: a new node opens no recovery window). Returns the epoch id (the node announces
# all its users again when it changed) and the deployment's TTL, which the first node of
# an epoch sets: thresholds and windows assume one TTL for all.
BEAT = _epoch(1, 1, 2, 3, "ARGV[3] ~= ''") + """
if lost or not redis.call('HGET', KEYS[1], 'ttl') then
  redis.call('HSET', KEYS[1], 'ttl', ARGV[1])
end
redis.call('HSET', KEYS[1], 'beat', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1] * 20)
redis.call('SET', KEYS[2], '1', 'PX', math.floor(ARGV[1] / 2))
return {e[1], redis.call('HGET', KEYS[1], 'ttl')}
"""

# The claim rule of base.Claim, atomically. KEYS: presence, binding, bindings index (a
# sorted set userId -> expiry ms that counts bindings for the cap), epoch. ARGV: node,
# session, publicKey, ttl ms, signed "1"/"0", refresh "1"/"0" (the heartbeat announcing a
# live user again: never takes over, allowed while recovering, never refused by the cap),
# binding retention ms, max bindings, userId, the node's epoch, a new epoch id, channel
# prefix. Only a signed claim writes the binding (with the retention as its TTL). A
# binding hash without bound=1 is a leftover of an older version and goes. A takeover
# tells the old holder's node (its channel) in the same script. A successful claim gets
# the next number of the epoch's claim counter (`seq`): replies can arrive out of the order the claims
# ran in, and of two of one node's sessions the higher number is the holder. Returns
# {1, seq} ok, {2, seq, old node, old session} taken over, {0} taken, {-1} bound, {-2} key
# mismatch, {-3} full, {-4, epoch} the node's epoch is not the store's, {-5} recovering.
CLAIM = _epoch(4, 4, 11, 10, "true") + """
if lost or e[1] ~= ARGV[10] then return {-4, e[1]} end
local refresh = ARGV[6] == '1'
if not refresh and tonumber(e[2]) > now then return {-5} end
local b = redis.call('HMGET', KEYS[2], 'publicKey', 'bound')
local signed = ARGV[5] == '1'
if b[2] == '1' then
  if not signed then return {-1} end
  if b[1] ~= ARGV[3] then return {-2} end
elseif b[1] then
  redis.call('DEL', KEYS[2])
end
local h = redis.call('HMGET', KEYS[1], 'session', 'publicKey', 'node')
local taken_over = false
if h[1] == '' then  -- unbound by an operator (see UNBIND)
  if refresh then return {0} end
elseif h[1] and h[1] ~= ARGV[2] then
  if refresh or not signed or h[2] ~= ARGV[3] then return {0} end
  taken_over = true
end
if signed and b[2] ~= '1' and not refresh then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[8]) then return {-3} end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'session', ARGV[2], 'publicKey', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
if signed then
  redis.call('HSET', KEYS[2], 'publicKey', ARGV[3], 'bound', '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('ZADD', KEYS[3], now + ARGV[7], ARGV[9])
end
if taken_over then
  if h[3] ~= ARGV[1] then redis.call('PUBLISH', ARGV[12] .. h[3], 'R\\n' .. h[1]) end
  return {2, seq, h[3], h[1]}
end
return {1, seq}
"""

# The heartbeat's compare-and-renew, for a batch of presences: KEYS presences; ARGV ttl ms,
# then the session each should name. Per key: 1 renewed, 0 gone, -1 names another session.
REFRESH = """
local out = {}
for i, key in ipairs(KEYS) do
  local s = redis.call('HGET', key, 'session')
  if s == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  elseif s then
    out[i] = -1
  else
    out[i] = 0
  end
end
return out
"""

# Key rotation, only by the session the presence names (one just replaced cannot bind a
# key under the new holder): KEYS binding, presence; ARGV old key, new key, session.
REBIND = """
if redis.call('HGET', KEYS[2], 'session') ~= ARGV[3] then return 0 end
local b = redis.call('HMGET', KEYS[1], 'publicKey', 'bound')
if b[2] ~= '1' or b[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'publicKey', ARGV[2])
redis.call('HSET', KEYS[2], 'publicKey', ARGV[2])
return 1
"""

# Renews a binding that still exists (never recreates one an operator unbound): KEYS
# presence, binding, bindings index; ARGV retention ms, userId.
_RENEW_BINDING = """
if redis.call('PEXPIRE', KEYS[2], ARGV[{retention}]) == 1 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], 'XX', t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[{retention}],
             ARGV[{user}])
end
"""
# The heartbeat's renewal of an online signed user's binding (it never expires while in
# use). Same KEYS; ARGV retention ms, userId.
RENEW = _RENEW_BINDING.format(retention=1, user=2)

# Compare-and-delete: only the session that holds the userId may release it; its binding
# (if any) is kept for the retention from now. KEYS presence, binding, bindings index;
# ARGV session, retention ms, userId.
RELEASE = """
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
""" + _RENEW_BINDING.format(retention=2, user=3) + """
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# An operator's unbind: KEYS presence, binding, bindings index; ARGV userId. The holder's
# presence keeps its TTL but names no session (a tombstone): whether or not the notice to
# its node arrives, that node's heartbeat then finds its user's presence naming another
# session and closes it; meanwhile the ID reads offline and a new claim may take it, a
# re-announce may not. Returns {had binding, node, session} of the holder to close (nil
# when nobody holds it).
UNBIND = """
local had = redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'node', 'session')
if not h[2] or h[2] == '' then return {had} end
redis.call('HSET', KEYS[1], 'session', '')
return {had, h[1], h[2]}
"""

# {-1}: offline. {0}: its node has no listener; if the node's heartbeat has stopped too
# (its <prefix>alive:<node> key expired: the worker died) the stale presence goes, else
# (a listener reconnecting) it stays: deleting it would free a live user's ID.
# {n, node}: handed to n subscribers of that node's channel. ARGV channel prefix, frame,
# alive-key prefix.
ROUTE = """
local node = redis.call('HGET', KEYS[1], 'node')
if not node then return {-1} end
local n = redis.call('PUBLISH', ARGV[1] .. node, ARGV[2])
if n == 0 and redis.call('EXISTS', ARGV[3] .. node) == 0 then
  redis.call('DEL', KEYS[1])
end
return {n, node}
"""

_CLAIM_CODES = {1: Claim.OK, 2: Claim.TAKEN_OVER, 0: Claim.TAKEN, -1: Claim.BOUND,
                -2: Claim.KEY_MISMATCH, -3: Claim.FULL}
EPOCH_CHANGED, RECOVERING = -4, -5

LISTEN_POLL = 1.0  # seconds a listener waits for a message before checking its state
# The listener reconnects quickly: while it is away, relays to this node's users find no
# subscriber and delete their presence.
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 1.0
PIPELINE_BATCH = 500  # commands per pipelined round trip (heartbeats, releases)
# Seconds a target's node is remembered after the route script named it. A relay sent
# within it to a user who just moved reaches the old node, which re-routes it once.
ROUTE_CACHE = 1.0
# Releases get a client of their own that gives up quickly: a drain with Redis down must
# end well within gunicorn's graceful timeout (presence then expires by TTL).
RELEASE_TIMEOUT = 1.0
UNRELEASED_MAX = 100_000  # failed releases kept for another try (the oldest go first)


class RedisBackend(MemoryBackend):
    def __init__(self, settings, events: BackendEvents = NO_EVENTS) -> None:
        super().__init__(events=events)
        self._prefix = settings.redis_prefix
        self._ttl_ms = int(settings.presence_ttl * 1000)
        self._retention_ms = int(settings.binding_retention * 1000)
        self._max_bindings = settings.max_bindings
        self._bindings_index = f"{self._prefix}bindings"
        self._heartbeat_every = settings.presence_ttl / 4
        self.node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._channel_prefix = f"{self._prefix}node:"
        self._channel = self._channel_prefix + self.node
        self._alive_prefix = f"{self._prefix}alive:"
        # Retried only when the connection failed, never after a timeout: the command may
        # still run once Redis answers (a paused Redis), and a relay published twice would
        # arrive twice (the invariant soak saw it).
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.02), 2,
                      supported_errors=(redis.ConnectionError,))
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_pool_size, timeout=5,
            socket_timeout=5, socket_connect_timeout=2, health_check_interval=30, retry=retry)
        self._redis = redis.Redis(connection_pool=pool)
        # The listener blocks on its own connection, with no read timeout.
        # No retry of its own: redis-py would resubscribe silently, and this node must
        # know (it logs, and announces its users again: notices sent meanwhile were lost).
        self._listener_redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=None, socket_connect_timeout=2,
            health_check_interval=10, retry=Retry(ExponentialBackoff(), 0))
        self._quick = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=2, timeout=RELEASE_TIMEOUT,
            socket_timeout=RELEASE_TIMEOUT, socket_connect_timeout=RELEASE_TIMEOUT))
        self._beat_script = self._redis.register_script(BEAT)
        self._epoch_key = f"{self._prefix}epoch"
        self._epoch: str | None = None  # the store's epoch this node has announced in
        self._seqs: dict[str, int] = {}  # userId -> claim number of its local holder
        self._claim = self._redis.register_script(CLAIM)
        self._refresh_script = self._redis.register_script(REFRESH)
        self._rebind = self._redis.register_script(REBIND)
        self._release = self._redis.register_script(RELEASE)
        self._unbind = self._redis.register_script(UNBIND)
        self._renew = self._redis.register_script(RENEW)
        self._renewed_at = float("-inf")  # when the heartbeat last renewed bindings
        self._route = self._redis.register_script(ROUTE)
        self._subscribed = False
        self._store_ok = True
        self._stopped = False
        self._wake: threading.Event | None = None
        self._spawn: Spawn | None = None
        self._routes: dict[str, tuple[str, float]] = {}  # userId -> (node, until)
        self._outbox: list[tuple[str, str, str, str]] = []  # (node, userId, origin, frame)
        self._publishing = contextlib.nullcontext()  # a gevent lock once started
        self._publisher = None
        self._releasing: list[tuple[str, str, Released]] = []  # (userId, session, then)
        # Releases that failed, tried again later; past a TTL they are moot (expired).
        self._unreleased: collections.deque = collections.deque(maxlen=UNRELEASED_MAX)
        self._releases_failing = False
        self._release_lock = contextlib.nullcontext()  # a gevent lock once started
        self._releaser = None
        self._full_announce = False  # the next heartbeat runs the register script for all

    # -- presence ---------------------------------------------------------------------

    def claim(self, session: Session, user_id: str, public_key: str, signed: bool) -> Claim:
        # A live user of this worker is known here even when the store has forgotten it
        # (restarted empty): the same rule answers without it.
        refusal = local_refusal(self._users.get(user_id), session, public_key, signed)
        if refusal is not None:
            return refusal
        # Releases queued or under way go first: a user reconnecting here must not find
        # its old session. One kept for this session (its last claim failed) is moot: this
        # claim takes or refreshes the ID for it, and must not be undone by it.
        self._release_queued()
        dropped = self._drop_kept_releases(user_id, session.id)
        try:
            reply = self._call("claim", self._claim, self._claim_keys(user_id),
                               self._claim_args(session, user_id, public_key, signed,
                                                refresh=False))
        except BackendUnavailable:
            # The script may have run before the reply was lost: give back what it may
            # have given (compare-and-delete; queued before this session's next claim).
            self._queue_release(user_id, session.id)
            raise
        code = int(reply[0])
        if code in (EPOCH_CHANGED, RECOVERING):
            if code == EPOCH_CHANGED:
                self._adopt_epoch(reply[1].decode())
            raise BackendUnavailable("the presence store is being rebuilt")
        outcome = _CLAIM_CODES[code]
        if outcome not in (Claim.OK, Claim.TAKEN_OVER):
            if dropped:  # refused: what its last claim may have got still goes
                self._queue_release(user_id, session.id)
            return outcome
        if outcome is Claim.TAKEN_OVER and reply[2].decode() == self.node:
            # The store took the ID from that session whatever becomes of this one (other
            # nodes heard it from the script).
            self._replace_local(reply[3].decode())
        if session.closed:  # it closed while the claim was in flight: give it back
            self._queue_release(user_id, session.id)
            return Claim.CLOSED
        seq = int(reply[1])
        holder = self._users.get(user_id)
        if holder is not None and holder is not session and self._seqs.get(user_id, 0) > seq:
            # A later claim of this ID was answered here first: this one lost the race.
            self._events.replace(session)
            return Claim.CLOSED
        self._hold(session, user_id, public_key, signed)  # the binding lives in Redis
        self._seqs[user_id] = seq
        return outcome

    def _drop_kept_releases(self, user_id: str, session_id: str) -> bool:
        """Forget failed releases kept for user_id held by session_id; whether there were
        any."""
        mine = (user_id, session_id)
        kept = [entry for entry in self._unreleased if entry[:2] == mine]
        if kept:
            self._unreleased = collections.deque(
                (entry for entry in self._unreleased if entry[:2] != mine),
                maxlen=UNRELEASED_MAX)
        return bool(kept)

    def _claim_keys(self, user_id: str) -> list[str]:
        return [*self._keys_for(user_id), self._epoch_key]

    def _claim_args(self, session: Session, user_id: str, public_key: str, signed: bool,
                    refresh: bool):
        return [self.node, session.id, public_key, self._ttl_ms, "1" if signed else "0",
                "1" if refresh else "0", self._retention_ms, self._max_bindings, user_id,
                self._epoch or "", secrets.token_hex(8), self._channel_prefix]

    def _adopt_epoch(self, epoch: str) -> None:
        """The store is not the one this node announced its users in: announce them all
        again (at once: registrations are refused until every node has)."""
        if epoch == self._epoch:
            return
        if self._epoch is not None:
            log.warning("the shared store lost its presence state (restarted empty or "
                        "paused); announcing %d users again", len(self._users))
        self._epoch = epoch
        self._seqs = dict.fromkeys(self._seqs, 0)  # the counter began again
        self._full_announce = True
        if self._wake is not None:
            self._wake.set()

    def _replace_anywhere(self, node: str, session_id: str) -> None:
        """Close a session as replaced, on this node or through its node's channel."""
        if node == self.node:
            self._replace_local(session_id)
            return
        try:
            self._redis.publish(self._channel_prefix + node, f"R\n{session_id}")
        except redis.RedisError as exc:  # its node's heartbeat will find out (TTL/4)
            self._events.backend_failed("takeover")
            log.warning("could not tell node %s to close session %s: %s", node, session_id,
                        exc)

    def _replace_local(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._events.replace(session)

    def rebind(self, session: Session, new_public_key: str) -> bool:
        keys = [self._binding_key(session.user_id), self._presence_key(session.user_id)]
        if not self._call("rebind", self._rebind, keys,
                          [session.public_key, new_public_key, session.id]):
            return False
        session.public_key = new_public_key
        return True

    def detach(self, session: Session, then: Released = nothing) -> None:
        user_id = session.user_id
        if not self._forget(session):
            then()
            return
        self._seqs.pop(user_id, None)
        self._queue_release(user_id, session.id, then)

    def _queue_release(self, user_id: str, session_id: str, then: Released = nothing) -> None:
        """Release user_id if the store still names session_id, then call ``then``.
        Closes that happen together (a restart, a network cut: thousands) share pipelined
        round trips; nobody waits for them but ``then``."""
        self._releasing.append((user_id, session_id, then))
        if self._spawn is None:  # not started (no greenlets): release right here
            self._release_queued()
        elif self._releaser is None:
            self._releaser = self._spawn(self._release_in_background)

    def _release_in_background(self) -> None:
        try:
            self._release_queued()
        finally:
            self._releaser = None

    def _release_queued(self) -> None:
        """Release what is queued, a pipelined round trip per batch. Once one fails the
        rest are not tried now, so Redis down costs one timeout: their close frames go
        out anyway, and they are tried again at the next run (a close, a claim, the
        heartbeat) until they succeed or the TTL has removed them."""
        with self._release_lock:
            failed = False
            self._releasing.extend(self._unreleased)
            self._unreleased.clear()
            while self._releasing:
                queued, self._releasing = self._releasing, []
                for batch in _batches(queued):
                    failed = failed or not self._release_batch(batch)
                    if failed:
                        self._unreleased.extend((u, s, nothing) for u, s, _ in batch)
                    for _, _, then in batch:
                        _call_quietly(then)
            if failed != self._releases_failing:  # one line per change, not per run
                self._releases_failing = failed
                if failed:
                    log.warning("could not release users in the shared store; trying "
                                "again (else they expire by TTL)")
                else:
                    log.warning("releases in the shared store work again")

    def _release_batch(self, batch: list[tuple[str, str, Released]]) -> bool:
        pipe = self._quick.pipeline(transaction=False)
        for user_id, session_id, _ in batch:
            self._release(keys=self._keys_for(user_id),
                          args=[session_id, self._retention_ms, user_id], client=pipe)
        try:
            pipe.execute()
            return True
        except redis.RedisError as exc:
            self._events.backend_failed("release")
            log.debug("release of %d users failed: %s", len(batch), exc)
            return False

    def lookup(self, user_id: str) -> Presence:
        if user_id in self._users:
            return super().lookup(user_id)
        with self._store("lookup"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(self._presence_key(user_id), "publicKey", "session")
            pipe.hmget(self._binding_key(user_id), "publicKey", "bound")
            (live, session), (bound, flag) = pipe.execute()
        if flag != b"1":
            bound = None
        if live is not None and session:  # an empty session: unbound, its holder going
            return Presence(user_id, True, live.decode(), live == bound)
        return Presence(user_id, False, bound and bound.decode(), bound is not None)

    def unbind(self, user_id: str) -> bool:
        had, *holder = self._call("unbind", self._unbind, self._keys_for(user_id), [user_id])
        if holder:
            self._replace_anywhere(holder[0].decode(), holder[1].decode())
        return bool(had) or bool(holder)

    def binding_count(self) -> None:
        return None  # in Redis, each with its TTL

    # -- routing ----------------------------------------------------------------------

    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        if user_id in self._users:
            return super().deliver(user_id, text, origin)
        route = self._routes.get(user_id)
        # Queued only while Redis looks well: otherwise the sender hears `unavailable` now.
        if route is not None and self._subscribed and self._store_ok:
            if route[1] > time.monotonic():
                self._outbox.append((route[0], user_id, origin or "", text))
                if self._publisher is None:
                    self._publisher = self._spawn(self._publish_outbox)
                return True
            del self._routes[user_id]
        return self._route_now(user_id, text, origin)

    def _route_now(self, user_id: str, text: str, origin: str | None) -> bool:
        """The route script: one round trip that finds the node and publishes."""
        payload = f"D\n{user_id}\n{origin or ''}\n{text}"
        with self._publishing:  # frames queued before this one are published before it
            self._publish_queued()
            reply = self._call("publish", self._route, [self._presence_key(user_id)],
                               [self._channel_prefix, payload, self._alive_prefix])
        if int(reply[0]) <= 0:
            return False
        self._routes[user_id] = (reply[1].decode(), time.monotonic() + ROUTE_CACHE)
        return True

    def _publish_outbox(self) -> None:
        try:
            with self._publishing:
                self._publish_queued()
        finally:
            self._publisher = None

    def _publish_queued(self) -> None:
        """Publish what is queued, one message per node and one round trip in all; a
        frame that reaches no node is reported to its sender."""
        while self._outbox:
            queued, self._outbox = self._outbox, []
            by_node: dict[str, list[tuple[str, str, str]]] = {}
            for node, user_id, origin, text in queued:
                by_node.setdefault(node, []).append((user_id, origin, text))
            pipe = self._redis.pipeline(transaction=False)
            for node, frames in by_node.items():
                pipe.publish(self._channel_prefix + node, b"B\n" + orjson.dumps(frames))
            try:
                counts = pipe.execute()
            except redis.RedisError as exc:
                self._events.backend_failed("publish")
                log.warning("could not publish %d relays: %s", len(queued), exc)
                self._routes.clear()  # until Redis answers, relays take the direct path
                counts = [0] * len(by_node)
            for (node, frames), count in zip(by_node.items(), counts):
                if not count:  # that node is gone: forget it, tell the senders
                    for user_id, _, _ in frames:
                        self._routes.pop(user_id, None)
                    self._report(frames)

    def _report(self, frames) -> None:
        undelivered: dict[str, Counter[str]] = {}
        for user_id, origin, _ in frames:
            if origin:
                undelivered.setdefault(user_id, Counter())[origin] += 1
        for user_id, counts in undelivered.items():
            self._events.report_undelivered(user_id, counts)

    def _on_message(self, data: bytes) -> None:
        kind, rest = data.decode().split("\n", 1)
        if kind == "R":  # a signed registration elsewhere took this session's userId
            self._replace_local(rest)
            return
        if kind == "B":  # frames sent here by a node that remembered this node
            for user_id, origin, text in orjson.loads(rest):
                delivered = self._deliver_here(user_id, origin, text)
                if delivered is False and not self._reroute(user_id, origin, text):
                    self._report([(user_id, origin, text)])  # the user moved on
            return
        user_id, origin, text = rest.split("\n", 2)
        if self._deliver_here(user_id, origin, text) is False and origin:
            # It left this node between the sender's lookup and now.
            self._events.report_undelivered(user_id, {origin: 1})

    def _deliver_here(self, user_id: str, origin: str, text: str) -> bool | None:
        """Deliver a frame published to this node to its local user; None when the user is
        here but too busy to take it (its sender is told so)."""
        try:
            return super().deliver(user_id, text, origin or None)
        except ProtocolError:  # peer-busy
            if origin:
                self._events.report_undelivered(user_id, {origin: 1}, True)
            return None

    def _reroute(self, user_id: str, origin: str, text: str) -> bool:
        if user_id in self._users:
            return False
        self._routes.pop(user_id, None)
        try:
            return self._route_now(user_id, text, origin)
        except BackendUnavailable:
            return False

    # -- background tasks -------------------------------------------------------------

    def start(self, spawn: Spawn) -> None:
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            raise RuntimeError("the Redis backend needs gevent-patched sockets: "
                               "run it under gunicorn's gevent worker")
        self._wake = threading.Event()  # created here: after patching, a gevent event
        # Likewise a gevent lock; reentrant: reporting a failed publish may relay again.
        self._publishing = threading.RLock()
        self._release_lock = threading.Lock()
        self._spawn = spawn
        try:  # before serving: registrations need the store's epoch
            self._beat()  # a TTLMismatch stops this worker from booting
        except redis.RedisError as exc:
            log.error("redis unreachable at start: %s", exc)

    def loops(self) -> dict:
        return {"redis-listener": self._listen, "redis-heartbeat": self._heartbeat}

    def stop(self) -> None:
        self._release_queued()  # before exit: other nodes must see these users leave
        self._stopped = True
        if self._wake is not None:
            self._wake.set()

    def readiness(self) -> tuple[bool, str]:
        if not self._subscribed:
            return False, "redis listener not subscribed"
        if not self._store_ok:
            return False, "redis unreachable"
        return True, "ok"

    def _listen(self) -> None:
        backoff = BACKOFF_FIRST
        lost_at: float | None = None
        while not self._stopped:
            pubsub = self._listener_redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._channel)
                self._subscribed = True
                backoff = BACKOFF_FIRST
                if lost_at is not None:
                    log.warning("redis listener recovered after %.1fs; re-announcing users",
                                time.monotonic() - lost_at)
                    lost_at = None
                    self._full_announce = True
                    self._wake.set()
                else:
                    log.info("redis listener subscribed to %s", self._channel)
                while not self._stopped:
                    message = pubsub.get_message(timeout=LISTEN_POLL)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["data"])
            except (redis.RedisError, OSError) as exc:
                self._events.backend_failed("listener")
                self._subscribed = False
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.error("redis listener lost: %s; reconnecting with backoff", exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP)
            finally:
                self._close_quietly(pubsub)
        self._subscribed = False

    def _dispatch(self, data: bytes) -> None:
        try:
            self._on_message(data)
        except Exception:
            log.exception("bad message on %s", self._channel)

    def _heartbeat(self) -> None:
        while not self._stopped:
            now = time.monotonic()
            self._routes = {user: route for user, route in self._routes.items()
                            if route[1] > now}
            try:
                lost = self._announce()
                if not self._store_ok:
                    log.warning("redis reachable again; announced %d users",
                                len(self._users))
                self._store_ok = True
                for session in lost:
                    log.info("user=%s id=%s: the store names another session; replaced",
                             session.user_id, session.id)
                    self._events.replace(session)
            except redis.RedisError as exc:
                self._events.backend_failed("heartbeat")
                self._full_announce = True
                if self._store_ok:
                    log.error("redis unreachable: %s; serving local users only", exc)
                self._store_ok = False
            if not self._store_ok:
                self._wake.wait(BACKOFF_CAP)
            elif not self._full_announce:  # else announce again at once (epoch changed)
                self._wake.wait(self._heartbeat_every)
            self._wake.clear()

    def _beat(self) -> None:
        """Stamp the store's epoch; a new one means the store lost its state."""
        epoch, ttl = self._beat_script(keys=[self._epoch_key, self._alive_prefix + self.node],
                                       args=[self._ttl_ms, secrets.token_hex(8),
                                             self._epoch or ""])
        if int(ttl) != self._ttl_ms:
            raise TTLMismatch(
                f"VOLLI_PRESENCE_TTL is {self._ttl_ms / 1000:g} s here but "
                f"{int(ttl) / 1000:g} s on the servers already sharing this Redis prefix "
                f"({self._prefix!r}): every server must use the same value (change it on all "
                "at once, or move to a new VOLLI_REDIS_PREFIX)")
        self._adopt_epoch(epoch.decode())

    def _announce(self) -> list[Session]:
        """Renew the presence of every local user that the store still names as its
        holder (compare-and-renew, one script per batch), announce again those it lost
        (every user when the store's epoch changed); returns the sessions whose userId
        another session holds now: they are replaced."""
        self._beat()
        if self._unreleased:
            self._release_queued()
        owned = list(self._users.items())
        self._renew_bindings(owned)
        if self._full_announce:
            self._full_announce = False
            missing, lost = owned, []
        else:
            missing, lost = self._refresh(owned)
        return lost + self._reclaim(missing)

    def _renew_bindings(self, owned: list[tuple[str, Session]]) -> None:
        """A third of the retention after the last renewal, renew the bindings of online
        signed users (the heartbeat runs at least that often: config.py checks)."""
        now = time.monotonic()
        if now - self._renewed_at < self._retention_ms / 3000:
            return
        for batch in _batches([(user, s) for user, s in owned if s.signed]):
            pipe = self._redis.pipeline(transaction=False)
            for user_id, _ in batch:
                self._renew(keys=self._keys_for(user_id), args=[self._retention_ms, user_id],
                            client=pipe)
            pipe.execute()
        self._renewed_at = now

    def _refresh(self, owned):
        """Compare-and-renew each presence; returns (users whose presence was gone,
        sessions the store no longer names)."""
        missing, lost = [], []
        for batch in _batches(owned):
            replies = self._refresh_script(
                keys=[self._presence_key(user_id) for user_id, _ in batch],
                args=[self._ttl_ms, *(session.id for _, session in batch)])
            for (user_id, session), reply in zip(batch, replies):
                if self._users.get(user_id) is not session:
                    continue  # closed or replaced here meanwhile
                if reply == 0:
                    missing.append((user_id, session))
                elif reply == -1:
                    lost.append(session)
        return missing, lost

    def _reclaim(self, owned: list[tuple[str, Session]]) -> list[Session]:
        """Announce users again (the claim script, never taking over)."""
        lost: list[Session] = []
        for batch in _batches(owned):
            pipe = self._redis.pipeline(transaction=False)
            for user_id, session in batch:
                args = self._claim_args(session, user_id, session.public_key, session.signed,
                                        refresh=True)
                self._claim(self._claim_keys(user_id), args, client=pipe)
            for (user_id, session), reply in zip(batch, pipe.execute()):
                code = int(reply[0])
                if code == EPOCH_CHANGED:  # announce everyone again, in the new epoch
                    self._adopt_epoch(reply[1].decode())
                    return lost
                if self._users.get(user_id) is not session:
                    if code == 1:  # it closed while the batch was in flight: undo
                        self._queue_release(user_id, session.id)
                elif code == 1:
                    self._seqs[user_id] = int(reply[1])
                else:
                    lost.append(session)
        return lost

    # -- helpers ----------------------------------------------------------------------

    def _presence_key(self, user_id: str) -> str:
        return f"{self._prefix}presence:{user_id}"

    def _binding_key(self, user_id: str) -> str:
        return f"{self._prefix}key:{user_id}"

    def _keys_for(self, user_id: str) -> list[str]:
        """presence, binding, bindings index: the keys of the claim, release and unbind
        scripts."""
        return [self._presence_key(user_id), self._binding_key(user_id), self._bindings_index]

    @contextlib.contextmanager
    def _store(self, operation: str):
        """Redis failures are counted and reach the hub as BackendUnavailable."""
        try:
            yield
        except redis.RedisError as exc:
            self._events.backend_failed(operation)
            raise BackendUnavailable(str(exc)) from exc

    def _call(self, operation: str, script, keys: list[str], args: list):
        with self._store(operation):
            return script(keys=keys, args=args)

    @staticmethod
    def _close_quietly(pubsub) -> None:
        try:
            pubsub.close()
        except Exception:
            pass


class TTLMismatch(RuntimeError):
    """This server's presence TTL is not the one of the servers sharing its Redis."""


def _call_quietly(then: Released) -> None:
    try:
        then()
    except Exception:
        log.exception("a callback after a release failed")


def _batches(items: list) -> list[list]:
    """``items`` in slices of PIPELINE_BATCH: one pipelined round trip each."""
    return [items[i:i + PIPELINE_BATCH] for i in range(0, len(items), PIPELINE_BATCH)]

