"""What the server must answer to one text frame, by the rules of docs/protocol.md in their
documented order."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from volli.protocol.names import key_problem, user_id_problem

from .spec import (ALICE, BASE64ISH, BOB, ENCODE_DEPTH, HONEST_KEYS, MAX_SIZE, PROBE,
                   RELAY_PAYLOAD)


@dataclasses.dataclass
class Expect:
    kind: str  # "reply", "error", "relay" or "close"
    reply: dict[str, Any] | None = None
    codes: frozenset[str] = frozenset()
    request_id: Any = None
    target: str | None = None
    body: dict[str, Any] | None = None
    close_code: int | None = None
    register: tuple[str, str] | None = None  # (userId, key) taken on success
    too_deep: bool = False  # nests past what the server can re-encode


def error(codes: str | set[str], request_id: Any = None, **kwargs: Any) -> Expect:
    codes = {codes} if isinstance(codes, str) else codes
    return Expect("error", codes=frozenset(codes), request_id=request_id, **kwargs)


def with_request_id(message: dict[str, Any], request_id: Any) -> dict[str, Any]:
    if request_id is not None:
        message["requestId"] = request_id
    return message


def user_id_error(value: Any) -> str | None:
    """The error a userId or to field gets (section 2), or None if it is valid. The
    character rules are the server's own (pinned by tests/test_protocol.py)."""
    if not isinstance(value, str):
        return "invalid-message"
    return "invalid-user-id" if user_id_problem(value, 256) else None


def valid_user_id(value: Any) -> bool:
    return user_id_error(value) is None


def valid_base64ish(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit \
        and BASE64ISH.fullmatch(value) is not None


def nesting(value: Any) -> int:
    """Levels of arrays and objects (iteratively: values can be 1024 deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


def json_equal(a: Any, b: Any) -> bool:
    """Same JSON value, same types (1 is not 1.0, True is not 1), same key order;
    iterative, so 1024-deep values compare without recursion."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y))
        elif x != y:
            return False
    return True


class Oracle:
    """What the server must answer to one text frame, from docs/protocol.md, given what
    is known about the connection (its userId) and the users online."""

    def __init__(self) -> None:
        self.own: str | None = None  # the fuzzing connection's userId
        self.online = {ALICE, BOB, PROBE}
        self.keys = dict(HONEST_KEYS)  # last key registered per userId (kept after close)

    def predict(self, text: str) -> Expect:
        if len(text) > MAX_SIZE:
            return Expect("close", close_code=1009)
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            return error("invalid-json")
        expect = self._message(data)
        expect.too_deep = nesting(data) >= ENCODE_DEPTH
        return expect

    def _message(self, data: Any) -> Expect:
        if not isinstance(data, dict):
            return error("invalid-message")
        rid = data.get("requestId")
        if not (rid is None or (isinstance(rid, str) and len(rid) <= 128)
                or type(rid) is int):
            return error("invalid-message")
        kind = data.get("type")
        if not isinstance(kind, str):
            return error("invalid-message", rid)
        if kind == "register":
            return self._register(data, rid)
        if kind == "rotate-key":
            if not (valid_base64ish(data.get("newPublicKey"), 4096)
                    and valid_base64ish(data.get("signature"), 128)):
                return error("invalid-message", rid)
            if self.own is None:
                return error("not-registered", rid)
            return error("signature-required", rid)  # the fuzzer never registers signed
        if kind == "discover":
            user_id = data.get("userId")
            if user_id_error(user_id):
                return error(user_id_error(user_id), rid)
            if self.own is None:
                return error("not-registered", rid)
            # Nobody here signs: an offline user's key is forgotten.
            return Expect("reply", reply=with_request_id(
                {"type": "discover-response", "userId": user_id,
                 "online": user_id in self.online,
                 "publicKey": self.keys.get(user_id) if user_id in self.online else None,
                 "verified": False}, rid))
        if kind in RELAY_PAYLOAD:
            return self._relay(kind, data, rid)
        if kind == "ping":
            return Expect("reply", reply=with_request_id({"type": "pong"}, rid))
        if kind == "ice-servers":  # the fuzzed server has no TURN configured
            if self.own is None:
                return error("not-registered", rid)
            return Expect("reply", reply=with_request_id(
                {"type": "ice-servers", "iceServers": []}, rid))
        return error("unknown-type", rid)

    def _register(self, data: dict[str, Any], rid: Any) -> Expect:
        user_id, key = data.get("userId"), data.get("publicKey")
        signature = data.get("signature")
        if user_id_error(user_id):
            return error(user_id_error(user_id), rid)
        if not (valid_base64ish(key, 4096)
                and (signature is None or valid_base64ish(signature, 128))):
            return error("invalid-message", rid)
        if self.own is not None:
            return error("already-registered", rid)
        if signature is not None:
            # Not an Ed25519 key or signature in base64 (invalid-message), or one that
            # does not verify: a random signature never does.
            return error({"invalid-message", "bad-signature"}, rid)
        if user_id in self.online:
            return error("user-id-taken", rid)
        return Expect("reply", reply=with_request_id(
            {"type": "registered", "userId": user_id}, rid), register=(user_id, key))

    def _relay(self, kind: str, data: dict[str, Any], rid: Any) -> Expect:
        sender, field = data.get("from"), RELAY_PAYLOAD[kind]
        payload = data.get(field)
        if user_id_error(data.get("to")):
            return error(user_id_error(data.get("to")), rid)
        if not ((sender is None or isinstance(sender, str)) and field in data
                and (isinstance(payload, dict) or (payload is None and kind == "ice-candidate"))
                and not any(key_problem(key) for key in data)
                and nesting(data) < ENCODE_DEPTH):  # the server re-encodes what it relays
            return error("invalid-message", rid)
        if self.own is None:
            return error("not-registered", rid)
        if sender is not None and sender != self.own:
            return error("forbidden-sender", rid)
        if data["to"] not in self.online:
            return error("peer-offline", rid)
        body = dict(data)
        body["from"] = self.own
        return Expect("relay", target=data["to"], body=body, request_id=rid)
