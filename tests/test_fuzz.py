"""Property-based fuzzing of a live server (hypothesis).

One gunicorn server per backend, two honest clients relaying numbered offers, answers and
ICE candidates to each other, and one fuzzing connection that throws random JSON, protocol
messages with wrong field types, deep nesting, huge numbers, non-JSON text, binary frames,
invalid UTF-8, WebSocket protocol violations and oversized frames at the server. Each case
is checked against docs/protocol.md:

- a well-formed text frame within the size cap gets exactly one reply: an ``error`` with a
  documented code (and the documented ``requestId`` echo) or the right reply
  (``registered``, ``discover-response``, ``pong``); a successful relay gets none, and its
  receiver gets the message with ``from`` set;
- a binary frame gets ``binary-frame`` and the connection stays usable;
- invalid UTF-8 closes with 1007, a protocol violation with 1002, an oversized message
  with 1009 (then a new fuzzing connection is opened); a client close is echoed;
- the honest clients get every one of their messages, intact and in order;
- afterwards the worker is the one that booted, /health answers 200 and the log has no
  traceback and no error line.

The expected outcome of a text frame comes from ``Oracle``, which applies the rules of
docs/protocol.md in their documented order. JSON syntax is judged by orjson, the parser
the server uses: its limits (nesting deeper than 1024, numbers beyond double range) are
what the protocol calls "too deep" and "too large to parse". The protocol names no
depth, so ``invalid-json`` is also accepted for anything nested 255 levels or more.

A relay whose JSON nests 255 or more levels parses (orjson reads up to 1024 levels) but
cannot be written back (orjson.dumps stops at 254): the server refuses it with
``invalid-message`` before it looks the target up (this fuzz test found it answering
``internal-error`` once).

Cases are reproducible: hypothesis runs derandomized (see ``reproducible_hypothesis``),
so a failure in CI replays with ``pytest tests/test_fuzz.py``; hypothesis prints the
failing case, which can be pinned with ``@example``. How many cases ran, by category and
outcome, is printed in the terminal summary (the "volli fuzz" section).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import re
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from wsproto.events import BytesMessage, TextMessage

from conftest import RECV_TIMEOUT, Client
from rawclient import RawClient
from volli.protocol.names import key_problem, user_id_problem

MAX_SIZE = 8192  # VOLLI_MAX_MESSAGE_SIZE of the fuzzed server: oversized cases stay cheap
MAX_EXAMPLES = 300  # per backend
HONEST_CHECK_EVERY = 10  # cases between checks that every honest message arrived
ENCODE_DEPTH = 255  # orjson.dumps refuses this much nesting: such relays are refused

# docs/protocol.md section 7 and volli/protocol/errors.py (ErrorCode), written out so that
# an undocumented code from the server fails the test.
DOCUMENTED_CODES = frozenset({
    "invalid-json", "invalid-message", "binary-frame", "unknown-type", "not-registered",
    "already-registered", "user-id-taken", "forbidden-sender", "bad-signature",
    "identity-bound", "signature-required", "rate-limited", "peer-offline", "unavailable",
    "internal-error", "invalid-user-id", "bindings-full", "peer-busy",
})

ALICE, BOB, PROBE = "alice@fuzz.volli", "bob@fuzz.volli", "probe@fuzz.volli"
HONEST_KEYS = {ALICE: "YWxpY2Uta2V5", BOB: "Ym9iLWtleQ==", PROBE: "cHJvYmUta2V5"}
# Ids the fuzzer registers, addresses and impersonates (besides random ones).
FUZZ_IDS = ["mallory@fuzz.volli", "trudy@fuzz.volli", "ghost@fuzz.volli"]
KNOWN_IDS = [ALICE, BOB, *FUZZ_IDS]

KNOWN_TYPES = ["register", "discover", "offer", "answer", "ice-candidate", "ping", "rotate-key",
               "ice-servers"]
RELAY_PAYLOAD = {"offer": "offer", "answer": "answer", "ice-candidate": "candidate"}
FIELDS = ["type", "userId", "publicKey", "signature", "newPublicKey", "to", "from", "offer",
          "answer", "candidate", "requestId"]
TYPE_FIELDS = {"register": ["userId", "publicKey", "signature"],
               "rotate-key": ["newPublicKey", "signature"],
               "discover": ["userId"], "ping": [], "ice-servers": [],
               "offer": ["to", "from", "offer"], "answer": ["to", "from", "answer"],
               "ice-candidate": ["to", "from", "candidate"]}
OPTIONAL_FIELDS = {"signature", "from"}

BASE64ISH = re.compile(r"[A-Za-z0-9+/=_-]+")
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-"

# Opcodes of RFC 6455.
CONT, TEXT, BINARY, CLOSE, PING = 0x0, 0x1, 0x2, 0x8, 0x9


# -- strategies -----------------------------------------------------------------------

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


# -- the oracle -----------------------------------------------------------------------

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


# -- the rig --------------------------------------------------------------------------

def short(value: Any, limit: int = 300) -> str:
    try:
        text = value if isinstance(value, str) else repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to print>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class Honest:
    """A registered client relaying numbered messages to its peer, checking its own
    inbox: every message of the peer, intact and in order, and the fuzzer's relays that
    the oracle said would reach it, in order."""

    KINDS = [("offer", "offer"), ("answer", "answer"), ("ice-candidate", "candidate")]

    def __init__(self, url: str, me: str, peer: str) -> None:
        self.me, self.peer = me, peer
        self.client = Client(url)
        self.client.register(me, HONEST_KEYS[me])
        self.outbox: list[dict[str, Any]] = []
        self.received = 0
        self.from_fuzzer: collections.deque[dict[str, Any]] = collections.deque()
        self.fuzzer_received = 0

    def send(self) -> None:
        seq = len(self.outbox)
        kind, field = self.KINDS[seq % 3]
        payload = None if kind == "ice-candidate" and seq % 2 else {
            "type": kind, "sdp": f"v=0\r\ns=seq {seq} from {self.me}\r\n"}
        body = {"type": kind, "to": self.peer, field: payload, "seq": seq,
                "requestId": f"{self.me}#{seq}"}
        self.client.ws.send(orjson.dumps(body).decode())
        self.outbox.append(body)

    def check(self, peer: "Honest") -> None:
        while self.received < len(peer.outbox) or self.from_fuzzer:
            try:
                message = orjson.loads(self.client.ws.recv(timeout=RECV_TIMEOUT))
            except TimeoutError:
                pytest.fail(f"{self.me} lost messages: {self.received} of "
                            f"{len(peer.outbox)} from {self.peer} arrived, "
                            f"{len(self.from_fuzzer)} relays from the fuzzer missing")
            if message.get("from") == self.peer:
                expected = {**peer.outbox[self.received], "from": self.peer}
                assert message == expected, \
                    f"{self.me}: honest message #{self.received} arrived as {short(message)}"
                self.received += 1
            elif self.from_fuzzer:
                expected = self.from_fuzzer.popleft()
                assert json_equal(message, expected), (
                    f"{self.me}: fuzzer relay arrived as {short(message)}, "
                    f"expected {short(expected)}")
                self.fuzzer_received += 1
            else:
                pytest.fail(f"{self.me} got an unexpected message: {short(message)}")

    def assert_quiet(self) -> None:
        with pytest.raises(TimeoutError):
            message = self.client.ws.recv(timeout=0.2)
            pytest.fail(f"{self.me} got an unexpected message: {short(message)}")


class Rig:
    def __init__(self, srv) -> None:
        self.srv = srv
        self.oracle = Oracle()
        self.stats: collections.Counter[str] = collections.Counter()
        self.probe = Client(srv.url)  # looks up presence, never relays
        self.probe.register(PROBE, HONEST_KEYS[PROBE])
        self.alice = Honest(srv.url, ALICE, BOB)
        self.bob = Honest(srv.url, BOB, ALICE)
        self.fuzzer = Client(srv.url)
        self.cases = 0

    # One case -------------------------------------------------------------------------

    def run(self, case: tuple) -> None:
        category, data, extra = case
        self.cases += 1
        self.stats["case:" + category] += 1
        self.alice.send()
        self.bob.send()
        if category in RAW_CASES:
            self._raw(data, extra)
        elif category == "binary":
            self._binary(data)
        else:
            self._text(data, extra)
        if self.cases % HONEST_CHECK_EVERY == 0:
            self.check_honest()

    def _text(self, text: str, cuts: list[int] | None) -> None:
        expect = self.oracle.predict(text)
        self._send(text, cuts)
        if expect.kind == "close":
            self._expect_close(expect.close_code)
            return
        replies = self._replies()
        if expect.too_deep and replies and replies[0].get("code") == "invalid-json":
            # "Too deep" has no documented depth: refusing what cannot be echoed is fine.
            self._check_error(replies, {"invalid-json"}, None)
            self.stats["deep refused as invalid-json"] += 1
            return
        if expect.kind == "reply":
            assert replies == [expect.reply], f"expected {expect.reply}, got {short(replies)}"
            self.stats["reply:" + expect.reply["type"]] += 1
            if expect.register:
                user_id, key = expect.register
                self.oracle.own = user_id
                self.oracle.online.add(user_id)
                self.oracle.keys[user_id] = key
        elif expect.kind == "error":
            self._check_error(replies, expect.codes, expect.request_id)
        else:
            self._relayed(expect, replies)

    def _relayed(self, expect: Expect, replies: list[dict[str, Any]]) -> None:
        if expect.target == self.oracle.own:
            assert len(replies) == 1 and json_equal(replies[0], expect.body), (
                f"relay to itself came back as {short(replies)}, expected {short(expect.body)}")
            self.stats["relayed to itself"] += 1
            return
        assert replies == [], f"a successful relay got a reply: {short(replies)}"
        honest = {ALICE: self.alice, BOB: self.bob}.get(expect.target)
        if honest is not None:
            honest.from_fuzzer.append(expect.body)
            self.stats["relayed to an honest client"] += 1
        else:  # the probe, by a random userId that happened to be its own
            self.stats["relayed to the probe"] += 1

    def _check_error(self, replies: list[dict[str, Any]], codes: frozenset[str] | set[str],
                     request_id: Any) -> None:
        assert len(replies) == 1, f"expected one error {set(codes)}, got {short(replies)}"
        reply = replies[0]
        assert reply.get("type") == "error" and reply.get("code") in codes, \
            f"expected an error {sorted(codes)}, got {short(reply)}"
        assert reply["code"] in DOCUMENTED_CODES, reply
        assert isinstance(reply.get("message"), str) and reply["message"], reply
        keys = {"type", "code", "message"} | ({"requestId"} if request_id is not None else set())
        assert set(reply) == keys, f"error fields {sorted(reply)}, expected {sorted(keys)}"
        if request_id is not None:
            echoed = reply["requestId"]
            assert echoed == request_id and type(echoed) is type(request_id), \
                f"requestId {request_id!r} echoed as {echoed!r}"
        self.stats["error:" + reply["code"]] += 1

    def _binary(self, data: bytes) -> None:
        self._send(data, None)
        if len(data) > MAX_SIZE:
            self._expect_close(1009)
        else:
            self._check_error(self._replies(), {"binary-frame"}, None)

    def _raw(self, data: bytes, expect: int | dict[str, Any]) -> None:
        raw = RawClient(self.srv.port)
        try:
            raw.send_raw(data)
            if isinstance(expect, dict):
                reply = orjson.loads(raw.next_message())
                assert reply == expect, f"expected {expect}, got {short(reply)}"
                self.stats["reply:" + reply["type"]] += 1
                return
            code = raw.wait_close()
            messages = [e for e in raw.events if isinstance(e, (TextMessage, BytesMessage))]
            assert code == expect and not messages, \
                f"expected close {expect} and no message, got close {code} after {messages}"
            self.stats[f"close:{code}"] += 1
        finally:
            raw.close()

    # The fuzzing connection -------------------------------------------------------------

    def _send(self, data: str | bytes, cuts: list[int] | None) -> None:
        if cuts and data:
            points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
            pieces = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
            if len(pieces) > 1:
                self.stats["fragmented"] += 1
                data = pieces
        try:
            self.fuzzer.ws.send(data)
        except ConnectionClosed:
            pass  # closed while sending (too big): _expect_close reads the code

    def _replies(self) -> list[dict[str, Any]]:
        """Everything the server sends before the pong to a ping sent right after the case:
        replies to one connection come in the order of its requests."""
        sentinel = f"sentinel-{self.cases}"
        self.fuzzer.ws.send(json.dumps({"type": "ping", "requestId": sentinel}))
        replies = []
        while True:
            reply = orjson.loads(self.fuzzer.ws.recv(timeout=RECV_TIMEOUT))
            if reply == {"type": "pong", "requestId": sentinel}:
                return replies
            replies.append(reply)
            assert len(replies) < 5, f"too many replies: {short(replies)}"

    def _expect_close(self, code: int) -> None:
        try:
            message = self.fuzzer.ws.recv(timeout=RECV_TIMEOUT)
        except ConnectionClosed as exc:
            got = exc.rcvd.code if exc.rcvd is not None else None
            assert got == code, f"expected close {code}, got {got} ({exc})"
        else:
            pytest.fail(f"expected close {code}, got a message: {short(message)}")
        self.stats[f"close:{code}"] += 1
        self.fuzzer.close()
        if self.oracle.own is not None:
            self._await_offline(self.oracle.own)
            self.oracle.online.discard(self.oracle.own)
            self.oracle.own = None
        self.fuzzer = Client(self.srv.url)
        self.stats["reconnects"] += 1
        if self.stats["reconnects"] % 4:
            # Mostly carry on registered (relays, discover, already-registered need it),
            # sometimes as a user whose key the server remembers from an earlier connection.
            user_id = FUZZ_IDS[self.stats["reconnects"] % len(FUZZ_IDS)]
            self._text(json.dumps({"type": "register", "userId": user_id,
                                   "publicKey": f"a2V5{self.stats['reconnects']}"}), None)
            assert self.oracle.own == user_id

    def _await_offline(self, user_id: str) -> None:
        """Presence ends as soon as the server starts closing; the close frame can reach
        the client a moment before that."""
        end = time.monotonic() + 5
        while self.probe.call({"type": "discover", "userId": user_id})["online"]:
            assert time.monotonic() < end, f"{user_id!r} still online after its close"
            time.sleep(0.01)

    # The end ----------------------------------------------------------------------------

    def check_honest(self) -> None:
        self.alice.check(self.bob)
        self.bob.check(self.alice)

    def finish(self) -> None:
        self.check_honest()
        self.alice.assert_quiet()
        self.bob.assert_quiet()
        assert self.fuzzer.request({"type": "ping", "requestId": "last"}) == {
            "type": "pong", "requestId": "last"}

    def close(self) -> None:
        for client in (self.fuzzer, self.alice.client, self.bob.client, self.probe):
            client.close()

    def summary(self, backend: str, seconds: float, passed: bool) -> str:
        stats = self.stats
        cases = ", ".join(f"{k[5:]} {v}" for k, v in sorted(stats.items())
                          if k.startswith("case:"))
        errors = {k[6:]: v for k, v in sorted(stats.items()) if k.startswith("error:")}
        replies = {k[6:]: v for k, v in sorted(stats.items()) if k.startswith("reply:")}
        closes = ", ".join(f"{v} closes {k[6:]}" for k, v in sorted(stats.items())
                           if k.startswith("close:"))
        honest = len(self.alice.outbox) + len(self.bob.outbox)
        relayed = stats["relayed to an honest client"] + stats["relayed to itself"]
        verdict = ("honest messages all delivered in order, server log clean"
                   if passed else "FAILED (see above)")
        return (f"fuzz [{backend}]: {self.cases} cases in {seconds:.1f}s ({cases}); "
                f"{sum(errors.values())} errors by code {errors}; replies {replies}; "
                f"{closes}; {relayed} fuzzer relays delivered, {stats['fragmented']} sent "
                f"fragmented, {stats['reconnects']} reconnects; {honest} honest messages; "
                f"{verdict}")


# -- reporting --------------------------------------------------------------------------

SUMMARIES: list[str] = []


class _FuzzReport:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if SUMMARIES:
            terminalreporter.write_sep("-", "volli fuzz")
            for line in SUMMARIES:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _fuzz_report(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("volli-fuzz-report"):
        manager.register(_FuzzReport(), "volli-fuzz-report")
    yield


@pytest.fixture
def reproducible_hypothesis(monkeypatch):
    """derandomize=True fixes the seed, but hypothesis also mixes in constants it finds in
    every local module imported so far: the cases would change with the tests selected
    and with any edit in volli/. Without those, they depend on this file and the pinned
    hypothesis only, so a CI failure replays with ``pytest tests/test_fuzz.py``. (Internal
    API of hypothesis 6.170; if it moves, this does nothing.)"""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # pragma: no cover
        yield
        return
    cache = getattr(getattr(providers, "CONSTANTS_CACHE", None), "cache", None)
    if not hasattr(providers, "_get_local_constants") or cache is None:  # pragma: no cover
        yield
        return
    empty = Constants()
    monkeypatch.setattr(providers, "_get_local_constants", lambda: empty)
    cache.clear()
    yield
    cache.clear()


# -- tests ----------------------------------------------------------------------------

TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*?(\S.*)$",
                       re.MULTILINE)


def padded_ping(length: int, char: str) -> str:
    """A ping of exactly ``length`` characters."""
    head, tail = '{"type":"ping","pad":"', '"}'
    return head + char * (length - len(head) - len(tail)) + tail


def fuzz_server(make_server):
    return make_server({"VOLLI_MAX_MESSAGE_SIZE": str(MAX_SIZE),
                        # the fuzzer's connection may stay unregistered for the whole run
                        "VOLLI_REGISTER_TIMEOUT": "600"})


def test_fuzz_live_server(make_server, backend_env, record_property, reproducible_hypothesis):
    backend = "redis" if backend_env.get("VOLLI_REDIS_URL") else "memory"
    srv = fuzz_server(make_server)
    started = time.monotonic()
    rig = Rig(srv)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], print_blob=False,
              report_multiple_bugs=False,  # after one failure the rest is mostly fallout
              suppress_health_check=list(HealthCheck))
    @given(case=CASES)
    @example(case=("binary", b"", None))
    @example(case=("sized", padded_ping(MAX_SIZE, "\U0001f600"), None))  # 4 bytes a char
    @example(case=("sized", padded_ping(MAX_SIZE + 1, "x"), [4000]))
    @example(case=("deep", "[" * 1025 + "]" * 1025, None))
    @example(case=("protocol", '{"type":"register","userId":"%s","publicKey":"a2V5"}'
                   % FUZZ_IDS[0], None))
    @example(case=("protocol", '{"type":"offer","to":"%s","offer":{},"requestId":1}'
                   % ALICE, None))
    @example(case=("deep", '{"type":"offer","to":"%s","offer":{"deep":%s}}'
                   % (BOB, "[" * 300 + "]" * 300), None))  # too deep to write back
    def fuzz(case):
        rig.run(case)

    passed = False
    try:
        fuzz()
        rig.finish()
        status, health = srv.http("/health")
        assert status == 200 and health["status"] == "ok", (status, health)
        assert health["online"] == len(rig.oracle.online), (health, rig.oracle.online)
        rig.close()

        log = srv.log()
        assert srv.proc.poll() is None, f"gunicorn exited:\n{log[-3000:]}"
        assert log.count("Booting worker") == 1, f"the worker was restarted:\n{log[-3000:]}"
        assert "WORKER TIMEOUT" not in log and "[CRITICAL]" not in log, log[-3000:]
        assert "Traceback" not in log, \
            f"tracebacks in the server log: {TRACEBACK.findall(log)}\n{log[-5000:]}"
        errors = [line for line in log.splitlines() if "[ERROR]" in line]
        assert not errors, errors
        assert rig.cases >= MAX_EXAMPLES  # hypothesis ran them all, and the explicit examples
        passed = True
    finally:
        rig.close()
        line = rig.summary(backend, time.monotonic() - started, passed)
        SUMMARIES.append(line)
        record_property("fuzz_cases", rig.cases)
        record_property("fuzz_summary", line)


def test_a_relay_too_deep_to_write_back_is_refused(make_server):
    srv = fuzz_server(make_server)
    a, b = Client(srv.url), Client(srv.url)
    try:
        a.register(FUZZ_IDS[0])
        b.register(FUZZ_IDS[1])
        nest = "[" * 300 + "]" * 300
        a.send('{"type":"offer","to":"%s","offer":{"deep":%s},"requestId":"d"}'
               % (FUZZ_IDS[1], nest))
        reply = a.recv()
        assert reply["code"] == "invalid-message" and reply["requestId"] == "d", reply
        assert a.request({"type": "ping", "requestId": "after"}) == {
            "type": "pong", "requestId": "after"}
    finally:
        a.close()
        b.close()
    assert "Traceback" not in srv.log()
