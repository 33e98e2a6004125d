"""The node-to-node wire format (volli/backends/redis/wire.py), without Redis."""

import orjson
import pytest

from volli.backends.redis import wire
from volli.backends.redis.wire import Batch, Deliver, PresenceChange, Replace, WireError

MESSAGES = [
    Deliver("alice@x", "bob@x", '{"type":"relay","payload":"a\\nb"}'),
    Deliver("alice@x", "", "line one\nline two\n"),  # no origin; newlines in the frame
    Batch((("alice@x", "bob@x", "{}"), ("carol@x", "", "é\n✓"))),
    Replace("0123abcd"),
    PresenceChange("alice@x", True, "host:1:ab/w1"),
    PresenceChange("é x", False, ""),
]


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("version", [0, 1])
def test_every_message_round_trips_in_both_versions(message, version):
    assert wire.decode(wire.encode(message, version)) == message


def test_version_1_starts_with_a_marker_that_is_never_utf8():
    data = wire.encode(Replace("s1"))
    assert data == b"\xff1 R\ns1"
    with pytest.raises(UnicodeDecodeError):  # what a node from before versions does first
        data.decode()


def test_version_0_is_the_format_of_nodes_from_before_versions():
    assert wire.encode(Deliver("u", "o", "t"), 0) == b"D\nu\no\nt"
    assert wire.encode(Batch((("u", "o", "t"),)), 0) == b"B\n" + orjson.dumps([["u", "o", "t"]])
    assert wire.encode(Replace("s"), 0) == b"R\ns"
    assert wire.decode(b"D\nu\n\nt") == Deliver("u", "", "t")


@pytest.mark.parametrize("data, reason", [
    (b"\xff2 D\nu\no\nt", "unknown wire version"),
    (b"\xff12 D\nu\no\nt", "unknown wire version"),
    (b"\xffx D\nu\no\nt", "unknown wire version"),
    (b"\xff1 Q\nwhatever", "unknown message kind"),
    (b"X\nu\no\nt", "unknown message kind"),  # version 0 had D, B and R only
    (b"no header", "no header"),
    (b"\xff1 D\nonly-a-user", "malformed"),
    (b"\xff1 B\n{not json", "malformed"),
    (b"\xff1 B\n[[1, 2]]", "malformed"),
    (b"\xff1 D\n\xff\xfe\n\nt", "malformed"),  # not UTF-8
    (b"\xff1 P\nu\n2\nnode", "malformed"),  # online is 0 or 1
    (b"\xff1 P\nu\n1", "malformed"),
])
def test_unreadable_messages_are_refused_never_misread(data, reason):
    with pytest.raises(WireError, match=reason):
        wire.decode(data)


def test_a_peer_gets_the_highest_version_both_read():
    assert wire.node_id("host:1:ab") == "host:1:ab/w1"
    assert wire.version_for("host:1:ab/w1") == 1
    assert wire.version_for("host:1:ab/w7") == wire.VERSION  # a newer peer reads ours
    assert wire.version_for("host:1:ab") == 0  # a node from before versions
    assert wire.version_for("host/w:1:ab") == 0


def test_the_scripts_presence_change_decodes():
    """What _ANNOUNCE in scripts.py publishes: the header, then user, 1/0, node."""
    assert wire.decode(wire.header(b"P") + b"u@x\n0\nn1/w1") == \
        PresenceChange("u@x", False, "n1/w1")


def test_headers_match_what_the_scripts_prepend():
    message = Deliver("u", "o", "t")
    for version in (0, 1):
        assert wire.header(b"D", version) + wire.body(message) == wire.encode(message, version)
