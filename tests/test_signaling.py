"""Protocol v1 end to end: real gunicorn (gevent worker), real WebSocket clients."""

from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed

from rawclient import RawClient

SEED_REGISTER = """{
  "type": "register",
  "userId": "alice@volli.app",
  "publicKey": "base64-encoded-public-key"
}"""
SEED_DISCOVER = """{
  "type": "discover",
  "userId": "bob@volli.app"
}"""
SEED_OFFER = """{
  "type": "offer",
  "from": "alice@volli.app",
  "to": "bob@volli.app",
  "offer": {
    "type": "offer",
    "sdp": "..."
  }
}"""
SEED_ANSWER = """{
  "type": "answer",
  "from": "bob@volli.app",
  "to": "alice@volli.app",
  "answer": {
    "type": "answer",
    "sdp": "..."
  }
}"""


def test_seed_readme_messages_byte_for_byte(server, clients):
    alice, bob = clients(), clients()
    alice.send(SEED_REGISTER)
    assert alice.recv() == {"type": "registered", "userId": "alice@volli.app"}
    bob.send(SEED_REGISTER.replace("alice", "bob"))
    assert bob.recv() == {"type": "registered", "userId": "bob@volli.app"}
    alice.send(SEED_DISCOVER)
    # The seed's four fields as written, plus "verified" (unsigned: false), which seed
    # clients ignore.
    assert alice.recv() == {"type": "discover-response", "userId": "bob@volli.app",
                            "online": True, "publicKey": "base64-encoded-public-key",
                            "verified": False}
    alice.send(SEED_OFFER)
    assert bob.recv() == json.loads(SEED_OFFER)
    bob.send(SEED_ANSWER)
    assert alice.recv() == json.loads(SEED_ANSWER)


def test_discover_unknown_user(clients, uid):
    alice = clients()
    alice.register(uid("alice"))
    reply = alice.request({"type": "discover", "userId": "nobody@volli.app"})
    assert reply == {"type": "discover-response", "userId": "nobody@volli.app",
                     "online": False, "publicKey": None, "verified": False}


