"""Reconnect storms (issue 16): a burst of upgrades served while established users relay,
the probe port, and relays that leave at the end of the read that queued them instead of
waiting behind a flood of new connections in the event loop's callback queue."""

from __future__ import annotations

import _socket
import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request

import gevent
import pytest

from conftest import free_port
from rawclient import RawClient, masked


def upgrade_request(port: int, n: int) -> bytes:
    key = base64.b64encode(n.to_bytes(16, "big")).decode()
    return (f"GET /signaling HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), fields, rest


def read_json_frame(sock: socket.socket, buf: bytes) -> tuple[dict, bytes]:
    """One unmasked, unfragmented server text frame under 64 KiB."""
    while True:
        if len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126 and len(buf) >= 4:
                n, at = int.from_bytes(buf[2:4], "big"), 4
            if n != 126 and len(buf) >= at + n:
                return json.loads(buf[at:at + n]), buf[at + n:]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in a frame")
        buf += chunk


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_burst_of_upgrades_is_all_served_while_established_users_relay(make_server):
    """300 upgrades at once (more than one wake-up of the listener accepts) while an
    established pair keeps relaying: every upgrade becomes a registered WebSocket and
    every relay arrives, in order."""
    srv = make_server()
    alice, bob = RawClient(srv.port), RawClient(srv.port)
    for raw, user in ((alice, "alice@volli.app"), (bob, "bob@volli.app")):
        raw.send_json({"type": "register", "userId": user, "publicKey": "pk"})
        assert json.loads(raw.next_message())["type"] == "registered"
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=20) for _ in range(300)]
    try:
        for n, s in enumerate(socks):
            s.sendall(upgrade_request(srv.port, n))
        for n in range(50):  # relays while the burst is handled
            alice.send_json({"type": "offer", "to": "bob@volli.app", "offer": {"n": n}})
        leftovers = []
        for n, s in enumerate(socks):
            status, fields, rest = read_head(s)
            assert status == 101, (n, status, fields)
            hello, rest = read_json_frame(s, rest)
            assert hello["type"] == "hello"
            s.sendall(masked(1, json.dumps({"type": "register", "userId": f"burst-{n}@volli.app",
                                            "publicKey": "pk"}).encode()))
            leftovers.append(rest)
        for n, s in enumerate(socks):
            reply, _ = read_json_frame(s, leftovers[n])
            assert reply == {"type": "registered", "userId": f"burst-{n}@volli.app"}, reply
        got = [json.loads(bob.next_message(deadline=20)) for _ in range(50)]
        assert [m["offer"]["n"] for m in got] == list(range(50))
        assert all(m["from"] == "alice@volli.app" for m in got)
    finally:
        for s in socks:
            s.close()
        alice.close()
        bob.close()


def test_a_browser_upgrade_through_a_proxy_is_admitted_on_all_its_headers(make_server):
    """Admission reads Origin and X-Forwarded-For before the handshake sees only its own
    headers (volli/transport/handshake.py: keep_handshake_headers)."""
    srv = make_server({"VOLLI_TRUSTED_PROXIES": "1",
                       "VOLLI_ALLOWED_ORIGINS": "https://app.example"})
    extra = ("User-Agent: Mozilla/5.0 Chrome/131.0\r\nOrigin: https://app.example\r\n"
             "Cookie: a=b\r\nAccept-Language: en\r\nX-Forwarded-For: 203.0.113.9\r\n")
    for origin, expected in (("https://app.example", 101), ("https://evil.example", 403)):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            request = upgrade_request(srv.port, 7).replace(
                b"\r\n\r\n", b"\r\n" + extra.replace("https://app.example", origin).encode()
                + b"\r\n")
            s.sendall(request)
            status, _, rest = read_head(s)
            assert status == expected
            if status == 101:
                hello, rest = read_json_frame(s, rest)
                s.sendall(masked(1, json.dumps({"type": "register", "userId": "proxied@volli.app",
                                                "publicKey": "pk"}).encode()))
                reply, _ = read_json_frame(s, rest)
                assert reply["type"] == "registered"
    assert "registered user=proxied@volli.app" in srv.wait_log("ip=203.0.113.9 signed=")


