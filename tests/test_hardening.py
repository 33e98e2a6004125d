"""Findings of the hardening review (issue 11), each reproduced on a real gunicorn:
retention of registrations and bindings, look-alike keys and user IDs, key spellings,
IPv6 grouping of the per-IP limits, who gets TURN credentials, and the operator's unbind.
(The transport's findings live in tests/test_transport_hardening.py.)"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed

from conftest import ROOT, Client
from signing import Identity
from wsclient import churn_registrations, worker_pid, worker_rss_kb


# -- finding 2: nothing is kept for unsigned users; bindings are bounded -----------------

def test_unsigned_registrations_leave_nothing_behind(make_server, backend_env, redis_server):
    """Thousands of distinct unsigned IDs with 4,000-character keys, each registered once
    and closed: the worker's memory returns to its baseline and nothing stays stored."""
    prefix = f"churn{os.getpid()}{time.monotonic_ns() % 100000}:"
    srv = make_server({"VOLLI_REDIS_PREFIX": prefix})
    key = "A" * 4000
    churn_registrations(srv.port, 500, key, "warm")  # the allocator's and caches' warm-up
    time.sleep(0.5)
    pid = worker_pid(srv)
    baseline = worker_rss_kb(pid)
    churn_registrations(srv.port, 4000, key, "churn")
    time.sleep(1.0)
    after = worker_rss_kb(pid)
    status, health = srv.http("/health")
    assert status == 200 and health["online"] == 0
    if "VOLLI_REDIS_URL" in backend_env:
        assert health["bindings"] is None
        # Only the deployment's epoch and the node's alive key (docs/scaling.md), nothing
        # per user.
        assert sorted(_redis_keys(redis_server, prefix)) == [
            f"{prefix}alive:".encode() + node for node in _nodes(srv)] + [
            f"{prefix}epoch".encode()]
    else:
        assert health["bindings"] == 0
    assert after <= baseline * 1.10, f"worker grew from {baseline} kB to {after} kB"


def _nodes(srv) -> list[bytes]:
    """The Redis node ids of the server's workers, from their listener's log line."""
    return sorted(re.findall(rb"redis listener subscribed to \S+?node:(\S+)",
                             srv.log_path.read_bytes()))


