"""The cases hypothesis draws: (category, data, extra), weighted by CATEGORIES."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import strategies as st

from volli.protocol.names import user_id_problem

from .spec import (B64_ALPHABET, BINARY, CLOSE, CONT, FIELDS, FUZZ_IDS, KNOWN_IDS,
                   KNOWN_TYPES, MAX_SIZE, OPTIONAL_FIELDS, PING, RELAY_PAYLOAD, TEXT,
                   TYPE_FIELDS)

HUGE_INTS = st.sampled_from([
    2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**20,
    -(10**20), 10**308, 10**309, -(10**400), 2**1000])
SCALARS = (st.none() | st.booleans() | st.integers() | HUGE_INTS
           | st.integers(min_value=-(10**500), max_value=10**500)
           | st.floats()  # NaN and infinities serialize as non-JSON NaN/Infinity
           | st.text(max_size=16)
           | st.sampled_from(["", *KNOWN_IDS, "\u2028", "\x00", "\U0001f600", "\\", '"']))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS),
                                        children, max_size=4)),
    max_leaves=12)

# Each field of a protocol message is drawn valid (most of the time, so that messages
# get past validation and register, discover and relay for real) or from everything.
VALID_USER_IDS = (st.sampled_from(KNOWN_IDS) | st.sampled_from(FUZZ_IDS)
                  | st.text(st.characters(exclude_categories=("Cc", "Cs", "Cf", "Cn"),
                                          exclude_characters="\u2028\u2029"),
                            min_size=1, max_size=24).filter(lambda t: not user_id_problem(t, 256))
                  | st.sampled_from(["u" * 256, "\U0001f600" * 256, " ", "*", "a\\b",
                                     "volli:presence:*", "\u00a0", "\ufeff"]))
BAD_USER_IDS = st.sampled_from(["", "u" * 257, "\U0001f600" * 257, "a\x00b", "a\tb", "a\nb",
                                "a\x1f", "a\x7f", "a\x80", "a\x85", "a\x9f", "a\u2028b",
                                "a\u2029b"])
USER_IDS = VALID_USER_IDS | st.text(max_size=24) | BAD_USER_IDS | JSON_VALUES
VALID_KEYS = (st.sampled_from(["base64-encoded-public-key", "cHVibGljLWtleQ==", "A" * 4096,
                               "a2V5=", "=", "-_"])
              | st.text(alphabet=B64_ALPHABET, min_size=1, max_size=60)
              | st.binary(min_size=32, max_size=32).map(
                  lambda b: base64.b64encode(b).decode())
              | st.binary(min_size=32, max_size=32).map(
                  lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")))
KEYS = (VALID_KEYS | st.sampled_from(["", "A" * 4097, "a b", "key!", "\u00e9"])
        | st.text(max_size=10) | JSON_VALUES)
VALID_SIGNATURES = (st.binary(min_size=64, max_size=64).map(
    lambda b: base64.b64encode(b).decode())
    | st.text(alphabet=B64_ALPHABET, min_size=1, max_size=128) | st.just("A" * 128))
SIGNATURES = (VALID_SIGNATURES | st.sampled_from(["A" * 129, "", "not base64!"])
              | st.text(max_size=10) | JSON_VALUES)
VALID_REQUEST_IDS = (st.text(max_size=10) | st.integers(min_value=-(2**63),
                                                        max_value=2**64 - 1)
                     | st.sampled_from(["r" * 128, "\u00e9" * 128, 2**64 - 1, -(2**63), 0]))
REQUEST_IDS = (VALID_REQUEST_IDS | st.integers() | HUGE_INTS | st.floats() | st.booleans()
               | st.sampled_from(["r" * 129, "\U0001f600" * 129]) | JSON_VALUES)
VALID_PAYLOADS = (st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)
                  | st.just({"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}))
PAYLOADS = VALID_PAYLOADS | st.none() | JSON_VALUES
VALID_FIELDS = {
    "userId": VALID_USER_IDS, "to": VALID_USER_IDS, "publicKey": VALID_KEYS,
    "newPublicKey": VALID_KEYS, "signature": VALID_SIGNATURES,
    "from": st.sampled_from(FUZZ_IDS) | st.none(), "offer": VALID_PAYLOADS,
    "answer": VALID_PAYLOADS, "candidate": VALID_PAYLOADS | st.none(),
    "requestId": VALID_REQUEST_IDS,
}
ANY_FIELDS = {
    "userId": USER_IDS, "to": USER_IDS, "publicKey": KEYS, "newPublicKey": KEYS,
    "signature": SIGNATURES, "from": st.sampled_from(KNOWN_IDS) | JSON_VALUES,
    "offer": PAYLOADS, "answer": PAYLOADS, "candidate": PAYLOADS, "requestId": REQUEST_IDS,
}
MESSAGE_TYPES = (st.sampled_from(KNOWN_TYPES) | st.sampled_from(KNOWN_TYPES)
                 | st.sampled_from(["", "Register", "OFFER", "offer ", "ping\x00", "hello",
                                    "registered", "pong", "error", "key-rotated",
                                    "session-replaced", "subscribe", "x" * 300])
                 | st.text(max_size=12) | JSON_VALUES)
CUTS = st.none() | st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=3)
# Characters that need no escaping in a JSON string, 1 to 4 bytes of UTF-8 each.
PAD_CHARS = st.sampled_from(["x", "7", "\u00e9", "\u20ac", "\u4e2d", "\U0001f600"])


@st.composite
def protocol_messages(draw) -> dict[str, Any]:
    """Something shaped like a client message: a type (usually a known one), its fields,
    each valid or of a wrong type or value, a requestId, and unknown extra fields."""
    kind = draw(st.sampled_from(KNOWN_TYPES) if draw(st.integers(0, 4)) else MESSAGE_TYPES)
    names = TYPE_FIELDS.get(kind) if isinstance(kind, str) else None
    if names is None:  # an unknown type: maybe with every field, maybe with none
        names = FIELDS[1:-1] if draw(st.booleans()) else []
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)) < 9:
        message["type"] = kind
    for name in names:
        present = draw(st.integers(0, 9)) < (2 if name in OPTIONAL_FIELDS else 9)
        if present:
            valid = draw(st.integers(0, 9)) < 8
            message[name] = draw((VALID_FIELDS if valid else ANY_FIELDS)[name])
    if draw(st.booleans()):
        valid = draw(st.integers(0, 9)) < 7
        message["requestId"] = draw(VALID_REQUEST_IDS if valid else REQUEST_IDS)
    if draw(st.integers(0, 3)) == 0:
        message.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)))
    order = draw(st.permutations(list(message)))
    return {name: message[name] for name in order}


def dump(draw, value: Any) -> str:
    return json.dumps(value, ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))


@st.composite
def protocol_texts(draw):
    return ("protocol", dump(draw, draw(protocol_messages())), draw(CUTS))


@st.composite
def relay_texts(draw):
    """Well-formed relays (to the honest clients, to itself, to users offline) carrying
    arbitrary JSON: huge numbers, odd strings, unknown fields."""
    kind = draw(st.sampled_from(sorted(RELAY_PAYLOAD)))
    message = {"type": kind, "to": draw(st.sampled_from(KNOWN_IDS)),
               RELAY_PAYLOAD[kind]: draw(VALID_FIELDS[RELAY_PAYLOAD[kind]])}
    if draw(st.integers(0, 3)) == 0:
        message["from"] = draw(st.sampled_from(FUZZ_IDS))
    if draw(st.booleans()):
        message["requestId"] = draw(VALID_REQUEST_IDS)
    message.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)))
    order = draw(st.permutations(list(message)))
    return ("relay", dump(draw, {name: message[name] for name in order}), draw(CUTS))


@st.composite
def discover_texts(draw):
    """Well-formed lookups: the honest users, the fuzzer's present and past userIds (the
    server remembers their last keys), and random ones."""
    message = {"type": "discover",
               "userId": draw(st.sampled_from(KNOWN_IDS) | VALID_FIELDS["userId"]
                              | BAD_USER_IDS)}
    if draw(st.booleans()):
        message["requestId"] = draw(VALID_REQUEST_IDS)
    return ("discover", dump(draw, message), draw(CUTS))


@st.composite
def json_texts(draw):
    return ("json", dump(draw, draw(JSON_VALUES)), draw(CUTS))


NEST_LEVELS = [("[", "]"), ('{"a":', "}"), ("[0,", "]"), ('{"":', "}"), ('{"x":1,"y":', "}")]
NEST_CORES = ["0", "null", '""', "{}", "[]", '"x"', "1e308", "18446744073709551616"]


@st.composite
def deep_texts(draw):
    """Nesting 1000+ levels deep (and around the parser's and encoder's limits), at the
    top level or inside a field, built as text."""
    depth = draw(st.sampled_from([64, 252, 253, 254, 255, 256, 1022, 1023, 1024, 1025, 1100])
                 | st.integers(min_value=200, max_value=1600))
    pattern = draw(st.lists(st.sampled_from(NEST_LEVELS), min_size=1, max_size=3))
    levels = [pattern[i % len(pattern)] for i in range(depth)]
    nest = ("".join(o for o, _ in levels) + draw(st.sampled_from(NEST_CORES))
            + "".join(c for _, c in reversed(levels)))
    target = json.dumps(draw(st.sampled_from(KNOWN_IDS)))
    where = draw(st.sampled_from(["top", "offer", "candidate", "requestId", "type", "userId",
                                  "extra", "register"]))
    text = {
        "top": nest,
        "offer": '{"type":"offer","to":%s,"offer":{"deep":%s}}' % (target, nest),
        "candidate": '{"type":"ice-candidate","to":%s,"candidate":{"c":%s},"requestId":7}'
                     % (target, nest),
        "requestId": '{"type":"ping","requestId":%s}' % nest,
        "type": '{"type":%s,"requestId":"t"}' % nest,
        "userId": '{"type":"discover","userId":%s}' % nest,
        "extra": '{"type":"ping","requestId":"e","extra":%s}' % nest,
        "register": '{"type":"register","userId":%s,"publicKey":"a2V5","deep":%s}'
                    % (target, nest),
    }[where]
    if draw(st.integers(0, 9)) == 0:
        text = text[:-1]  # unbalanced
    return ("deep", text, draw(CUTS))


SPECIAL_TEXTS = [
    "", " ", "\t\n", "null", "true", "0", "-0", "1e999", "-", "nul", "NaN", "Infinity",
    "[]", "{}", '""', '"\\ud800"', '{"type":"ping","requestId":"\\udc00"}',
    '{"type":"ping",}', "{'type': 'ping'}", '{"type":"ping"} {"type":"ping"}',
    '{"type":"ping"}\x00', "\ufeff{\"type\":\"ping\"}", '{"type":"ping","requestId":1e2}',
    '{"type":"ping","requestId":18446744073709551615}',
    '{"type":"ping","requestId":18446744073709551616}',
    '{"type":"ping","requestId":-9223372036854775809}',
    '{"type":"ping","type":"nope"}', '{"type":"nope","type":"ping"}',
    '{"type":"ping","requestId":"a","requestId":2.5}', '{"type":"\\u0070ing"}',
    '{"type":"ping","requestId":"\\u0000"}', '{"type":"ping"', '{"type":"ping"}}',
    '[{"type":"ping"}]', '"{\\"type\\":\\"ping\\"}"',
]


@st.composite
def non_json_texts(draw):
    choice = draw(st.integers(0, 3))
    if choice == 0:
        text = draw(st.text(max_size=40))
    elif choice == 1:
        text = draw(st.text(alphabet=' \t\n{}[]":,.-+eE0123456789truefalsn\\u', max_size=40))
    elif choice == 2:
        text = draw(st.sampled_from(SPECIAL_TEXTS))
    else:  # a protocol message, mangled
        text = dump(draw, draw(protocol_messages()))
        at = draw(st.integers(min_value=0, max_value=len(text)))
        how = draw(st.sampled_from(["cut", "insert", "delete", "swap-quote"]))
        if how == "cut":
            text = text[:at]
        elif how == "insert":
            text = text[:at] + draw(st.sampled_from(list('{}[]",:\\x\x00'))) + text[at:]
        elif how == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text.replace('"', "'", 1)
    return ("non-json", text, draw(CUTS))


@st.composite
def sized_texts(draw):
    """Messages around the size cap and past it, padded with 1- to 4-byte characters (the
    cap counts characters): a ping, or an offer to a known user."""
    target = draw(st.sampled_from([MAX_SIZE - 1, MAX_SIZE, MAX_SIZE + 1])
                  | st.integers(min_value=MAX_SIZE - 64, max_value=MAX_SIZE + 64)
                  | st.integers(min_value=MAX_SIZE + 1, max_value=4 * MAX_SIZE))
    char = draw(PAD_CHARS)
    if draw(st.booleans()):
        head, tail = '{"type":"ping","requestId":"big","pad":"', '"}'
    else:
        head = '{"type":"offer","to":%s,"offer":{"sdp":"' % json.dumps(
            draw(st.sampled_from(KNOWN_IDS)))
        tail = '"}}'
    pad = char * max(0, target - len(head) - len(tail))
    return ("sized", head + pad + tail, draw(CUTS))


@st.composite
def binary_frames(draw):
    if draw(st.booleans()):
        data = draw(st.binary(max_size=40))
    else:
        size = draw(st.sampled_from([MAX_SIZE, MAX_SIZE + 1])
                    | st.integers(min_value=MAX_SIZE - 8, max_value=4 * MAX_SIZE))
        data = bytes(draw(st.binary(min_size=1, max_size=8))) * size
        data = data[:size]
    return ("binary", data, None)


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x00\x00\x00\x00",
          rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame, written by hand so it can break the rules."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def fragmented(payload: bytes, cuts: list[int], mask: bytes, opcode: int = TEXT) -> bytes:
    """A message split at byte offsets (possibly inside a UTF-8 sequence)."""
    points = sorted({c % (len(payload) + 1) for c in cuts} | {0, len(payload)})
    pieces = [payload[a:b] for a, b in zip(points, points[1:])] or [b""]
    return b"".join(frame(opcode if i == 0 else CONT, piece, fin=i == len(pieces) - 1,
                          mask=mask)
                    for i, piece in enumerate(pieces))


MASKS = st.binary(min_size=4, max_size=4)
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
            b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xc3",
            b"\xe2\x82", b"\xf0\x9f\x98"]


@st.composite
def invalid_utf8_frames(draw):
    """A text message, in one or more frames, that is not UTF-8 (or a close reason that
    is not): closed with 1007."""
    mask = draw(MASKS)
    bad = draw(st.sampled_from(BAD_UTF8))
    if draw(st.integers(0, 5)) == 0:
        reason = draw(st.text(max_size=10)).encode() + bad
        return ("invalid-utf8", frame(CLOSE, (1000).to_bytes(2, "big") + reason, mask=mask),
                1007)
    # Text never starts with a continuation byte, so a truncated sequence stays invalid.
    payload = (draw(st.text(max_size=20)).encode() + bad + draw(st.text(max_size=20)).encode())
    data = fragmented(payload, draw(st.lists(st.integers(0, 100), max_size=3)), mask)
    if draw(st.booleans()):
        data = frame(PING, b"hi", mask=mask) + data
    return ("invalid-utf8", data, 1007)


VIOLATIONS = {
    "rsv1 without extension": lambda m: frame(TEXT, b"{}", rsv=4, mask=m),
    "rsv3": lambda m: frame(TEXT, b"{}", rsv=1, mask=m),
    "reserved opcode 3": lambda m: frame(0x3, b"", mask=m),
    "reserved opcode 0xb": lambda m: frame(0xB, b"x", mask=m),
    "unmasked": lambda m: frame(TEXT, b'{"type":"ping"}', masked=False),
    "continuation first": lambda m: frame(CONT, b"x", mask=m),
    "text inside a fragmented message": lambda m: (frame(TEXT, b"a", fin=False, mask=m)
                                                   + frame(TEXT, b"b", mask=m)),
    "binary inside a fragmented message": lambda m: (frame(TEXT, b"a", fin=False, mask=m)
                                                     + frame(BINARY, b"b", mask=m)),
    "ping longer than 125": lambda m: frame(PING, b"x" * 126, mask=m),
    "fragmented ping": lambda m: frame(PING, b"", fin=False, mask=m),
    "close with 1 byte": lambda m: frame(CLOSE, b"\x03", mask=m),
    "non-minimal length": lambda m: bytes([0x81, 0xFE, 0, 2]) + m + bytes(
        b ^ m[i] for i, b in enumerate(b"{}")),
    "length with the top bit set": lambda m: bytes([0x81, 0xFF]) + (2**63).to_bytes(8, "big")
    + m,
}
VIOLATIONS.update({f"close code {code}": (lambda c: lambda m: frame(
    CLOSE, c.to_bytes(2, "big"), mask=m))(code)
    for code in (0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535)})


@st.composite
def violation_frames(draw):
    name = draw(st.sampled_from(sorted(VIOLATIONS)))
    return ("violation", VIOLATIONS[name](draw(MASKS)), 1002)


@st.composite
def client_closes(draw):
    """A client's close: the server answers with the same code (none for an empty one)."""
    code = draw(st.sampled_from([1000, 1001, 1003, 1007, 1008, 1009, 1011, 3000, 4000, 4999])
                | st.integers(min_value=3000, max_value=4999) | st.none())
    if code is None:
        return ("client-close", frame(CLOSE, b"", mask=draw(MASKS)), 1005)
    reason = draw(st.text(max_size=20)).encode()  # at most 80 bytes: fits a control frame
    return ("client-close", frame(CLOSE, code.to_bytes(2, "big") + reason, mask=draw(MASKS)),
            code)


