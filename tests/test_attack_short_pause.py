"""Regression test of an attack on 7815513 (issue 12), which failed there and passes
now; what follows describes the bug as it was found.

ATTACK B: a Redis pause SHORTER than VOLLI_PRESENCE_TTL (docs/scaling.md: "Shorter
than the TTL: requests wait, then go on") lets a live user's presence expire, and the
epoch check does not notice because another node stamped `beat` more recently than the
victim's node renewed its users. A register queued during the pause (an attacker's)
then finds the ID free, takes it, and the victim's node closes the victim with 4000 at
its next heartbeat.

Cause: the epoch's "lost" test (volli/backends/redis.py _EPOCH, `now - beat > TTL`) uses
the newest beat of ANY node, while each node renews its own presences on its own phase
(every TTL/3): with N nodes the store can be up to TTL/3 "younger" than a node's
presences, so a pause in (2/3 TTL .. TTL) can expire them without opening a window.

"""

from __future__ import annotations

import threading
import time

from attack_util import drain_frames, try_register
from conftest import Client

TTL = 3.0
TRIALS = 5


def test_pause_under_the_ttl_lets_a_stranger_take_a_live_id(nodes, store, redis):
    servers = [nodes(workers=2, VOLLI_PRESENCE_TTL=str(TTL)),
               nodes(workers=2, VOLLI_PRESENCE_TTL=str(TTL))]
    stolen, notes = [], []
    for trial in range(TRIALS):
        user = f"victim{trial}@x"
        victim = Client(servers[0].url)
        victim.register(user)
        thief = Client(servers[1].url)
        key = f"it:presence:{user}"
        time.sleep(1.5)
        # Wait until the victim's node is about to renew (its presence is oldest) while
        # the store's beat is fresh (another node just beat).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pttl = store.pttl(key)
            now_ms = int(store.time()[0] * 1000 + store.time()[1] // 1000)
            beat_age = now_ms - int(store.hget("it:epoch", "beat"))
            if 2080 < pttl < 2300 and beat_age < 120:
                break
            time.sleep(0.01)
        else:  # after a pause the nodes beat in step: no phase gap to use this trial
            notes.append((pttl, beat_age, None, "no phase gap found"))
            victim.close()
            thief.close()
            continue
        pause = TTL * 1000 - beat_age - 250  # under the TTL, even counted from the beat
        box = {}
        grabber = threading.Thread(target=lambda: box.update(r=try_register(thief, user)))
        t = redis.pause(pause / 1000)
        grabber.start()  # its register script is queued behind the pause
        t.join()
        grabber.join(30)
        grab = box.get("r", {})
        notes.append((pttl, beat_age, round(pause), grab.get("code", grab.get("type"))))
        if grab.get("type") == "registered":
            stolen.append((trial, drain_frames(victim, TTL)))
        victim.close()
        thief.close()
        time.sleep(TTL)
    print("pttl, beat age, pause ms, grab:", notes)
    print(f"stolen in {len(stolen)}/{TRIALS}:", stolen)
    assert not stolen, f"pause < TTL: live IDs taken in {len(stolen)}/{TRIALS}: {stolen}"
