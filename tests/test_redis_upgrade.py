"""A rolling upgrade: a server of the last version before the wire format was versioned
(98464d9) and a server of this one share a Redis. Relays (the route script's `D` and the
outbox's `B`) and takeovers (`R`, published by either version's register script) reach
the other version's node, so nothing is misread or lost while servers are replaced."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import ROOT, NODES_PREFIX, Server
from signing import Identity

OLD = "98464d9"  # the last commit with the unversioned format


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    if subprocess.run(["git", "cat-file", "-e", f"{OLD}^{{commit}}"], cwd=ROOT).returncode:
        pytest.fail(f"commit {OLD} is not in this clone: the rolling-upgrade test needs "
                    "the repository's history (git clone without --depth)")
    tree = tmp_path_factory.mktemp("old")
    archive = subprocess.run(["git", "archive", OLD], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


@pytest.fixture
def old_and_new(tmp_path, redis, old_tree):
    env = {"VOLLI_REDIS_URL": redis.url, "VOLLI_REDIS_PREFIX": NODES_PREFIX,
           "WEB_CONCURRENCY": "1"}
    # Run from the old tree: `python -m` puts the working directory first on sys.path.
    old = Server(tmp_path, {**env, "PYTHONPATH": str(old_tree)},
                 command=["sh", "-c", f'cd "{old_tree}" && exec "{sys.executable}" -m gunicorn '
                          '--config gunicorn.conf.py wsgi:app'])
    new = Server(tmp_path, env)
    try:
        for srv in (old, new):
            srv.wait_ready()
            srv.wait_log("redis listener subscribed")
        assert "/w1" not in old.log() and "/w1" in new.log()
        yield old, new
    finally:
        old.stop()
        new.stop()


def test_relays_cross_versions_both_ways(old_and_new, open_client):
    old, new = old_and_new
    alice, bob = open_client(old), open_client(new)
    alice.register("alice@x")
    bob.register("bob@x")
    for sender, receiver, to, frm in ((alice, bob, "bob@x", "alice@x"),
                                      (bob, alice, "alice@x", "bob@x")):
        # The first takes the route script; those right after it the remembered route.
        offers = [{"type": "offer", "sdp": f"{frm} {i}\nline two"} for i in range(20)]
        for offer in offers:
            sender.send({"type": "offer", "to": to, "offer": offer})
        for offer in offers:
            assert receiver.recv() == {"type": "offer", "to": to, "offer": offer, "from": frm}
    assert "unreadable message" not in new.log() and "bad message" not in old.log()


@pytest.mark.parametrize("first, second", [("old", "new"), ("new", "old")])
def test_takeover_cross_versions_closes_the_old_connection(old_and_new, open_client,
                                                           first, second):
    servers = dict(zip(("old", "new"), old_and_new))
    me = Identity()
    before, after = open_client(servers[first]), open_client(servers[second])
    assert me.register(before, "taken@x")["type"] == "registered"
    assert me.register(after, "taken@x")["type"] == "registered"
    assert before.recv()["type"] == "session-replaced"
    deadline = time.monotonic() + 5
    while servers[first].log().count("session replaced user=taken@x") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
