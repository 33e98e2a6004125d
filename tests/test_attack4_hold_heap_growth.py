"""The hold expiry heap grows with every *replaced* offer, and outlives closed callers.

``Holding.add`` (volli/holding.py) pushes a new ``(expires, session id, callee)`` entry
onto ``Holding._due`` for every held offer, and nothing removes the entry of the offer it
replaces (``_holds[session][callee]`` is overwritten; the stale heap entry is skipped
only when its time comes), nor the entries of a session that closed (``Holding.drop``
pops ``_holds``/``_sessions`` but leaves ``_due``). The limits of section 5c ("4 offers
at once per connection") are checked against ``_holds``, which stays at one entry, so
they never stop this: one connection re-sending ``{"type":"offer","to":X,"hold":60}`` at
the message rate (50/s) leaves 3000 heap entries per minute, each keeping its own copy of
the callee string (up to 256 code points, ~1 KiB), i.e. a few MB per connection and
hundreds of MB per client IP (100 connections per worker), for VOLLI_HOLD_MAX seconds
(up to 86400 if an operator raises it). ``Holding.pending()`` reports it.

Fix: keep the heap bounded by the live holds, e.g. remember one deadline per
(session, callee) and push a heap entry only when the new expiry is earlier than the one
already queued (a later due() re-pushes the remaining one), or use a dict of deadlines
scanned/rebuilt when stale entries exceed the live ones; drop a closed session's entries
(or rebuild the heap) in ``drop``.
"""

from __future__ import annotations

import json

from test_hub import RecordingSession
from test_watching import Clock, join, leave
from volli.backends import MemoryBackend
from volli.config import Settings
from volli.hub import Hub


def make_hub(clock):
    # The defaults of section 7a (50 messages/s sustained, 4 held offers, 60 s).
    return Hub(Settings(), lambda events: MemoryBackend(events=events, clock=clock),
               clock=clock)


def test_replacing_a_held_offer_does_not_grow_the_expiry_heap():
    clock = Clock()
    hub = make_hub(clock)
    alice = join(hub, "alice")
    for n in range(3000):  # one minute at the sustained message rate
        hub.receive_text(alice, json.dumps({"type": "offer", "to": "bob", "hold": 60,
                                            "offer": {"type": "offer", "sdp": f"v={n}"}}))
        clock.now += 0.02
    assert alice.last()["type"] == "held"  # every one of them was accepted
    assert not any(m["type"] == "error" for m in alice.sent)
    assert hub.holding.count(alice) == 1  # the limit sees one offer...
    # Stale entries are compacted past twice the live holds (+16): a constant, not 3000.
    assert hub.holding.pending() <= 2 * hub.holding.count(alice) + 16, (
        f"...the expiry heap holds {hub.holding.pending()} entries for it")


def test_a_closed_callers_entries_leave_the_expiry_heap():
    clock = Clock()
    hub = make_hub(clock)
    for n in range(200):
        caller = join(hub, f"caller{n}")
        for callee in ("bob", "carol", "dave", "erin"):
            hub.receive_text(caller, json.dumps({"type": "offer", "to": callee, "hold": 60,
                                                 "offer": {"type": "offer", "sdp": "v=0"}}))
        leave(hub, caller)
    assert hub.holding.pending() <= 16, (  # the compaction's slack (none are live)
        f"{hub.holding.pending()} heap entries of 200 closed callers kept for 60 s")