def test_the_probe_port_serves_only_the_probes(make_server):
    probe = free_port()
    srv = make_server({"VOLLI_HEALTH_PORT": str(probe)})
    status, body = http_get(probe, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    end = time.monotonic() + 10  # with Redis: once the worker's listener is subscribed
    while http_get(probe, "/ready")[0] != 200 and time.monotonic() < end:
        time.sleep(0.1)
    assert http_get(probe, "/ready")[0] == 200
    status, body = http_get(probe, "/metrics")
    assert status == 200 and b"volli_connections" in body
    for path in ("/", "/signaling", "/demo"):
        status, body = http_get(probe, path)
        assert status == 404 and json.loads(body)["error"] == "not-found", (path, status)
    with socket.create_connection(("127.0.0.1", probe), timeout=5) as s:
        s.sendall(upgrade_request(probe, 1))
        assert read_head(s)[0] == 404  # no WebSocket on the probe port
    assert http_get(srv.port, "/health")[0] == 200  # the main port still has everything
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(upgrade_request(srv.port, 1))
        assert read_head(s)[0] == 101


def test_the_probe_port_must_differ_from_the_port():
    from volli.config import ConfigError, load

    with pytest.raises(ConfigError, match="VOLLI_HEALTH_PORT must differ from PORT"):
        load({"PORT": "8080", "VOLLI_HEALTH_PORT": "8080"})
    assert load({"PORT": "8080", "VOLLI_HEALTH_PORT": "8081"}).health_port == 8081


# -- in-process: the flush ------------------------------------------------------------------

class _Relay:
    """The hub's part, cut down: relays every text to ``target``."""

    def __init__(self) -> None:
        self.target = None

    def receive_text(self, session, text):
        self.target.send(text, origin="alice@volli.app")

    def receive_frames(self, session, count):
        pass

    def disconnect(self, session, then=lambda: None):
        then()

    def report_undelivered(self, peer, counts, busy=False):
        pass


def _connection(events):
    from volli.transport.connection import Connection

    ours, theirs = socket.socketpair()
    sock = _socket.socket(fileno=os.dup(ours.fileno()))
    ours.close()
    sock.setblocking(False)
    theirs.setblocking(False)
    conn = Connection(sock, detached=True, events=events, max_message_size=65536,
                      queue_limit=1_000_000, send_timeout=5, remote_addr="test")
    return conn, sock, theirs


def test_a_relay_leaves_at_the_end_of_the_read_that_queued_it():
    """No yield to the event loop between the read and the check: the relay to the other
    connection was written by the read itself. Output queued outside a read waits for the
    loop's flush callback (the control: the check sees nothing until the test yields)."""
    events = _Relay()
    alice, alice_sock, alice_peer = _connection(events)
    bob, bob_sock, bob_peer = _connection(events)
    events.target = bob
    try:
        bob.send('{"type":"ping-from-outside"}')
        with pytest.raises(BlockingIOError):
            bob_peer.recv(65536)  # queued outside a read: still waiting for the callback
        gevent.sleep(0)
        assert b"ping-from-outside" in bob_peer.recv(65536)

        alice_peer.sendall(masked(1, b'{"type":"offer","to":"bob@volli.app"}'))
        alice.read()  # what a reader greenlet does when alice's socket turns readable
        data = bob_peer.recv(65536)  # no yield since the read
        assert data.endswith(b'{"type":"offer","to":"bob@volli.app"}'), data
    finally:
        for s in (alice_sock, alice_peer, bob_sock, bob_peer):
            s.close()


class _CountingSocket(_socket.socket):
    recvs = 0

    def recv(self, size, *args):
        self.recvs += 1
        return super().recv(size, *args)


def test_a_read_that_drains_the_socket_makes_no_second_recv():
    """One recv per message at low load: a short read means the socket is drained (the
    watcher fires again for more); before, every read ended in a recv that failed with
    EAGAIN, a syscall and an exception per message. A full read still reads on."""
    from volli.transport.connection import RECV_SIZE, Connection

    events = _Relay()
    ours, theirs = socket.socketpair()
    sock = _CountingSocket(fileno=os.dup(ours.fileno()))
    ours.close()
    sock.setblocking(False)
    conn = Connection(sock, detached=True, events=events, max_message_size=1 << 20,
                      queue_limit=4_000_000, send_timeout=5, remote_addr="test")
    target, target_sock, target_peer = _connection(events)
    events.target = target
    try:
        theirs.sendall(masked(1, b'{"type":"offer","to":"bob@volli.app"}'))
        conn.read()
        assert sock.recvs == 1
        assert target_peer.recv(65536).endswith(b'{"type":"offer","to":"bob@volli.app"}')

        big = b'{"type":"offer","to":"bob@volli.app","sdp":"' + b"x" * (3 * RECV_SIZE) + b'"}'
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        theirs.sendall(masked(1, big))  # all of it waits in the socket pair
        sock.recvs = 0
        conn.read()
        assert sock.recvs >= 4  # full reads go on until a short one
        gevent.sleep(0.1)  # the relay is bigger than the socket pair's buffer: a writer
        got = b""
        end = time.monotonic() + 10
        while not got.endswith(b'"}') and time.monotonic() < end:
            try:
                got += target_peer.recv(1 << 20)
            except BlockingIOError:
                gevent.sleep(0.01)
        assert got.endswith(big)
    finally:
        for s in (sock, theirs, target_sock, target_peer):
            s.close()


def test_a_connection_whose_flush_fails_does_not_hold_up_the_others():
    """Connections are flushed in batches: one that raises (a bug) is released and logged,
    and the rest of the batch is written all the same."""
    events = _Relay()
    broken, broken_sock, broken_peer = _connection(events)
    fine, fine_sock, fine_peer = _connection(events)
    released = []
    broken._flush = lambda: (_ for _ in ()).throw(RuntimeError("a bug"))
    broken._on_finished = released.append
    try:
        broken.send('{"type":"to-broken"}')
        fine.send('{"type":"to-fine"}')
        gevent.sleep(0.05)  # the loop's flush callback, then the release it spawned
        assert fine_peer.recv(65536).endswith(b'{"type":"to-fine"}')
        assert released == [broken]
    finally:
        for s in (broken_sock, broken_peer, fine_sock, fine_peer):
            s.close()
