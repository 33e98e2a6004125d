"""Key and channel names in Redis (no I/O).

One Redis (or Sentinel): one group and no hash tag, the names every version used:
``<prefix>presence:<userId>`` (hash {node, session, publicKey}), ``<prefix>key:<userId>``
(a signed user's binding), ``<prefix>bindings`` (sorted set counting bindings for the
cap), ``<prefix>epoch``, ``<prefix>alive:<node>`` and the channel ``<prefix>node:<node>``.

Redis Cluster: a script may touch the keys of one hash slot only, so users are spread over
CLUSTER_GROUPS fixed groups (crc32 of the userId), and each group's keys and node channels
carry its hash tag: ``<prefix>{g7}presence:<userId>``, ``<prefix>{g7}epoch``,
``<prefix>{g7}node:<node>``... A group is one slot: its own epoch, bindings index and
alive keys, and a node listens on its channel in every group (sharded pub/sub).
"""

from __future__ import annotations

import zlib

# Fixed for a deployment: every node must map a userId to the same group.
CLUSTER_GROUPS = 64


class Keys:
    def __init__(self, prefix: str, groups: int = 1) -> None:
        self.prefix = prefix
        self.groups = groups

    @property
    def sharded(self) -> bool:
        return self.groups > 1

    def group(self, user_id: str) -> int:
        if self.groups == 1:
            return 0
        return zlib.crc32(user_id.encode()) % self.groups

    def _in(self, group: int) -> str:
        """The start of every name in ``group``: the prefix and its hash tag."""
        return self.prefix if self.groups == 1 else f"{self.prefix}{{g{group}}}"

    def presence(self, user_id: str) -> str:
        return f"{self._in(self.group(user_id))}presence:{user_id}"

    def binding(self, user_id: str) -> str:
        return f"{self._in(self.group(user_id))}key:{user_id}"

    def bindings(self, group: int) -> str:
        return f"{self._in(group)}bindings"

    def epoch(self, group: int) -> str:
        return f"{self._in(group)}epoch"

    def alive_prefix(self, group: int) -> str:
        return f"{self._in(group)}alive:"

    def channel_prefix(self, group: int) -> str:
        return f"{self._in(group)}node:"

    def channel(self, group: int, node: str) -> str:
        return self.channel_prefix(group) + node

    def watchers(self, user_id: str) -> str:
        """A sorted set: the nodes watching user_id's presence (score: until when, ms)."""
        return f"{self._in(self.group(user_id))}watch:{user_id}"

    def push(self, user_id: str) -> str:
        """A hash: user_id's Web Push subscriptions, endpoint -> {sub, at} (JSON)."""
        return f"{self._in(self.group(user_id))}push:{user_id}"

    def held_meta(self, user_id: str) -> str:
        """A hash: callers of offers held for user_id -> {s, node, at, exp, n} (JSON)."""
        return f"{self._in(self.group(user_id))}held-meta:{user_id}"

    def held(self, user_id: str) -> str:
        """A hash: callers of offers held for user_id -> the frames, one per line."""
        return f"{self._in(self.group(user_id))}held:{user_id}"

    def user(self, user_id: str) -> list[str]:
        """presence, binding, bindings index, watchers: the keys of the release, renew and
        unbind scripts."""
        return [self.presence(user_id), self.binding(user_id),
                self.bindings(self.group(user_id)), self.watchers(user_id)]

    def claim(self, user_id: str) -> list[str]:
        """The claim script's keys: ``user``'s, the epoch, and the held offers' (only
        looked at)."""
        return [*self.user(user_id), self.epoch(self.group(user_id)),
                self.held_meta(user_id)]
