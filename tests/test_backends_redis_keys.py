"""Key and channel naming (volli/backends/redis/keys.py), without Redis."""

import binascii
import re

from volli.backends.redis.keys import CLUSTER_GROUPS, Keys


def slot_tag(key: str) -> str:
    """What Redis Cluster hashes: the first non-empty {...} of the key, else all of it."""
    match = re.search(r"\{([^}]+)\}", key)
    return match.group(1) if match else key


def test_one_redis_keeps_the_names_of_every_earlier_version():
    keys = Keys("volli:")
    assert keys.group("alice@x") == 0
    assert keys.claim("alice@x") == ["volli:presence:alice@x", "volli:key:alice@x",
                                     "volli:bindings", "volli:watch:alice@x", "volli:epoch",
                                     "volli:held-meta:alice@x"]
    assert keys.alive_prefix(0) == "volli:alive:"
    assert keys.channel(0, "n1/w1") == "volli:node:n1/w1"
    assert not keys.sharded


def test_on_a_cluster_every_key_of_a_script_shares_one_slot():
    keys = Keys("volli:", CLUSTER_GROUPS)
    for user in ("alice@x", "bob@x", "", "{g1}tricky", "ünïcode"):
        group = keys.group(user)
        names = keys.claim(user) + [keys.alive_prefix(group) + "n1",
                                    keys.channel_prefix(group) + "n1"]
        assert {slot_tag(name) for name in names} == {f"g{group}"}, names
        assert keys.presence(user) == f"volli:{{g{group}}}presence:{user}"


def test_groups_are_stable_and_spread():
    keys = Keys("p:", CLUSTER_GROUPS)
    assert keys.group("alice@x") == binascii.crc32(b"alice@x") % CLUSTER_GROUPS
    seen = {keys.group(f"user{i}") for i in range(2000)}
    assert seen == set(range(CLUSTER_GROUPS))
