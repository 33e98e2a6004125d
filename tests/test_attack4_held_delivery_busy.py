"""Held offers that do not fit the callee's send queue are lost, and their callers are
never told.

``Hub._deliver_held`` (volli/hub.py) takes *every* offer held for the callee out of the
store (``backend.take_held``: TAKE_HELD / MemoryHeld.take delete them), then queues their
frames with ``session.send(frame, offer.caller)``. With an origin, ``Connection.send``
treats each as a relay: once the callee's queue would pass VOLLI_SEND_QUEUE_LIMIT it
raises ``ProtocolError(peer-busy)``. That exception leaves ``_deliver_held`` in the middle
of the loop: the offers not yet queued were already deleted from the store, their callers
get neither ``delivered`` nor ``expired`` (their own expiry finds nothing to drop:
``drop_held`` -> False), and the callee, just registered, gets an ``error`` peer-busy about
itself. Nothing in the store bounds the held bytes per callee below the queue limit:
VOLLI_HOLD_PER_CALLEE (8) callers x VOLLI_HOLD_BYTES (256 KiB) = 2 MiB against a 1 MiB
queue by default, so a few callers (or an attacker with a few IDs holding big offers
first: oldest go first) make every later caller's offer vanish silently. A send that
returns False (4002 on a full queue) is ignored the same way.

Fix: check the result of each send; offers that could not be queued go back to the
store (or their callers are told ``expired``/an ``undelivered`` notice), and only those
queued count as ``delivered``; or exempt a callee's own held frames from the relay
busy check and bound the per-callee held bytes below the send queue limit.
"""

from __future__ import annotations

import time

CALLEE = "bob@volli.app"


def test_every_caller_hears_what_became_of_its_held_offer(make_server, open_client):
    srv = make_server({"VOLLI_SEND_QUEUE_LIMIT": "65536", "VOLLI_HOLD_MAX": "4"})
    callers = []
    for name in ("alice", "carol"):
        caller = open_client(srv)
        caller.register(f"{name}@volli.app")
        caller.send({"type": "offer", "to": CALLEE, "hold": 4,
                     "offer": {"type": "offer", "sdp": "v=0 " + name[0] * 40000}})
        assert caller.recv()["type"] == "held"
        callers.append(caller)
    bob = open_client(srv)
    bob.send({"type": "register", "userId": CALLEE, "publicKey": "cHVibGljLWtleQ=="})
    got = []
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            got.append(bob.recv(timeout=0.3))
        except TimeoutError:
            pass
    heard = []
    for caller in callers:
        try:
            heard.append(caller.recv(timeout=6)["type"])
        except TimeoutError:
            heard.append(None)
    kinds = [(m["type"], m.get("from"), m.get("code")) for m in got]
    assert heard.count("delivered") == sum(m["type"] == "offer" for m in got), (heard, kinds)
    assert None not in heard, f"a caller was told nothing: {heard}; bob got {kinds}"
    assert not any(m["type"] == "error" for m in got), kinds
