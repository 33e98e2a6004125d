"""The protocol layer alone: no sockets, no server."""

import base64
import json

import pytest

from volli.protocol import (
    Discover, ErrorCode, Ping, ProtocolError, Register, Relay, encode, encode_relay, error_message,
    parse,
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
    message = parse('{"type":"offer","from":"alice","to":"bob","offer":{"sdp":"s"},"extra":[1]}')
    assert json.loads(encode_relay(message, "alice")) == {
        "type": "offer", "from": "alice", "to": "bob", "offer": {"sdp": "s"}, "extra": [1]}
    message = parse('{"type":"answer","to":"bob","answer":{"sdp":"s"}}')
    assert json.loads(encode_relay(message, "alice"))["from"] == "alice"


@pytest.mark.parametrize("text,code", [
    ("not json", ErrorCode.INVALID_JSON),
    ('{"type":"register"', ErrorCode.INVALID_JSON),
    ('[1,2]', ErrorCode.INVALID_MESSAGE),
    ('"register"', ErrorCode.INVALID_MESSAGE),
    ('{}', ErrorCode.INVALID_MESSAGE),
    ('{"type":5}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"hello"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type":"register","userId":"a"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"","publicKey":"AAAA"}', ErrorCode.INVALID_USER_ID),
    ('{"type":"register","userId":7,"publicKey":"AAAA"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"register","userId":"a\\nb","publicKey":"AAAA"}', ErrorCode.INVALID_USER_ID),
    ('{"type":"register","userId":"a\\u0085b","publicKey":"AAAA"}', ErrorCode.INVALID_USER_ID),
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
        == ErrorCode.INVALID_USER_ID
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
    # orjson reads up to 1024 levels but writes fewer: refused when parsed
    assert error_code(deep) == ErrorCode.INVALID_MESSAGE
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



# -- hardening: names and keys a receiver's parser could misread --------------------------

@pytest.mark.parametrize("user_id", [
    "alice\u200b", "\u200balice", "al\u202eice", "\ufeffalice", " ", "\u200b", "\u3000",
    "alice ", " alice", "cafe\u0301", "a\u00adb", "a\u2066b", "a\U000e0061b", "a\u034fb",
    "\u3164", "a\u0378b",  # unassigned
])
def test_user_ids_that_could_look_like_another_are_refused(user_id):
    for message in ({"type": "register", "userId": user_id, "publicKey": "AAAA"},
                    {"type": "discover", "userId": user_id},
                    {"type": "offer", "to": user_id, "offer": {}}):
        assert error_code(json.dumps(message)) == ErrorCode.INVALID_USER_ID, (user_id, message)


@pytest.mark.parametrize("user_id", ["alice@volli.app", "caf\u00e9", "\u00e9l\u00e8ve b",
                                     "\u6771\u4eac", "\U0001f600", "a b", "x" * USER_ID_MAX])
def test_ordinary_user_ids_are_accepted(user_id):
    assert parse(json.dumps({"type": "discover", "userId": user_id})).user_id == user_id


@pytest.mark.parametrize("key", ["From", "FROM", "fRoM", "TO", "Type", "TYPE", "from\u0000",
                                 "to\u200b", "x\u0007"])
def test_relay_keys_another_parser_could_read_as_routing_keys_are_refused(key):
    text = json.dumps({"type": "offer", "to": "bob", "offer": {}, key: "carol"})
    assert error_code(text) == ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize("text", [
    '{"type":"offer","to":"bob","to":"carol","offer":{}}',
    '{"type":"answer","type":"offer","to":"bob","offer":{},"answer":{}}',
    '{"type":"offer","to":"bob","offer":{},"from":"x","from":"alice"}',
    '{"type":"offer","to":"bob","\\u0074o":"carol","offer":{}}',
    '{"type":"offer", "to":"bob","offer":{},"to":"carol"}',
    '{"type":"offer","to":"bob","offer":{},"offer":{"sdp":"other"}}',
])
def test_duplicate_top_level_keys_in_relays_are_refused(text):
    assert error_code(text) == ErrorCode.INVALID_MESSAGE


def test_nested_keys_and_non_compact_json_relay_as_checked():
    # The payload may repeat routing names; non-compact input is relayed compact.
    text = '{ "type":"offer", "to":"bob", "offer":{"type":"offer","to":1,"From":2}, "n":1e2 }'
    out = encode_relay(parse(text), "alice")
    assert out == ('{"type":"offer","to":"bob","offer":{"type":"offer","to":1,"From":2},'
                   '"n":100.0,"from":"alice"}')


def test_a_sealed_relay_parses_with_its_flag_and_text_kept():
    sealed = {"enc": base64.b64encode(bytes(32)).decode(),
              "ct": base64.b64encode(bytes(40)).decode()}
    text = json.dumps({"type": "ice-candidate", "to": "bob", "sealed": sealed},
                      separators=(",", ":"))
    relay = parse(text)
    assert isinstance(relay, Relay) and relay.sealed and relay.text == text
    assert not parse('{"type":"offer","to":"bob","offer":{}}').sealed


def test_encryption_key_fields_parse_only_together_and_signed():
    key = base64.b64encode(bytes(range(32))).decode()
    base = {"type": "register", "userId": "bob", "publicKey": "AAAA", "signature": "AAAA"}
    message = parse(json.dumps({**base, "encryptionKey": key,
                                "encryptionKeySignature": "c2ln"}))
    assert (message.encryption_key.key, message.encryption_key.signature) == (key, "c2ln")
    assert parse(json.dumps(base)).encryption_key is None
    unsigned = {k: v for k, v in base.items() if k != "signature"}
    for bad in ({**base, "encryptionKey": key},
                {**base, "encryptionKeySignature": "c2ln"},
                {**unsigned, "encryptionKey": key, "encryptionKeySignature": "c2ln"},
                {**base, "encryptionKey": key[:-1], "encryptionKeySignature": "c2ln"}):
        with pytest.raises(ProtocolError) as refused:
            parse(json.dumps(bad))
        assert refused.value.code == ErrorCode.INVALID_MESSAGE