@pytest.mark.parametrize("kind,field,payload", [
    ("offer", "offer", {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}),
    ("answer", "answer", {"type": "answer", "sdp": "v=0\r\n"}),
    ("ice-candidate", "candidate", {
        "candidate": "candidate:842163049 1 udp 1677729535 127.0.0.1 46154 typ srflx",
        "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "abcd"}),
    ("ice-candidate", "candidate", None),
])
def test_relay_each_type_both_ways_with_from_set_by_server(clients, uid, kind, field, payload):
    a, b = uid("a"), uid("b")
    ca, cb = clients(), clients()
    ca.register(a)
    cb.register(b)
    ca.send({"type": kind, "to": b, field: payload, "extra": {"kept": True}})
    assert cb.recv() == {"type": kind, "to": b, field: payload, "extra": {"kept": True},
                         "from": a}
    cb.send({"type": kind, "from": b, "to": a, field: payload})
    assert ca.recv() == {"type": kind, "from": b, "to": a, field: payload}


def test_spoofed_from_is_refused_and_never_relayed(clients, uid):
    a, b = uid("a"), uid("b")
    ca, cb = clients(), clients()
    ca.register(a)
    cb.register(b)
    reply = ca.request({"type": "offer", "from": b, "to": b, "offer": {"sdp": "x"},
                        "requestId": "spoof"})
    assert reply["code"] == "forbidden-sender" and reply["requestId"] == "spoof"
    cb.send({"type": "ping"})
    assert cb.recv() == {"type": "pong"}  # nothing was relayed before the pong


def test_registration_rules(clients, uid):
    a = uid("a")
    first, second = clients(), clients()
    first.register(a)
    reply = second.request({"type": "register", "userId": a, "publicKey": "AAAA"})
    assert reply["type"] == "error" and reply["code"] == "user-id-taken"
    reply = first.request({"type": "register", "userId": uid("other"), "publicKey": "AAAA",
                           "requestId": 9})
    assert reply["code"] == "already-registered" and reply["requestId"] == 9
    # the refused connection stays usable
    second.register(uid("b"))


def test_requires_registration(clients, uid):
    c = clients()
    for message in ({"type": "discover", "userId": "x"},
                    {"type": "offer", "to": "x", "offer": {}},
                    {"type": "answer", "to": "x", "answer": {}},
                    {"type": "ice-candidate", "to": "x", "candidate": None}):
        assert c.request(message)["code"] == "not-registered"
    assert c.request({"type": "ping", "requestId": "p"}) == {"type": "pong", "requestId": "p"}


def test_peer_offline(clients, uid):
    c = clients()
    c.register(uid("a"))
    reply = c.request({"type": "offer", "to": uid("ghost"), "offer": {}, "requestId": "r"})
    assert reply["code"] == "peer-offline" and reply["requestId"] == "r"


@pytest.mark.parametrize("frame,code", [
    ("{not json", "invalid-json"),
    ("[]", "invalid-message"),
    ('{"type":"offer","to":"x"}', "invalid-message"),
    ('{"type":"register","userId":"a\\u0007","publicKey":"AAAA"}', "invalid-user-id"),
    ('{"type":"register","userId":"' + "u" * 257 + '","publicKey":"AAAA"}', "invalid-user-id"),
    ('{"type":"register","userId":"u","publicKey":"' + "A" * 4097 + '"}', "invalid-message"),
    ('{"type":"subscribe"}', "unknown-type"),
    ('{"type":"ping","requestId":{"a":1}}', "invalid-message"),
    ('{"n":' + "9" * 400 + "}", "invalid-json"),
    ("[" * 2000 + "]" * 2000, "invalid-json"),
    (b"\x00\x01binary", "binary-frame"),
])
def test_bad_frames_get_an_error_and_the_connection_stays_good(clients, uid, frame, code):
    c = clients()
    c.register(uid("a"))
    c.send(frame)
    reply = c.recv()
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"]
    assert c.request({"type": "ping"}) == {"type": "pong"}


def test_invalid_utf8_text_frame_closes_with_1007_and_server_keeps_serving(server, clients):
    raw = RawClient(server.port)
    # A text frame whose payload is not UTF-8: a WebSocket protocol error, not a message.
    from wsproto.frame_protocol import Opcode
    header = bytes([0x80 | Opcode.TEXT, 0x80 | 2]) + b"\x00\x00\x00\x00"
    raw.send_raw(header + b"\xff\xfe")
    assert raw.wait_close() == 1007
    raw.close()
    assert clients().request({"type": "ping"}) == {"type": "pong"}


def test_oversized_frame_closes_with_1009(server, clients, uid):
    big, small = clients(), clients()
    big.register(uid("big"))
    big.send(json.dumps({"type": "ping", "pad": "x" * 70_000}))
    with pytest.raises(ConnectionClosed) as info:
        big.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    small.register(uid("small"))
    assert small.request({"type": "ping", "pad": "x" * 60_000}) == {"type": "pong"}


def test_a_huge_frame_still_gets_its_1009(clients, uid):
    # The server stops reading mid-frame; its close must not turn into a reset.
    for _ in range(3):
        big = clients()
        big.send(json.dumps({"type": "ping", "pad": "x" * 5_000_000}))
        with pytest.raises(ConnectionClosed) as info:
            big.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_message_size_cap_is_configurable(make_server, clients):
    srv = make_server({"VOLLI_MAX_MESSAGE_SIZE": "1024"})
    c = clients(srv.url)
    assert c.request({"type": "ping", "pad": "x" * 900}) == {"type": "pong"}
    c.send({"type": "ping", "pad": "x" * 1100})
    with pytest.raises(ConnectionClosed) as info:
        c.recv()
    assert info.value.rcvd.code == 1009


def test_disconnect_removes_user_at_once_and_id_can_be_reused(clients, uid):
    a, w = uid("a"), uid("w")
    watcher, first = clients(), clients()
    watcher.register(w)
    first.register(a)
    first.close()
    deadline = time.monotonic() + 5
    while watcher.request({"type": "discover", "userId": a})["online"]:
        assert time.monotonic() < deadline, "user still online after its connection closed"
        time.sleep(0.02)
    again = clients()
    again.register(a)
    assert watcher.request({"type": "discover", "userId": a})["online"] is True
    watcher.send({"type": "offer", "to": a, "offer": {"sdp": "new"}})
    assert again.recv() == {"type": "offer", "to": a, "offer": {"sdp": "new"}, "from": w}


def test_register_timeout_closes_with_4001(make_server, clients):
    srv = make_server({"VOLLI_REGISTER_TIMEOUT": "0.5"})
    idle, active = clients(srv.url), clients(srv.url)
    active.register("active@volli.app")
    with pytest.raises(ConnectionClosed) as info:
        idle.recv(timeout=5)
    assert info.value.rcvd.code == 4001
    time.sleep(0.6)  # the registered one outlives the timeout
    assert active.request({"type": "ping"}) == {"type": "pong"}


def test_dead_peer_is_detected_by_ping_timeout(make_server, clients):
    srv = make_server({"VOLLI_PING_INTERVAL": "0.5"})
    dead = RawClient(srv.port)  # answers no pings
    dead.send_json({"type": "register", "userId": "dead@volli.app", "publicKey": "AAAA"})
    assert json.loads(dead.next_message())["type"] == "registered"
    watcher = clients(srv.url)  # python-websockets answers pings
    watcher.register("watcher@volli.app")
    deadline = time.monotonic() + 10
    while watcher.request({"type": "discover", "userId": "dead@volli.app"})["online"]:
        assert time.monotonic() < deadline, "dead peer still online"
        time.sleep(0.1)
    assert dead.wait_close() == 1008
    time.sleep(1.5)  # well past two ping intervals: the live client was kept
    assert watcher.request({"type": "ping"}) == {"type": "pong"}


def test_permessage_deflate_off_by_default_and_configurable(server, make_server, clients):
    plain = clients(compression="deflate")
    assert plain.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    srv = make_server({"VOLLI_PERMESSAGE_DEFLATE": "true"})
    deflated = clients(srv.url, compression="deflate")
    assert "permessage-deflate" in deflated.ws.response.headers["Sec-WebSocket-Extensions"]
    deflated.register("d@volli.app")
    assert deflated.request({"type": "ping", "pad": "z" * 5000}) == {"type": "pong"}
