"""Every replacement of a held offer sends a new Web Push wake-up: a push flood.

``Hub._hold`` (volli/hub.py) calls ``self._wake(to, sender, seconds)`` for every offer
it holds, including one that merely *replaces* the caller's offer already held for the
same callee (section 5c "One per pair": renegotiation). The per-caller limits
(``held-offers``, ``held-bytes``) exclude the offer being replaced (``but=to``), and the
fan-out limit does not count a known target, so nothing bounds it but the message rate:
one unsigned connection re-sending ``{"type":"offer","to":"victim","hold":60}`` 50 times
a second makes the server do 50 x (up to VOLLI_PUSH_MAX_PER_USER=5) pushes a second, each
an ECDH + AES-GCM encryption, an ES256 signature and an HTTPS request, and buzzes the
victim's phone as often. It also fills the worker's push pool (VOLLI_PUSH_CONCURRENCY=20):
every other user's wake-up on that worker is then dropped as ``overflow``, silently.

Fix: wake a callee once per held offer of a pair (not again on a replacement while the
pair's offer is still held), and/or rate-limit wake-ups per callee (e.g. one per caller
per hold period) independently of the caller's connection.
"""

from __future__ import annotations

import json

from test_watching import Clock, join
from volli.backends import MemoryBackend
from volli.config import Settings
from volli.hub import Hub
from volli.push import generate_keys

SUB = {"endpoint": "https://fcm.googleapis.com/fcm/send/victim",
       "keys": {"p256dh": "B" + "A" * 86, "auth": "A" * 22}}


def test_replacing_a_held_offer_does_not_wake_the_callee_again():
    clock = Clock()
    hub = Hub(Settings(vapid_private_key=generate_keys()[0]),
              lambda events: MemoryBackend(events=events, clock=clock), clock=clock)
    pushes = []
    hub.push._send = lambda callee, sub, payload, ttl: pushes.append(callee)
    # bob is a signed user with a phone subscribed, now offline.
    hub.backend._bind("bob", "bob-key")
    hub.backend.push_subscribe("bob", SUB, 5)
    mallory = join(hub, "mallory")  # unsigned: anyone
    for n in range(100):  # two seconds at the sustained message rate
        hub.receive_text(mallory, json.dumps({"type": "offer", "to": "bob", "hold": 60,
                                              "offer": {"type": "offer", "sdp": f"v={n}"}}))
        clock.now += 0.02
    assert [m["type"] for m in mallory.sent[2:]] == ["held"] * 100
    assert len(pushes) <= 1, f"{len(pushes)} pushes to bob's phone in 2 s from one caller"