def _redis_keys(redis_server, prefix: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        return list(client.scan_iter(f"{prefix}*"))
    finally:
        client.close()


RETENTION_2S = {"VOLLI_BINDING_RETENTION": "2", "VOLLI_PRESENCE_TTL": "1"}


def test_bindings_expire_after_the_retention(make_server, uid):
    srv = make_server(RETENTION_2S)
    user, me = uid("kept"), Identity()
    first = Client(srv.url)
    assert me.register(first, user)["type"] == "registered"
    first.close()
    time.sleep(0.3)
    thief = Client(srv.url)
    assert thief.call({"type": "register", "userId": user, "publicKey": "AAAA"})["code"] \
        == "identity-bound"
    time.sleep(2.5)
    assert thief.call({"type": "register", "userId": user, "publicKey": "AAAA"})["type"] \
        == "registered"
    thief.close()


def test_an_online_users_binding_never_expires(make_server, uid):
    """Found by an attack: with Redis, the binding of a user connected for longer than the
    retention lapsed (only registrations and closes renewed it), and its ID was free."""
    srv = make_server(RETENTION_2S)
    user, owner = uid("online"), Identity()
    holder = Client(srv.url)
    assert owner.register(holder, user)["type"] == "registered"
    time.sleep(5)  # two and a half retentions, connected
    assert holder.call({"type": "ping"})["type"] == "pong"
    holder.close()
    time.sleep(0.5)
    thief = Client(srv.url)
    assert Identity().register(thief, user)["code"] == "bad-signature"
    thief.register(uid("looker"))
    assert thief.call({"type": "discover", "userId": user})["verified"] is True
    thief.close()


def test_new_bindings_beyond_the_cap_are_refused_and_none_is_forgotten(make_server):
    srv = make_server({"VOLLI_MAX_BINDINGS": "10"})
    owners = {f"capped-{i}-{srv.port}": Identity() for i in range(10)}
    for user, owner in owners.items():
        client = Client(srv.url)
        assert owner.register(client, user)["type"] == "registered"
        client.close()
    time.sleep(0.3)
    attacker = Client(srv.url)
    # An 11th new ID is refused; flooding bindings frees no bound ID for anyone.
    assert Identity().register(attacker, f"new-{srv.port}")["code"] == "bindings-full"
    first = next(iter(owners))
    assert Identity().register(attacker, first)["code"] == "bad-signature"
    assert attacker.call({"type": "register", "userId": first, "publicKey": "AAAA"}
                         )["code"] == "identity-bound"
    assert owners[first].register(attacker, first)["type"] == "registered"  # still its own
    attacker.close()


def test_discover_says_whether_the_key_is_verified(server, clients, uid):
    signed, plain, asker = uid("signed"), uid("plain"), uid("asker")
    me = Identity()
    assert me.register(clients(), signed)["type"] == "registered"
    clients().register(plain)
    looker = clients()
    looker.register(asker)
    online_signed = looker.call({"type": "discover", "userId": signed})
    assert online_signed["verified"] is True and online_signed["publicKey"] == me.public
    assert looker.call({"type": "discover", "userId": plain})["verified"] is False
    nobody = uid("nobody")
    reply = looker.call({"type": "discover", "userId": nobody})
    assert {k: v for k, v in reply.items() if k != "requestId"} == {
        "type": "discover-response", "userId": nobody, "online": False, "publicKey": None,
        "verified": False}


# -- finding 3: receivers read what the server checked -------------------------------

@pytest.mark.parametrize("extra", [
    '"From":"carol"', '"FROM":"carol"', '"fRoM":"carol"', '"from\\u0000":"carol"',
    '"To":"carol"', '"TYPE":"answer"', '"to":"carol"', '"type":"ice-candidate","candidate":null',
    '"\\u0074o":"carol"', '"from":"carol","from":"ALICE"',
])
def test_relays_another_parser_could_misread_are_refused(server, clients, uid, extra):
    alice, bob = uid("alice"), uid("bob")
    sender, receiver = clients(), clients()
    sender.register(alice)
    receiver.register(bob)
    text = (f'{{"type":"offer","to":{json.dumps(bob)},"offer":{{"sdp":"x"}},{extra},'
            f'"requestId":"bad"}}')
    sender.send(text)
    reply = sender.recv()
    assert reply["type"] == "error" and reply["code"] == "invalid-message", reply
    sender.send({"type": "offer", "to": bob, "offer": {"sdp": "ok"}})
    relayed = receiver.recv()
    assert relayed["offer"] == {"sdp": "ok"}, "the refused relay reached the receiver"


def test_relays_arrive_compact_with_one_from(server, clients, uid):
    alice, bob = uid("alice"), uid("bob")
    sender, receiver = clients(), clients()
    sender.register(alice)
    receiver.register(bob)
    sender.send('{ "type" : "offer", "to" : ' + json.dumps(bob) + ', "offer" : {"n": 1e2} }')
    raw = receiver.ws.recv(timeout=5)
    assert raw == ('{"type":"offer","to":' + json.dumps(bob) + ',"offer":{"n":100.0},'
                   '"from":' + json.dumps(alice) + '}')


# -- finding 9: one key, one spelling ------------------------------------------------

def _spellings(public: str) -> list[str]:
    return [public.rstrip("="), public.replace("+", "-").replace("/", "_"),
            public.replace("+", "-").replace("/", "_").rstrip("=")]


def test_a_bound_key_is_the_same_key_in_any_base64_spelling(server, uid):
    me = Identity()
    user = uid("spelled")
    for spelling in [None, *_spellings(me.public)]:
        client = Client(server.url)
        reply = me.register(client, user, spelling=spelling)
        assert reply["type"] == "registered", (spelling, reply)
        client.close()
        time.sleep(0.1)


def test_keys_are_bound_and_shown_in_the_canonical_spelling(server, clients, uid):
    me = Identity()
    user = uid("canonical")
    unpadded_urlsafe = _spellings(me.public)[2]
    assert me.register(clients(), user, spelling=unpadded_urlsafe)["type"] == "registered"
    looker = clients()
    looker.register(uid("looker"))
    assert looker.call({"type": "discover", "userId": user})["publicKey"] == me.public
    # The padded standard spelling of the same bytes takes over (same key), not refused.
    assert me.register(clients(), user)["type"] == "registered"


# -- finding 10: visually identical user IDs ------------------------------------------

@pytest.mark.parametrize("user_id", [
    "alice\u200b", "\u202ealice", "\ufeffalice", " ", "\u200b", "cafe\u0301", "alice ",
    "alice smith\u2800", "alice\u00a0smith", "alice\u3000smith", "alice  smith",
])
def test_user_ids_that_look_like_others_are_refused(server, clients, user_id):
    client = clients()
    reply = client.call({"type": "register", "userId": user_id, "publicKey": "AAAA"})
    assert reply["code"] == "invalid-user-id", reply
    assert client.call({"type": "register", "userId": "caf\u00e9-" + str(time.monotonic_ns()),
                        "publicKey": "AAAA"})["type"] == "registered"


# -- finding 11: IPv6 clients are limited per /64; TURN for signed sessions ------------

def _upgrade_status(port: int, forwarded_for: str) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /signaling HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\nX-Forwarded-For: {forwarded_for}\r\n\r\n"
                      ).encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_per_ip_limits_group_ipv6_clients_by_prefix(make_server):
    srv = make_server({"VOLLI_TRUSTED_PROXIES": "1", "VOLLI_IP_CONNECT_RATE": "1"})
    # Burst of 2 per group: a third address in the same /64 is refused...
    assert _upgrade_status(srv.port, "2001:db8:1:2::1") == 101
    assert _upgrade_status(srv.port, "2001:db8:1:2::2") == 101
    assert _upgrade_status(srv.port, "2001:db8:1:2:ffff::3") == 429
    # ...while another /64, and IPv4 addresses, have their own budgets.
    assert _upgrade_status(srv.port, "2001:db8:1:3::1") == 101
    assert _upgrade_status(srv.port, "192.0.2.1") == 101
    assert _upgrade_status(srv.port, "192.0.2.2") == 101
    # A port some load balancers append does not make a new client.
    assert _upgrade_status(srv.port, "192.0.2.1:4242") == 101
    assert _upgrade_status(srv.port, "192.0.2.1:4343") == 429
    assert _upgrade_status(srv.port, "[2001:db8:1:3::9]:4242") == 101
    assert _upgrade_status(srv.port, "[2001:db8:1:3::a]:4343") == 429


