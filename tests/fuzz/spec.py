"""What docs/protocol.md fixes that the fuzz test relies on (limits, error codes, message
types and fields, WebSocket opcodes), and the user IDs it plays with."""

from __future__ import annotations

import re

MAX_SIZE = 8192  # VOLLI_MAX_MESSAGE_SIZE of the fuzzed server: oversized cases stay cheap
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
