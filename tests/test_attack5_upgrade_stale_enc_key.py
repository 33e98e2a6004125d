"""Bug: in a rolling upgrade, a signed registration through a node of the version before
sealed signaling leaves the binding's old encryption key in Redis, and new nodes keep
publishing it as the user's key while the user holds another one.

docs/protocol.md 5e: "A later signed registration replaces them (one without them removes
them)". The new CLAIM script HDELs encKey/encSig on a signed claim without them, but the
previous version's CLAIM script (a different script, still run by old nodes during the
upgrade) only writes publicKey/bound and never touches the other fields of the binding
hash. So: alice publishes E1 through a new node; later (a new page load, a new
VolliClient: a new X25519 key) she registers through an old node, which cannot store her
new key. New nodes still answer discover with E1 (and its valid signature), so everyone
seals to a key she no longer has: every sealed call to her fails with does-not-open until
she happens to register through a new node again (her old node's heartbeat never fixes it).

Fixed behaviour: the stale E1 is no longer published once a registration that did not
publish it holds the ID (e.g. the binding records which claim published the key).
"""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from conftest import NODES_PREFIX, ROOT, Server
from signing import Identity
from volli.protocol import hpke, identity

pytestmark = pytest.mark.timeout(120)
OLD = "fd216c8"  # the parent of the commit that stores encryption keys with the binding


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    if subprocess.run(["git", "cat-file", "-e", f"{OLD}^{{commit}}"], cwd=ROOT).returncode:
        pytest.fail(f"commit {OLD} is not in this clone (needs the repository's history)")
    tree = tmp_path_factory.mktemp("old-unsealed")
    archive = subprocess.run(["git", "archive", OLD], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


@pytest.fixture
def old_and_new(tmp_path, redis, old_tree):
    env = {"VOLLI_REDIS_URL": redis.url, "VOLLI_REDIS_PREFIX": NODES_PREFIX,
           "WEB_CONCURRENCY": "1"}
    old = Server(tmp_path, {**env, "PYTHONPATH": str(old_tree)},
                 command=["sh", "-c", f'cd "{old_tree}" && exec "{sys.executable}" -m gunicorn '
                          '--config gunicorn.conf.py wsgi:app'])
    new = Server(tmp_path, env)
    try:
        for srv in (old, new):
            srv.wait_ready()
            srv.wait_log("redis listener subscribed")
        yield old, new
    finally:
        old.stop()
        new.stop()


def _published(me: Identity, user_id: str) -> dict:
    key = base64.b64encode(hpke.public_bytes(X25519PrivateKey.generate())).decode()
    return {"encryptionKey": key, "encryptionKeySignature":
            me.sign(identity.encryption_key_payload(user_id, key))}


def _register(me: Identity, client, user_id: str, extra: dict) -> dict:
    return client.call({"type": "register", "userId": user_id, "publicKey": me.public,
                        "signature": me.sign(identity.register_payload(client.nonce, user_id)),
                        **extra})


def test_registration_through_an_old_node_does_not_keep_a_stale_encryption_key(
        old_and_new, open_client):
    old, new = old_and_new
    me, user_id = Identity(), "alice@upgrade"
    first = _published(me, user_id)
    session = open_client(new)
    assert _register(me, session, user_id, first)["type"] == "registered"
    session.close()

    # alice again, with a new encryption key, through a node of the previous version.
    second = _published(me, user_id)
    session = open_client(old)
    assert _register(me, session, user_id, second)["type"] == "registered"

    bob = open_client(new)
    bob.register("bob@upgrade")
    found = bob.call({"type": "discover", "userId": user_id})
    assert found["online"] is True and found["verified"] is True, found
    assert found.get("encryptionKey") != first["encryptionKey"], (
        "a new node publishes the encryption key of alice's previous registration while "
        f"her live registration (through an old node) did not publish it: {found}")