TURN = {"VOLLI_TURN_SECRET": "s3cret", "VOLLI_TURN_URIS": "stun:stun.test:3478,turn:turn.test:3478"}


def _servers(reply: dict) -> dict[str, dict]:
    return {uri: server for server in reply["iceServers"] for uri in server["urls"]}


def test_turn_credentials_go_to_signed_sessions_only_by_default(make_server, uid):
    srv = make_server(TURN)
    plain = Client(srv.url)
    plain.send({"type": "register", "userId": uid("plain"), "publicKey": "AAAA"})
    assert plain.recv()["type"] == "registered"
    pushed = plain.recv()
    assert pushed["type"] == "ice-servers" and list(_servers(pushed)) == ["stun:stun.test:3478"]
    assert plain.call({"type": "ice-servers"})["code"] == "signature-required"
    signed = Client(srv.url)
    assert Identity().register(signed, uid("signed"))["type"] == "registered"
    pushed = signed.recv()
    turn = _servers(pushed)["turn:turn.test:3478"]
    expiry = int(turn["username"].split(":", 1)[0])
    assert 3500 < expiry - time.time() <= 3600  # VOLLI_TURN_TTL defaults to an hour
    plain.close()
    signed.close()


def test_turn_credentials_are_rate_limited_per_connection(make_server, uid):
    srv = make_server({**TURN, "VOLLI_TURN_FOR": "all"})
    client = Client(srv.url)
    client.send({"type": "register", "userId": uid("many"), "publicKey": "AAAA"})
    assert client.recv()["type"] == "registered"
    assert "turn:turn.test:3478" in _servers(client.recv())  # "all": unsigned too
    replies = [client.call({"type": "ice-servers"}) for _ in range(6)]
    assert [r["type"] for r in replies] == ["ice-servers"] * 5 + ["error"]
    assert replies[-1]["code"] == "rate-limited" and replies[-1]["limit"] == "ice-servers-rate"
    client.close()


