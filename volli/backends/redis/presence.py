"""The presence store in Redis: claim, rebind, release, unbind, lookup, and the heartbeat's
renewals, each a script that acts only if the record still names the session making it.

A user's presence is a hash {node, session, publicKey} with a TTL that its node renews
while it still names that node's session; a signed user's binding keeps its key for the
binding retention, renewed by each registration and each close. Releases are queued and
share pipelined round trips (a drain closes thousands at once). See keys.py for the names
and scripts.py for the rules.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
from typing import Callable

import redis

from ..base import (
    BackendEvents, BackendUnavailable, Claim, EncryptionKey, Presence, Released, Session, nothing,
)
from ..local import LocalSessions
from . import scripts, wire
from .clients import guarded, script
from .keys import Keys

log = logging.getLogger("volli.redis")

PIPELINE_BATCH = 500  # commands per pipelined round trip (heartbeats, releases)
UNRELEASED_MAX = 100_000  # failed releases kept for another try (the oldest go first)
NO_HELD_KEPT = 10_000  # users whose claim found no held offer, until their take

# Sends a message to a node: (node, group of the channel to use, message).
Notify = Callable[[str, int, wire.Message], None]


class Epochs:
    """The store's epoch (per group) this node announced its users in, and the groups
    whose users it must announce again (the store lost them, or notices were lost)."""

    def __init__(self, groups: int, wake: Callable[[], None],
                 on_new: Callable[[int], None]) -> None:
        self._ids: dict[int, str] = {}
        self.pending: set[int] = set()
        self._groups = groups
        self._wake = wake  # the heartbeat, to announce at once
        self._on_new = on_new

    def get(self, group: int) -> str:
        return self._ids.get(group, "")

    def adopt(self, group: int, epoch: str) -> None:
        """The store is not the one this node announced its users in: announce them again
        (at once: registrations are refused until every node has)."""
        if epoch == self._ids.get(group):
            return
        if group in self._ids:
            log.warning("the shared store may have lost presence state (restarted, paused "
                        "or failed over)%s; announcing its users again",
                        f" in group {group}" if self._groups > 1 else "")
        self._ids[group] = epoch
        self._on_new(group)
        self.pending.add(group)
        self._wake()

    def announce_all(self, wake: bool = True) -> None:
        self.pending.update(range(self._groups))
        if wake:
            self._wake()


class PresenceStore:
    def __init__(self, settings, keys: Keys, node: str, local: LocalSessions,
                 events: BackendEvents, client, quick, notify: Notify, cluster: bool,
                 wake: Callable[[], None]) -> None:
        self._keys, self.node, self._local, self._events = keys, node, local, events
        self._redis, self._quick, self._notify = client, quick, notify
        self.ttl_ms = int(settings.presence_ttl * 1000)
        self.retention_ms = int(settings.binding_retention * 1000)
        # The cap counts bindings per group (one slot each): an even share per group.
        self._max_bindings = -(-settings.max_bindings // keys.groups)
        self.epochs = Epochs(keys.groups, wake, self._restart_seqs)
        self._seqs: dict[str, int] = {}  # userId -> claim number of its local holder
        self._no_held: set[str] = set()  # see nothing_held
        self._claim = script(client, scripts.CLAIM, cluster)
        self._refresh = script(client, scripts.REFRESH, cluster)
        self._rebind = script(client, scripts.REBIND, cluster)
        self._release = script(client, scripts.RELEASE, cluster)
        self._unbind = script(client, scripts.UNBIND, cluster)
        self._renew = script(client, scripts.RENEW, cluster)
        self._push_subscribe = script(client, scripts.PUSH_SUBSCRIBE, cluster)
        self._spawn = None  # set once started: releases then run in a greenlet
        self._releasing: list[tuple[str, str, Released]] = []  # (userId, session, then)
        # Releases that failed, tried again later; past a TTL they are moot (expired).
        self._unreleased: collections.deque = collections.deque(maxlen=UNRELEASED_MAX)
        self._releases_failing = False
        self._release_lock = _NoLock()
        self._releaser = None

    def start(self, spawn, lock) -> None:
        self._spawn, self._release_lock = spawn, lock

    def _call(self, operation: str, run, keys: list[str], args: list):
        with guarded(self._events, operation):
            return run(keys=keys, args=args)

    # -- claim ------------------------------------------------------------------------

    def claim(self, session: Session, user_id: str, public_key: str, signed: bool,
              encryption_key: EncryptionKey | None = None) -> Claim:
        """The claim script for a userId no live local session holds (base.local_refusal)."""
        # Releases queued or under way go first: a user reconnecting here must not find
        # its old session. One kept for this session (its last claim failed) is moot: this
        # claim takes or refreshes the ID for it, and must not be undone by it.
        self.release_queued()
        dropped = self._drop_kept_releases(user_id, session.id)
        try:
            reply = self._call("claim", self._claim, self._keys.claim(user_id),
                               self._claim_args(session, user_id, public_key, signed,
                                                encryption_key, refresh=False))
        except BackendUnavailable:
            # The script may have run before the reply was lost: give back what it may
            # have given (compare-and-delete; queued before this session's next claim).
            self.queue_release(user_id, session.id)
            raise
        code = int(reply[0])
        if code in (scripts.EPOCH_CHANGED, scripts.RECOVERING):
            if code == scripts.EPOCH_CHANGED:
                self.epochs.adopt(self._keys.group(user_id), reply[1].decode())
            raise BackendUnavailable("the presence store is being rebuilt")
        outcome = scripts.CLAIM_CODES[code]
        if outcome not in (Claim.OK, Claim.TAKEN_OVER):
            if dropped:  # refused: what its last claim may have got still goes
                self.queue_release(user_id, session.id)
            return outcome
        if outcome is Claim.TAKEN_OVER and reply[2].decode() == self.node:
            # The store took the ID from that session whatever becomes of this one (other
            # nodes heard it from the script).
            self._local.replace(reply[3].decode())
        if session.closed:  # it closed while the claim was in flight: give it back
            self.queue_release(user_id, session.id)
            return Claim.CLOSED
        seq = int(reply[1])
        holder = self._local.holder(user_id)
        if holder is not None and holder is not session and self._seqs.get(user_id, 0) > seq:
            # A later claim of this ID was answered here first: this one lost the race.
            self._events.replace(session)
            return Claim.CLOSED
        # the binding lives in Redis
        self._local.hold(session, user_id, public_key, signed, encryption_key)
        self._seqs[user_id] = seq
        self._note_held(user_id, int(reply[-1]))
        return outcome

    def _note_held(self, user_id: str, held: int) -> None:
        """Whether the claim found offers held for ``user_id``. Only "none" is kept (and
        only for the take that follows the claim): forgetting it costs a round trip,
        never an offer."""
        if held:
            self._no_held.discard(user_id)
            return
        if len(self._no_held) >= NO_HELD_KEPT:
            self._no_held.clear()
        self._no_held.add(user_id)

    def nothing_held(self, user_id: str) -> bool:
        """True once if the claim just made for ``user_id`` found no offer held for it:
        none can be held while it is online (the hold script checks the presence)."""
        if user_id in self._no_held:
            self._no_held.discard(user_id)
            return True
        return False

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

    def _claim_args(self, session: Session, user_id: str, public_key: str, signed: bool,
                    encryption_key: EncryptionKey | None, refresh: bool):
        group = self._keys.group(user_id)
        return [self.node, session.id, public_key, self.ttl_ms, "1" if signed else "0",
                "1" if refresh else "0", self.retention_ms, self._max_bindings, user_id,
                self.epochs.get(group), secrets.token_hex(8), self._keys.channel_prefix(group),
                wire.header(b"R"), wire.header(b"R", 0), wire.header(b"P"),
                *_encryption_args(encryption_key)]

    def _restart_seqs(self, group: int) -> None:
        """A new epoch's claim counter begins again."""
        for user_id in self._seqs:
            if self._keys.group(user_id) == group:
                self._seqs[user_id] = 0

    # -- the other changes ------------------------------------------------------------

    def rebind(self, session: Session, new_public_key: str,
               encryption_key: EncryptionKey | None = None) -> bool:
        keys = [self._keys.binding(session.user_id), self._keys.presence(session.user_id)]
        if not self._call("rebind", self._rebind, keys,
                          [session.public_key, new_public_key, session.id,
                           *_encryption_args(encryption_key)]):
            return False
        session.public_key, session.encryption_key = new_public_key, encryption_key
        return True

    def unbind(self, user_id: str) -> bool:
        group = self._keys.group(user_id)
        had, *holder = self._call("unbind", self._unbind, self._keys.user(user_id),
                                  [user_id, self._keys.channel_prefix(group), wire.header(b"P")])
        with guarded(self._events, "unbind"):  # push subscriptions belong to the binding
            self._redis.delete(self._keys.push(user_id))
        if holder:
            node, session_id = holder[0].decode(), holder[1].decode()
            if node == self.node:
                self._local.replace(session_id)
            else:
                self._notify(node, self._keys.group(user_id), wire.Replace(session_id))
        return bool(had) or bool(holder)

    def push_subscribe(self, user_id: str, subscription: dict, keep: int) -> None:
        self._call("push", self._push_subscribe, [self._keys.push(user_id)],
                   [subscription["endpoint"], json.dumps(subscription), keep,
                    self.retention_ms])

    def push_unsubscribe(self, user_id: str, endpoint: str) -> bool:
        with guarded(self._events, "push"):
            return bool(self._redis.hdel(self._keys.push(user_id), endpoint))

    def push_subscriptions(self, user_id: str) -> list[dict]:
        """Only while the ID is bound: its subscriptions go with its binding."""
        with guarded(self._events, "push"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(self._keys.binding(user_id), "bound")
            pipe.hvals(self._keys.push(user_id))
            bound, subs = pipe.execute()
        if bound != b"1":
            return []
        return [json.loads(json.loads(entry)["sub"]) for entry in subs]

    def lookup(self, user_id: str) -> Presence:
        with guarded(self._events, "lookup"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(self._keys.presence(user_id), "publicKey", "session")
            pipe.hmget(self._keys.binding(user_id), "publicKey", "bound", "encKey", "encSig")
            (live, session), (bound, flag, enc_key, enc_sig) = pipe.execute()
        return presence(user_id, live.decode() if live is not None and session else None,
                        (bound or b"").decode() if flag == b"1" else "",
                        (enc_key or b"").decode(), (enc_sig or b"").decode())

    # -- releases ---------------------------------------------------------------------

    def detach(self, session: Session, then: Released) -> None:
        user_id = session.user_id
        if not self._local.forget(session):
            then()
            return
        self._seqs.pop(user_id, None)
        self.queue_release(user_id, session.id, then)

    def queue_release(self, user_id: str, session_id: str, then: Released = nothing) -> None:
        """Release user_id if the store still names session_id, then call ``then``.
        Closes that happen together (a restart, a network cut: thousands) share pipelined
        round trips; nobody waits for them but ``then``."""
        self._releasing.append((user_id, session_id, then))
        if self._spawn is None:  # not started (no greenlets): release right here
            self.release_queued()
        elif self._releaser is None:
            self._releaser = self._spawn(self._release_in_background)

    def _release_in_background(self) -> None:
        try:
            self.release_queued()
        finally:
            self._releaser = None

    def release_queued(self) -> None:
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
                for batch in batches(queued):
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

    @property
    def releases_kept(self) -> bool:
        return bool(self._unreleased)

    def _release_batch(self, batch: list[tuple[str, str, Released]]) -> bool:
        pipe = self._quick.pipeline(transaction=False)
        for user_id, session_id, _ in batch:
            self._release(keys=self._keys.user(user_id),
                          args=[session_id, self.retention_ms, user_id,
                                self._keys.channel_prefix(self._keys.group(user_id)),
                                wire.header(b"P")], client=pipe)
        try:
            pipe.execute()
            return True
        except redis.RedisError as exc:
            self._events.backend_failed("release")
            log.debug("release of %d users failed: %s", len(batch), exc)
            return False

    # -- the heartbeat's part ---------------------------------------------------------

    def renew_bindings(self, owned: list[tuple[str, Session]]) -> None:
        """Renew the bindings of online signed users (they never expire while in use)."""
        for batch in batches([(user, s) for user, s in owned if s.signed]):
            pipe = self._redis.pipeline(transaction=False)
            for user_id, _ in batch:
                self._renew(keys=self._keys.user(user_id), args=[self.retention_ms, user_id],
                            client=pipe)
            pipe.execute()

    def refresh(self, owned: list[tuple[str, Session]]):
        """Compare-and-renew each presence (one script per batch of one group); returns
        (users whose presence was gone, sessions the store no longer names)."""
        missing, lost = [], []
        by_group: dict[int, list] = {}
        for user_id, session in owned:
            by_group.setdefault(self._keys.group(user_id), []).append((user_id, session))
        for batch in (b for users in by_group.values() for b in batches(users)):
            replies = self._refresh(
                keys=[self._keys.presence(user_id) for user_id, _ in batch],
                args=[self.ttl_ms, *(session.id for _, session in batch)])
            for (user_id, session), reply in zip(batch, replies):
                if self._local.holder(user_id) is not session:
                    continue  # closed or replaced here meanwhile
                if reply == 0:
                    missing.append((user_id, session))
                elif reply == -1:
                    lost.append(session)
        return missing, lost

    def reclaim(self, owned: list[tuple[str, Session]]) -> list[Session]:
        """Announce users again (the claim script, never taking over); returns the
        sessions whose userId another session holds now."""
        lost: list[Session] = []
        moved: set[int] = set()  # groups whose epoch changed: all announced again anyway
        for batch in batches(owned):
            batch = [(u, s) for u, s in batch if self._keys.group(u) not in moved]
            if not batch:
                continue
            pipe = self._redis.pipeline(transaction=False)
            for user_id, session in batch:
                args = self._claim_args(session, user_id, session.public_key, session.signed,
                                        session.encryption_key, refresh=True)
                self._claim(keys=self._keys.claim(user_id), args=args, client=pipe)
            for (user_id, session), reply in zip(batch, pipe.execute()):
                code, group = int(reply[0]), self._keys.group(user_id)
                if group in moved:
                    continue
                if code == scripts.EPOCH_CHANGED:  # announce the group again, in the new epoch
                    self.epochs.adopt(group, reply[1].decode())
                    moved.add(group)
                elif self._local.holder(user_id) is not session:
                    if code == 1:  # it closed while the batch was in flight: undo
                        self.queue_release(user_id, session.id)
                elif code == 1:
                    self._seqs[user_id] = int(reply[1])
                else:
                    lost.append(session)
        return lost


def presence(user_id: str, live: str | None, bound: str, enc_key: str,
             enc_sig: str) -> Presence:
    """A presence as read from Redis: ``live`` the key of a live holder (None: offline),
    ``bound`` the binding's key ('' none) with its encryption key ('' none)."""
    encryption = EncryptionKey(enc_key, enc_sig) if bound and enc_key else None
    if live is not None:  # verified: the live key is the bound one
        return Presence(user_id, True, live, live == bound,
                        encryption if live == bound else None)
    return Presence(user_id, False, bound or None, bool(bound), encryption)


def _encryption_args(encryption_key: EncryptionKey | None) -> list[str]:
    if encryption_key is None:
        return ["", ""]
    return [encryption_key.key, encryption_key.signature]


class _NoLock:
    """The release lock before start (no greenlets yet)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _call_quietly(then: Released) -> None:
    try:
        then()
    except Exception:
        log.exception("a callback after a release failed")


def batches(items: list) -> list[list]:
    """``items`` in slices of PIPELINE_BATCH: one pipelined round trip each."""
    return [items[i:i + PIPELINE_BATCH] for i in range(0, len(items), PIPELINE_BATCH)]
