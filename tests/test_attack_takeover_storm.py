"""Regression test of an attack on 7815513 (issue 12), which failed there and passes
now; what follows describes the bug as it was found.

ATTACK G: simultaneous same-key signed registrations of one ID on 4 workers (2 servers x
2 workers), some of them closing at the same moment; then a checker: at most one open
connection believes it holds the ID, and the store names a session iff one does.

"""

from __future__ import annotations

import random
import threading
import time

from websockets.exceptions import ConnectionClosed

from conftest import Client
from signing import Identity
from volli.protocol import identity

ROUNDS = int(__import__("os").environ.get("STORM_ROUNDS", "12"))
PER_ROUND = 6


def test_storm_of_same_key_takeovers_and_closes(nodes, store):
    rnd = random.Random(7)
    servers = [nodes(workers=2), nodes(workers=2)]
    me = Identity()
    problems = []
    for rnd_no in range(ROUNDS):
        user = f"storm{rnd_no}@x"
        clients = [Client(servers[i % 2].url) for i in range(PER_ROUND)]
        closers = set(rnd.sample(range(PER_ROUND), PER_ROUND // 3))
        barrier = threading.Barrier(PER_ROUND)
        result = {}

        def go(i: int) -> None:
            c = clients[i]
            msg = {"type": "register", "userId": user, "publicKey": me.public,
                   "requestId": "r",
                   "signature": me.sign(identity.register_payload(c.nonce, user))}
            barrier.wait()
            c.send(msg)
            if i in closers:
                time.sleep(rnd.random() * 0.004)
                c.close()
                result[i] = "closed"
                return
            frames = []
            try:
                while True:
                    frames.append(c.recv(timeout=1.5)["type"])
            except TimeoutError:
                pass
            except ConnectionClosed as exc:
                frames.append(f"closed:{exc.rcvd.code if exc.rcvd else None}")
            result[i] = frames

        threads = [threading.Thread(target=go, args=(i,)) for i in range(PER_ROUND)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        holders = [i for i, r in result.items()
                   if r != "closed" and "registered" in r and not any(
                       str(f).startswith("closed") or f == "session-replaced" for f in r)]
        time.sleep(1.0)  # releases are asynchronous
        still = []
        for i in holders:  # re-check: still open and never told it was replaced?
            try:
                rid = f"p{i}"
                clients[i].send({"type": "ping", "requestId": rid})
                while True:
                    m = clients[i].recv(timeout=2)
                    if m.get("requestId") == rid:
                        still.append(i)
                        break
                    if m["type"] == "session-replaced":
                        break
            except (ConnectionClosed, TimeoutError):
                pass
        holders = still
        presence = store.hget(f"it:presence:{user}", "session")
        if presence is not None:
            presence = presence.decode()
        ok = len(holders) <= 1 and (presence is not None) == (len(holders) == 1)
        if not ok:
            log = sorted(ln for srv in servers for ln in srv.log().splitlines()
                         if f"={user} " in ln or (presence and presence in ln))
            problems.append((rnd_no, holders, presence, result, log))
        print(rnd_no, "holders", holders, "presence", presence, {k: v for k, v in result.items()})
        for c in clients:
            c.close()
        time.sleep(0.3)
    for p in problems:
        print("PROBLEM", p[:4])
        for ln in p[4]:
            print("    ", ln)
    assert not problems, [p[:3] for p in problems]