# -- the operator's unbind -----------------------------------------------------------

def _unbind(srv, user_id: str, token: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volli.admin", "unbind", user_id,
                           "--url", f"http://127.0.0.1:{srv.port}"], cwd=ROOT,
                          env={**os.environ, "VOLLI_ADMIN_TOKEN": token},
                          capture_output=True, text=True, timeout=30)


def test_operator_unbinds_a_user_id(make_server, uid):
    srv = make_server({"VOLLI_ADMIN_TOKEN": "t0ken"})
    user, lost_key = uid("lost"), Identity()
    holder = Client(srv.url)
    assert lost_key.register(holder, user)["type"] == "registered"
    assert _unbind(srv, user, "wrong").returncode == 1
    done = _unbind(srv, user, "t0ken")
    assert done.returncode == 0, done.stderr
    assert holder.recv() == {"type": "session-replaced"}
    with pytest.raises(ConnectionClosed) as info:
        holder.ws.recv(timeout=5)
    assert info.value.rcvd.code == 4000
    fresh = Client(srv.url)
    assert Identity().register(fresh, user)["type"] == "registered"  # a new key binds it
    fresh.close()
    assert _unbind(srv, uid("never-bound"), "t0ken").returncode == 1


def test_admin_endpoints_are_off_without_a_token(server):
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/admin/bindings/x",
                                     method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 404


# -- frame floods (found by an attack on the first fixes) ---------------------------

def _flood(port: int, frames: bytes, seconds: float, first: bytes = b"") -> int | None:
    """Send ``first``, then ``frames`` over and over for at most ``seconds``; the close
    code, or None."""
    from rawclient import RawClient

    client = RawClient(port)
    end = time.monotonic() + seconds
    try:
        client.send_raw(first)
        while time.monotonic() < end:
            client.send_raw(frames)
    except OSError:
        pass
    try:
        return client.wait_close(10)
    except OSError:
        return None
    finally:
        client.close()


def test_frame_floods_are_closed_4029(tmp_path):
    from conftest import Server
    from rawclient import masked

    srv = Server(tmp_path, {"VOLLI_RATE_FRAMES": "500"}).wait_ready()
    try:
        pings = masked(0x9, b"") * 1000
        assert _flood(srv.port, pings, 5) == 4029
        opened = masked(0x1, b"{", fin=False)
        empty = masked(0x0, b"", fin=False) * 1000
        assert _flood(srv.port, empty, 5, first=opened) == 4029
        assert "sent frames faster than VOLLI_RATE_FRAMES" in srv.log()
    finally:
        srv.stop()


