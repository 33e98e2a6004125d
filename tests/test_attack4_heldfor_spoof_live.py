"""A caller can forge ``heldFor`` on a live offer.

Section 5c presents ``heldFor`` as server-stamped ("each with the server-stamped ``from``
and ``heldFor``... a ``heldFor`` the caller wrote is removed"), and the demo app shows it
as "it waited N s for you to come online". But the caller's ``heldFor`` is removed only
on the held path (``hub._without_held_for`` is called from ``Hub._hold``); an offer to an
*online* callee goes through ``Hub._relay`` -> ``encode_relay(message, sender)`` with
every field passed on, ``heldFor`` (and case variants such as ``HeldFor``) included. So
a callee cannot tell a live offer from a held one, and a caller can make a live call look
like one that waited (or one that waited 0 ms), contrary to the "server-stamped" claim.

Fix (made): a relayed message with a top-level ``heldFor`` (in any case) is refused with
``invalid-message`` when parsed (volli/protocol/names.py, STAMPED_KEYS), live or held.
"""

from __future__ import annotations

import json

from test_watching import Clock, join, make_hub


def test_a_live_offer_carries_no_caller_written_held_for():
    hub = make_hub(Clock(), hold_max=60)
    alice, bob = join(hub, "alice"), join(hub, "bob")
    for key in ("heldFor", "HeldFor"):
        hub.receive_text(alice, json.dumps({"type": "offer", "to": "bob", "hold": 30,
                                            key: 86_400_000,
                                            "offer": {"type": "offer", "sdp": "v=0"}}))
        # Fixed by refusing it (the key is the server's), live or held alike.
        assert alice.last()["code"] == "invalid-message", alice.last()
        assert not any(k.casefold() == "heldfor" for m in bob.sent for k in m), bob.sent
