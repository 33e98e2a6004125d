"""Faults under load: slow receivers, many senders into one socket. Correctness only;
speed is measured by bench/, never asserted here."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time

from rawclient import RawClient


def test_slow_receiver_never_blocks_senders_or_others(make_server, clients):
    srv = make_server({"VOLLI_SEND_QUEUE_LIMIT": "131072", "VOLLI_SEND_TIMEOUT": "2",
                       "VOLLI_PING_INTERVAL": "1"})
    slow = RawClient(srv.port, rcvbuf=4096)  # registers, then never reads again
    slow.send_json({"type": "register", "userId": "slow@volli.app", "publicKey": "AAAA"})
    assert json.loads(slow.next_message())["type"] == "registered"

    flooder, p, q = clients(srv.url), clients(srv.url), clients(srv.url)
    flooder.register("flooder@volli.app")
    p.register("p@volli.app")
    q.register("q@volli.app")

    results: dict[str, object] = {}

    def flood():
        payload = {"sdp": "s" * 8000}
        deadline = time.monotonic() + 30
        for i in range(5000):
            if time.monotonic() > deadline:
                break
            flooder.send({"type": "offer", "to": "slow@volli.app", "offer": payload,
                          "requestId": i})
        results["flood_done"] = True

    thread = threading.Thread(target=flood)
    thread.start()
    # While the flood runs, an unrelated pair relays every message, in order.
    for i in range(200):
        p.send({"type": "ice-candidate", "to": "q@volli.app", "candidate": {"n": i}})
    got = [q.recv(timeout=10)["candidate"]["n"] for _ in range(200)]
    assert got == list(range(200))
    thread.join(timeout=40)
    assert results.get("flood_done")

    # The flooder is told its relays were refused while the slow peer's queue was full
    # (peer-busy); the slow peer is not closed for that, but for not answering pings.
    busy = 0
    while True:
        try:
            reply = flooder.recv(timeout=1)
        except TimeoutError:
            break
        assert reply["code"] in ("peer-busy", "peer-offline"), reply
        busy += reply["code"] == "peer-busy"
        if "undelivered" in reply:  # relays it had queued when it was cut off
            assert reply["peer"] == "slow@volli.app" and reply["undelivered"] > 0
    assert busy > 0
    srv.wait_log("user=slow@volli.app code=1008")
    assert flooder.call({"type": "discover", "userId": "slow@volli.app"})["online"] is False
    slow.close()


def test_many_concurrent_senders_to_one_receiver_every_frame_intact(make_server, clients, uid):
    # ~9 MB arrive at once: a queue big enough that the receiver is not (rightly) cut off
    # as too slow, so that every large frame crosses the socket in pieces.
    # (relays are refused as busy past an eighth of it while the receiver lags: 12 MB >
    # the 9 MB)
    srv = make_server({"VOLLI_SEND_QUEUE_LIMIT": str(96 * 1024 * 1024)})
    receiver_id = uid("sink")
    receiver = clients(srv.url)
    receiver.register(receiver_id)
    senders, per_sender = 12, 25
    sender_ids = [uid(f"src{i}") for i in range(senders)]
    conns = []
    for sid in sender_ids:
        c = clients(srv.url)
        c.register(sid)
        conns.append(c)

    def blast(index: int) -> None:
        rng = random.Random(index)
        for seq in range(per_sender):
            body = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(10, 60_000)))
            conns[index].send({"type": "offer", "to": receiver_id,
                               "offer": {"seq": seq, "sdp": body,
                                         "sha": hashlib.sha256(body.encode()).hexdigest()}})

    threads = [threading.Thread(target=blast, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    seen: dict[str, list[int]] = {sid: [] for sid in sender_ids}
    for _ in range(senders * per_sender):
        message = receiver.recv(timeout=20)
        offer = message["offer"]
        assert hashlib.sha256(offer["sdp"].encode()).hexdigest() == offer["sha"]
        seen[message["from"]].append(offer["seq"])
    for t in threads:
        t.join(timeout=30)
    assert all(seqs == list(range(per_sender)) for seqs in seen.values()), seen