def test_empty_continuation_frames_do_not_grow_memory(make_server):
    """Even where the frame rate allows them, frames that carry nothing cost nothing."""
    from rawclient import RawClient, masked

    srv = make_server()  # permissive limits: VOLLI_RATE_FRAMES is out of the way
    pid = worker_pid(srv)
    baseline = worker_rss_kb(pid)
    client = RawClient(srv.port)
    client.send_raw(masked(0x1, b'{"type":', fin=False))
    empty = masked(0x0, b"", fin=False) * 10000
    for _ in range(300):  # three million empty frames, 18 MB on the wire
        client.send_raw(empty)
    _wait_idle(pid)  # every frame parsed, the message still open: measure now
    grown = worker_rss_kb(pid) - baseline
    client.send_raw(masked(0x0, b'"ping","requestId":"after"}'))
    assert json.loads(client.next_message(30)) == {"type": "pong", "requestId": "after"}
    client.close()
    assert grown < 8000, f"the worker grew by {grown} kB"


def _wait_idle(pid: int, deadline: float = 30.0) -> None:
    """Until the process used no CPU for half a second (bounded)."""
    def cpu() -> int:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    end = time.monotonic() + deadline
    last = cpu()
    while time.monotonic() < end:
        time.sleep(0.5)
        now = cpu()
        if now == last:
            return
        last = now
    raise AssertionError(f"worker {pid} still busy after {deadline}s")


def test_a_client_that_resets_during_the_handshake_leaves_no_traceback(server):
    import socket
    import struct

    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /signaling HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, before the 101 is read
    time.sleep(1.0)
    assert server.http("/health")[0] == 200
    log = server.log()
    assert "Traceback" not in log and "Exception on /signaling" not in log, log[-3000:]


# -- no sender can get a receiver closed (found by the attack) ----------------------

def test_a_flood_of_large_relays_gets_the_sender_peer_busy_not_the_receiver_closed(
        server, clients, uid):
    """60 relays of 60,000 emoji (240 kB each) at a receiver reading 2 MB/s once made it
    a "slow consumer" (4002) on demand. Now the flooder's relays are refused with
    peer-busy while the receiver's queue is full, and the receiver stays."""
    from rawclient import RawClient
    from wsproto.events import CloseConnection, TextMessage

    victim_id, attacker_id, friend_id = uid("victim"), uid("attacker"), uid("friend")
    victim = RawClient(server.port)
    victim.send_json({"type": "register", "userId": victim_id, "publicKey": "AAAA"})
    assert json.loads(victim.next_message())["type"] == "registered"
    attacker, friend = clients(), clients()
    attacker.register(attacker_id)
    friend.register(friend_id)
    victim.sock.setblocking(False)

    def read_a_while(seconds: float) -> None:  # 64 kB every 30 ms: about 2 MB/s
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = victim.sock.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                break
            if data:
                victim.ws.receive_data(data)
                victim.events.extend(victim.ws.events())
            time.sleep(0.03)

    emoji = "\U0001f600" * 60_000
    for i in range(60):
        attacker.send(json.dumps({"type": "offer", "to": victim_id, "offer": {"sdp": emoji},
                                  "requestId": i}, ensure_ascii=False))
    read_a_while(4)
    friend.send({"type": "offer", "to": victim_id, "offer": {"sdp": "hello"}})
    read_a_while(3)
    assert not [e for e in victim.events if isinstance(e, CloseConnection)], "victim closed"
    texts, text = [], ""
    for event in victim.events:  # wsproto hands out messages in the pieces that arrived
        if isinstance(event, TextMessage):
            text += event.data
            if event.message_finished:
                texts.append(json.loads(text))
                text = ""
    assert texts[-1] == {"type": "offer", "to": victim_id, "offer": {"sdp": "hello"},
                         "from": friend_id}
    replies = []
    while True:
        try:
            replies.append(attacker.recv(timeout=1))
        except TimeoutError:
            break
    codes = {r["code"] for r in replies}
    assert codes == {"peer-busy"}, codes
    delivered = [t for t in texts if t.get("from") == attacker_id]
    assert len(delivered) + len(replies) == 60  # each relay delivered or refused, once
    assert friend.call({"type": "discover", "userId": victim_id})["online"] is True
    victim.close()
