"""Attacks on the transport, each reproduced on a real gunicorn with raw sockets: a ping
flood, a fragmented message read in pieces, a slow consumer's 4002 in the middle of a
frame, a peer that does not read its replies, malformed upgrades."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time

import pytest
from wsproto.events import CloseConnection, Pong

from conftest import Client
from rawclient import RawClient, masked
from wsclient import worker_pid
from wsclient import worker_rss_kb as rss_kb

OP_CONT, OP_TEXT, OP_PING = 0x0, 0x1, 0x9


@pytest.fixture
def backend_env():
    """The transport is the same on every backend: these run on the in-memory one."""
    return {}


def raw_register(raw: RawClient, user_id: str) -> None:
    raw.send_json({"type": "register", "userId": user_id, "publicKey": "cHVibGlj"})
    assert json.loads(raw.next_message())["type"] == "registered"


def read_to_end(raw: RawClient, deadline: float = 20.0) -> list:
    """Every event until the server ends the TCP connection, parsed by wsproto (strict)."""
    raw.sock.settimeout(deadline)
    while True:
        try:
            data = raw.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data and any(isinstance(e, CloseConnection) for e in raw.events):
            return raw.events  # (wsproto would add a 1006 for our own missing close)
        raw.ws.receive_data(data or None)
        raw.events.extend(raw.ws.events())
        if not data:
            return raw.events


def test_a_ping_flood_reading_a_trickle_keeps_the_worker_small(make_server):
    # Each 125-byte ping once queued a pong outside every limit: +1.6 GB in 10 s.
    srv = make_server()
    worker = worker_pid(srv)
    raw = RawClient(srv.port, rcvbuf=4096)
    baseline = peak = rss_kb(worker)
    burst = masked(OP_PING, b"p" * 125) * 500
    pings = health_checks = 0
    started = time.monotonic()
    next_check = started
    while time.monotonic() - started < 10 and pings < 50_000_000:
        raw.send_raw(burst)
        pings += 500
        try:  # the trickle, parsed to stay in step with the stream
            raw.ws.receive_data(raw.sock.recv(64, socket.MSG_DONTWAIT))
            list(raw.ws.events())
        except BlockingIOError:
            pass
        if time.monotonic() >= next_check:
            peak = max(peak, rss_kb(worker))
            if peak > baseline + 20 * 1024:
                break  # failed: no need to eat the machine's memory
            assert srv.http("/health")[0] == 200
            health_checks += 1
            next_check = time.monotonic() + 1
    assert peak - baseline <= 20 * 1024, f"worker RSS {baseline} -> {peak} kB"
    assert pings >= 100_000 and health_checks >= 5, (pings, health_checks)
    # Still answered, and with the latest ping's payload.
    raw.send_raw(masked(OP_PING, b"last"))
    raw.sock.settimeout(10)
    while not any(isinstance(e, Pong) and e.payload == b"last" for e in raw.events):
        raw._read()
    raw.close()


def test_a_fragmented_message_read_in_many_pieces_is_relayed_whole(make_server):
    # 61,020 characters, under the 65,536 cap, once closed with 1009 when its second
    # frame took 5 or more reads.
    srv = make_server()
    bob = Client(srv.url)
    bob.register("bob@volli.app")
    alice = RawClient(srv.port)
    raw_register(alice, "alice@volli.app")
    envelope = {"type": "offer", "to": "bob@volli.app", "offer": {"type": "offer", "sdp": ""}}
    sdp = "é" * (61020 - len(json.dumps(envelope)))
    envelope["offer"]["sdp"] = sdp
    data = json.dumps(envelope, ensure_ascii=False).encode()
    assert len(data.decode()) == 61020
    alice.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    alice.send_raw(masked(OP_TEXT, data[:len(data) // 2], fin=False))
    cont = masked(OP_CONT, data[len(data) // 2:])
    for i in range(0, len(cont), 4096):  # 15 pieces, apart: the server reads each alone
        alice.send_raw(cont[i:i + 4096])
        time.sleep(0.03)
    assert bob.recv() == {**envelope, "from": "alice@volli.app"}
    alice.close()
    bob.close()


class _Events:
    """What a Connection reports, recorded (the hub's side of the interface)."""

    def __init__(self) -> None:
        self.undelivered: list = []

    def receive_text(self, session, text): pass

    def receive_binary(self, session): pass

    def receive_frames(self, session, count): pass

    def disconnect(self, session, then=lambda: None):
        then()

    def report_undelivered(self, peer, counts, busy=False):
        self.undelivered.append(dict(counts))


def test_a_slow_consumer_close_never_cuts_a_frame():
    """The 4002 close frame once went out in the middle of a partly written frame. Relays
    can no longer cause a 4002 (peer-busy instead), and on loopback the kernel's growing
    send buffer makes the remaining causes race the send timeout, so this drives a
    Connection over a real socket pair with a small send buffer, where a frame is surely
    partly written when the 4002 starts."""
    import _socket
    import gevent
    from wsproto.frame_protocol import FrameProtocol, Opcode

    from volli.protocol import CloseCode
    from volli.transport.connection import Connection

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock = _socket.socket(fileno=os.dup(ours.fileno()))
    sock.setblocking(False)
    events = _Events()
    conn = Connection(sock, detached=True, events=events, max_message_size=65536,
                      queue_limit=4_000_000, send_timeout=5, remote_addr="test")
    conn.user_id = "bob@volli.app"
    relays = [json.dumps({"type": "offer", "n": i, "sdp": "x" * 10_000}) for i in range(20)]
    for text in relays:
        assert conn.send(text, origin="alice@volli.app")
    gevent.sleep(0.05)  # written until the socket pair is full: one frame partly
    assert conn._protocol.offset > 0, "the scenario needs a partly written frame"
    conn.close(CloseCode.SLOW_CONSUMER, "too slow: output not read")
    theirs.setblocking(False)
    parser, frames = FrameProtocol(client=True, extensions=[]), []
    end = time.monotonic() + 10
    while not any(f.opcode is Opcode.CLOSE for f in frames) and time.monotonic() < end:
        gevent.sleep(0.01)  # the writer runs while we read
        try:
            data = theirs.recv(65536)
        except BlockingIOError:
            continue
        parser.receive_bytes(data)
        frames.extend(parser.received_frames())  # raises ParseFailed on a cut frame
    texts, text = [], ""
    for f in frames:  # wsproto hands out a frame's payload in the pieces that arrived
        if f.opcode in (Opcode.TEXT, Opcode.CONTINUATION):
            text += f.payload
            if f.message_finished:
                texts.append(text)
                text = ""
    closes = [f.payload for f in frames if f.opcode is Opcode.CLOSE]
    assert text == ""
    assert [c[0] for c in closes] == [4002], closes
    assert texts and texts == relays[:len(texts)]  # whole, in order, then the close
    # The kept, partly written relay counts as delivered; the rest are reported.
    assert sum(c["alice@volli.app"] for c in events.undelivered) == len(relays) - len(texts)
    for s in (sock, ours, theirs):
        s.close()


def test_a_peer_that_reads_its_replies_late_is_paused_not_dropped(make_server):
    # Backpressure: while its replies are over half the queue limit it is not read, so
    # 7 MB of replies through a 256 kB queue arrive whole instead of a 4002.
    srv = make_server({"VOLLI_SEND_QUEUE_LIMIT": "262144"})
    raw = RawClient(srv.port, rcvbuf=4096)
    count, pad = 40_000, "r" * 120
    requests = b"".join(masked(OP_TEXT, json.dumps(
        {"type": "ping", "requestId": f"{pad}{i}"}).encode()) for i in range(count))
    sender = threading.Thread(target=raw.send_raw, args=(requests,), daemon=True)
    raw.sock.settimeout(30)
    sender.start()
    time.sleep(1.0)  # not reading meanwhile
    ids = []
    while len(ids) < count:
        reply = json.loads(raw.next_message(deadline=30))
        ids.append(reply["requestId"])
    assert ids == [f"{pad}{i}" for i in range(count)]
    sender.join(5)
    assert srv.http("/health")[1]["connections"] == 1
    raw.close()


KEY = base64.b64encode(os.urandom(16)).decode()
UPGRADE = ["Upgrade: websocket", "Connection: Upgrade"]
BAD_HANDSHAKES = {
    "no key": ("GET", UPGRADE + ["Sec-WebSocket-Version: 13"], 400),
    "4-byte key": ("GET", UPGRADE + ["Sec-WebSocket-Key: AAAAAA==",
                                     "Sec-WebSocket-Version: 13"], 400),
    "key not base64": ("GET", UPGRADE + ["Sec-WebSocket-Key: " + "!" * 24,
                                         "Sec-WebSocket-Version: 13"], 400),
    "no version": ("GET", UPGRADE + [f"Sec-WebSocket-Key: {KEY}"], 426),
    "version 8": ("GET", UPGRADE + [f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 8"],
                  426),
    "no Upgrade": ("GET", ["Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}",
                           "Sec-WebSocket-Version: 13"], 400),
    "Connection without upgrade": ("GET", ["Upgrade: websocket", "Connection: keep-alive",
                                           f"Sec-WebSocket-Key: {KEY}",
                                           "Sec-WebSocket-Version: 13"], 400),
    "HEAD": ("HEAD", UPGRADE + [f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"], 400),
}


def http_exchange(port: int, method: str, headers: list[str]) -> tuple[int, dict, bytes]:
    """One raw request on its own connection: status, headers (lower-case), body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"{method} /signaling HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
                  + "".join(f"{h}\r\n" for h in headers).encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or b"\r\n\r\n"
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        fields = {k.lower(): v for k, v in fields.items()}
        length = int(fields.get("content-length", 0)) if method != "HEAD" else 0
        if lines[0].split()[1] == "101":  # the hello frame, under 126 bytes
            while len(body) < 2 or len(body) < 2 + body[1]:
                body += s.recv(65536)
        while len(body) < length:
            body += s.recv(65536)
    return int(lines[0].split()[1]), fields, body


def test_malformed_upgrades_get_400_or_426_with_json_and_no_traceback(make_server):
    srv = make_server()
    for name, (method, headers, status) in BAD_HANDSHAKES.items():
        got, fields, body = http_exchange(srv.port, method, headers)
        assert got == status, (name, got, body)
        if method == "GET":
            assert json.loads(body)["error"] == "bad-handshake", (name, body)
            assert fields["content-type"] == "application/json", name
        if status == 426:
            assert fields["sec-websocket-version"] == "13", name
    # A valid upgrade still works, also with Upgrade and Connection as token lists.
    got, fields, body = http_exchange(srv.port, "GET", [
        "Upgrade: h2c, WebSocket", "Connection: keep-alive, upgrade",
        f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"])
    assert got == 101 and json.loads(body[2:])["type"] == "hello", (got, body)
    client = Client(srv.url)
    client.register("ok@volli.app")
    client.close()
    log = srv.log()
    assert "Traceback" not in log
    assert log.count("bad handshake from") == len(BAD_HANDSHAKES)
    end = time.monotonic() + 5  # no slot was taken by a refusal
    while srv.http("/health")[1]["connections"] and time.monotonic() < end:
        time.sleep(0.1)
    assert srv.http("/health")[1]["connections"] == 0