@st.composite
def fragmented_valid(draw):
    """Valid UTF-8 split across frames anywhere, even inside a character: a normal message."""
    request_id = draw(st.text(min_size=1, max_size=12))
    text = json.dumps({"type": "ping", "requestId": request_id,
                       "pad": draw(st.text(max_size=30))}, ensure_ascii=False)
    data = fragmented(text.encode(), draw(st.lists(st.integers(0, 1000), max_size=4)),
                      draw(MASKS))
    return ("fragmented", data, {"type": "pong", "requestId": request_id})


# Cases by category, weighted; interleaved, so that hypothesis' liking for the first
# element of a sampled_from does not favour one category.
CATEGORIES = {
    "protocol": (protocol_texts(), 4), "relay": (relay_texts(), 4),
    "discover": (discover_texts(), 2),
    "json": (json_texts(), 2), "deep": (deep_texts(), 2),
    "non-json": (non_json_texts(), 2), "sized": (sized_texts(), 2),
    "binary": (binary_frames(), 3), "invalid-utf8": (invalid_utf8_frames(), 2),
    "fragmented": (fragmented_valid(), 2), "violation": (violation_frames(), 3),
    "client-close": (client_closes(), 2),
}
_WEIGHTED = [name for round_ in range(max(w for _, w in CATEGORIES.values()))
             for name, (_, weight) in CATEGORIES.items() if round_ < weight]
CASES = st.sampled_from(_WEIGHTED).flatmap(lambda name: CATEGORIES[name][0])
RAW_CASES = {"invalid-utf8", "violation", "client-close", "fragmented"}
