"""Regression test of an attack on 7815513 (issue 12), which failed there and passes
now; what follows describes the bug as it was found.

ATTACK G1 (deterministic): a same-key takeover whose claimer closes while its claim is
in flight, on the SAME worker as the holder. The CLAIM script takes the ID over (no R
published: same node), claim() sees the claimer closed, releases the ID and returns
CLOSED *before* `_replace_local(old session)` (volli/backends/redis.py claim(), the
`if session.closed:` early return precedes the takeover notice). The old holder stays
open and registered on its worker with NO presence: the ID is offline while its
connection is open, and a registration on another worker then succeeds as a plain OK
while the old holder is still live: two live connections for one ID until the old
node's heartbeat (TTL/3) notices.

"""

from __future__ import annotations

import time

from attack_util import drain_frames, is_open
from conftest import Client
from signing import Identity
from volli.protocol import identity


def test_closed_claimer_leaves_old_holder_live_without_presence(nodes, store, redis):
    # The claimer's own close must come from the server side (the register deadline):
    # the reader is busy in the claim, so a client's close frame is read only after it.
    a, b = nodes(workers=1, VOLLI_REGISTER_TIMEOUT="0.5"), nodes(workers=1)
    me = Identity()
    holder = Client(a.url)
    assert me.register(holder, "u@x")["type"] == "registered"
    claimer = Client(a.url)
    msg = {"type": "register", "userId": "u@x", "publicKey": me.public, "requestId": 1,
           "signature": me.sign(identity.register_payload(claimer.nonce, "u@x"))}
    t = redis.pause(1.0)
    claimer.send(msg)  # its register deadline (0.5 s) passes while the claim waits
    t.join()
    closed = drain_frames(claimer, 1.0)
    time.sleep(0.5)
    presence = store.hgetall("it:presence:u@x")
    second = Client(b.url)
    reply = me.register(second, "u@x")
    holder_frames = drain_frames(holder, 0.5)
    holder_alive = is_open(holder)
    print(f"presence after the closed claim: {presence}; register elsewhere: {reply['type']}; "
          f"old holder got {holder_frames}, still open: {holder_alive}; claimer got {closed}")
    assert not (reply["type"] == "registered" and holder_alive), \
        "two live connections hold u@x"
    # The store took the ID from the holder: it is told so, as in any takeover.
    assert {"type": "session-replaced"} in holder_frames and not holder_alive
