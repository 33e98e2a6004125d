"""Regression test of an attack on 7815513 (issue 12), which failed there and passes
now; what follows describes the bug as it was found.

ATTACK A: while a node's pub/sub listener is reconnecting (a dropped connection, the
pubsub client-output-buffer limit, a network blip), a relay to one of its users reaches 0
subscribers and the ROUTE script DELETEs that live user's presence
(volli/backends/redis.py, ROUTE: `if n == 0 then redis.call('DEL', KEYS[1])`). The ID is
then free while its connection is open: a stranger registers it (unsigned victim), and
when the victim's node comes back its re-announce finds another session and closes the
victim with 4000. The relay that triggers it needs no privilege: any registered user.

"""

from __future__ import annotations

import time

from attack_util import drain_frames, try_register
from conftest import Client

TRIALS = 8


def test_listener_gap_lets_a_stranger_take_a_live_users_id(nodes, store):
    a = nodes(workers=1)
    b = nodes(workers=1)
    sender = Client(b.url)
    sender.register("sender@x")
    stolen = []
    outcome = []
    for trial in range(TRIALS):
        user = f"victim{trial}@x"
        victim = Client(a.url)
        victim.register(user)
        thief = Client(b.url)
        time.sleep(0.5)
        store.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # the fault
        end = time.monotonic() + 0.5
        while True:  # relay, then grab, until the window closes
            sender.send({"type": "offer", "to": user, "offer": {}})
            grab = try_register(thief, user)
            if grab["type"] == "registered" or time.monotonic() > end:
                break
        outcome.append(grab.get("code", grab["type"]))
        if grab["type"] == "registered":
            frames = drain_frames(victim, 6.0)
            stolen.append((trial, frames))
        thief.close()
        victim.close()
        time.sleep(0.5)
    print(outcome)
    print(f"stolen in {len(stolen)}/{TRIALS} trials:", stolen)
    assert not stolen, (f"a stranger registered a live user's ID in {len(stolen)}/{TRIALS} "
                        f"trials; the victim then got: {stolen}")
