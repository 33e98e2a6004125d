"""The protocol layer alone: no sockets, no server."""

import json

import pytest

from volli.protocol import (
    Discover, ErrorCode, Ping, ProtocolError, Register, Relay, encode, encode_relay, error_message,
    parse, relayed_message,
)
from volli.protocol.messages import PUBLIC_KEY_MAX, REQUEST_ID_MAX, USER_ID_MAX


def error_code(text) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        parse(text)
    return info.value.code


def test_seed_register_example_parses_as_written():
    text = ('{\n  "type": "register",\n  "userId": "alice@volli.app",\n'
            '  "publicKey": "base64-encoded-public-key"\n}')
    assert parse(text) == Register("alice@volli.app", "base64-encoded-public-key")


def test_discover_and_ping():
    assert parse('{"type":"discover","userId":"bob@volli.app"}') == Discover("bob@volli.app")
    assert parse('{"type":"ping","requestId":"r1"}') == Ping("r1")


@pytest.mark.parametrize("kind,field,payload", [
    ("offer", "offer", {"type": "offer", "sdp": "v=0"}),
    ("answer", "answer", {"type": "answer", "sdp": "v=0"}),
    ("ice-candidate", "candidate", {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host",
                                    "sdpMid": "0", "sdpMLineIndex": 0}),
    ("ice-candidate", "candidate", None),
])
def test_relay_messages(kind, field, payload):
    message = parse(json.dumps({"type": kind, "to": "bob", field: payload}))
    assert isinstance(message, Relay)
    assert (message.kind, message.to, message.sender) == (kind, "bob", None)
    assert message.body[field] == payload


def test_relayed_message_sets_from_and_keeps_everything_else():
    message = parse('{"type":"offer","from":"x","to":"bob","offer":{"sdp":"s"},"extra":[1]}')
    assert relayed_message(message, "alice") == {
        "type": "offer", "from": "alice", "to": "bob", "offer": {"sdp": "s"}, "extra": [1]}
    message = parse('{"type":"answer","to":"bob","answer":{"sdp":"s"}}')
    assert relayed_message(message, "alice")["from"] == "alice"


@pytest.mark.parametrize("text,code", [
    ("not json", ErrorCode.INVALID_JSON),
    ('{"type":"register"', ErrorCode.INVALID_JSON),
    ('[1,2]', ErrorCode.INVALID_MESSAGE),
    ('"register"', ErrorCode.INVALID_MESSAGE),
    ('{}', ErrorCode.INVALID_MESSAGE),
    ('{"type":5}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"hello"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type":"register","userId":"a"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"","publicKey":"AAAA"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":7,"publicKey":"AAAA"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"a\\nb","publicKey":"AAAA"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"a\\u0085b","publicKey":"AAAA"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"a","publicKey":"not base64!"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"a","publicKey":""}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"discover"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"offer","to":"b"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"offer","to":"b","offer":"sdp"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"offer","to":"b","offer":null}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"answer","offer":{}}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ice-candidate","to":"b"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ice-candidate","to":"b","candidate":"c"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"offer","from":5,"to":"b","offer":{}}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ping","requestId":true}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ping","requestId":[1]}', ErrorCode.INVALID_MESSAGE),
])
def test_bad_messages(text, code):
    assert error_code(text) == code


def test_limits():
    assert parse(json.dumps({"type": "discover", "userId": "u" * USER_ID_MAX}))
    assert error_code(json.dumps({"type": "discover", "userId": "u" * (USER_ID_MAX + 1)})) \
        == ErrorCode.INVALID_MESSAGE
    key = "A" * PUBLIC_KEY_MAX
    assert parse(json.dumps({"type": "register", "userId": "a", "publicKey": key}))
    assert error_code(json.dumps({"type": "register", "userId": "a", "publicKey": key + "A"})) \
        == ErrorCode.INVALID_MESSAGE
    assert parse(json.dumps({"type": "ping", "requestId": "r" * REQUEST_ID_MAX}))
    assert error_code(json.dumps({"type": "ping", "requestId": "r" * (REQUEST_ID_MAX + 1)})) \
        == ErrorCode.INVALID_MESSAGE


def test_errors_carry_the_request_id_when_it_was_readable():
    with pytest.raises(ProtocolError) as info:
        parse('{"type":"nope","requestId":"abc"}')
    assert info.value.request_id == "abc"
    assert parse('{"type":"ping","requestId":42}').request_id == 42


def test_encode_error_message():
    text = encode(error_message(ErrorCode.PEER_OFFLINE, "gone", "r"))
    assert json.loads(text) == {"type": "error", "code": "peer-offline", "message": "gone",
                                "requestId": "r"}
    assert json.loads(encode(error_message(ErrorCode.INVALID_JSON, "bad"))) == {
        "type": "error", "code": "invalid-json", "message": "bad"}


def test_relays_deeper_than_the_encoder_can_write_are_refused():
    deep = '{"type":"offer","to":"b","offer":{"x":' + "[" * 300 + "]" * 300 + "}}"
    message = parse(deep)  # orjson reads up to 1024 levels
    with pytest.raises(ProtocolError) as info:
        encode_relay(message, "a")
    assert info.value.code == ErrorCode.INVALID_MESSAGE
    ok = parse('{"type":"offer","to":"b","offer":{"x":' + "[" * 200 + "]" * 200 + "}}")
    assert json.loads(encode_relay(ok, "a"))["from"] == "a"


@pytest.mark.parametrize("text", [
    '{"type":"offer","to":"b","offer":{"sdp":"v=0\\r\\n","t":1.0}}',
    ' {"type" : "answer", "to":"b", "answer":{"x":[1,{"y":"}"}]}, "requestId":7}\r\n\t ',
    '{"type":"ice-candidate","to":"b","candidate":null,"n":"\\u00e9\\ud83d\\ude00"}',
    '{"type":"offer","to":"b","offer":{},"from":null}',  # a from key: re-encoded
    '{"type":"offer","to":"b","offer":{"x":' + "[" * 250 + "]" * 250 + "}}",
])
def test_relayed_text_is_the_received_message_with_from_set(text):
    relay = parse(text)
    out = encode_relay(relay, "a\"lice")
    assert json.loads(out) == {**json.loads(text), "from": 'a"lice'}
    assert list(json.loads(out))[-1] == "from"

