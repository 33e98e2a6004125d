"""Regression test of an attack on 7815513 (issue 12), which failed there and passes
now; what follows describes the bug as it was found.

ATTACK D: rotate-key racing a same-key takeover. The REBIND script
(volli/backends/redis.py REBIND) changes the binding whenever the binding still holds the
rotating session's key, without checking that the presence still names that session: a
session that has just been replaced (its `R` notice in flight) rotates the ID's binding
from under the new holder. Result: the live holder B keeps key K1 while the binding says
K2 (discover: verified=false), B's own rotate-key is refused (bad-signature), and the
holder of K2 gets user-id-taken. The in-memory backend closes the old session
synchronously, so there the rotate is never applied after a takeover.

"""

from __future__ import annotations

import time

from attack_util import drain_frames
from conftest import Client
from signing import Identity
from volli.protocol import identity

TRIALS = 6


def test_rotate_key_from_a_replaced_session_rebinds_the_id(nodes, store, redis):
    x, y = nodes(workers=1), nodes(workers=1)
    bad = []
    for trial in range(TRIALS):
        user = f"rot{trial}@x"
        k1, k2 = Identity(), Identity()
        old = Client(x.url)
        assert k1.register(old, user)["type"] == "registered"
        new = Client(y.url)
        rotate = {"type": "rotate-key", "newPublicKey": k2.public, "requestId": "rot",
                  "signature": k1.sign(identity.rotate_payload(old.nonce, user, k2.public))}
        register = {"type": "register", "userId": user, "publicKey": k1.public,
                    "requestId": "reg",
                    "signature": k1.sign(identity.register_payload(new.nonce, user))}
        t = redis.pause(0.3)  # both requests reach Redis in the same instant
        if trial % 2:
            new.send(register); old.send(rotate)
        else:
            old.send(rotate); new.send(register)
        t.join()
        new_reply = new.recv(timeout=5)
        old_frames = drain_frames(old, 1.0)
        binding = store.hget(f"it:key:{user}", "publicKey").decode()
        presence = store.hget(f"it:presence:{user}", "publicKey")
        state = (new_reply.get("type"), [f.get("type") if isinstance(f, dict) else f
                                         for f in old_frames],
                 "binding=K2" if binding == k2.public else "binding=K1",
                 "presence=K1" if presence and presence.decode() == k1.public else presence)
        print(trial, state)
        if new_reply.get("type") == "registered" and binding == k2.public:
            # B (K1) is the live holder but the ID is bound to K2 now.
            found = Client(x.url)
            found.register(f"look{trial}@x")
            disc = found.call({"type": "discover", "userId": user})
            k2c = Client(x.url)
            k2_reply = k2.register(k2c, user)
            bad.append((trial, state, disc.get("verified"), k2_reply.get("code")))
            found.close(); k2c.close()
        old.close(); new.close()
        time.sleep(0.3)
    print("inconsistent:", bad)
    assert not bad
