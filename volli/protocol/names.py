"""Which strings may name a user, and which top-level keys a relayed message may carry.

User IDs are shown to people and compared by machines, so two IDs that look the same
must be the same string: one normalization form (NFC), and nothing invisible (control,
format, bidi, zero-width, BOM) that could make two different strings look alike.
Pure functions; ``docs/protocol.md`` section 2 states the same rules.
"""

from __future__ import annotations

import functools
import re
import unicodedata

# C0, DEL, C1 controls; the line/paragraph separators; every default-ignorable code
# point of Unicode (DerivedCoreProperties.txt): soft hyphen, zero-width characters, bidi
# marks and overrides, word joiners, Hangul fillers, variation selectors, BOM, tags; and
# symbols that render as blank space (braille blank, object replacement, null notehead).
_INVISIBLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5"
    "\u2800\ufffc\U0001d159"
    "\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0"
    "\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
# Categories refused on top of that: format (Cf), surrogates (Cs), unassigned (Cn: their
# normalization may change in a later Unicode version).
_REFUSED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Cn", "Zl", "Zp"))


def user_id_problem(value: str, max_length: int) -> str | None:
    """Why ``value`` cannot be a user ID, or None if it can."""
    if not value:
        return "is empty"
    if len(value) > max_length:
        return f"is longer than {max_length} characters"
    return _characters_problem(value)


# Relay targets repeat: each is checked once. Bounded in count, and in bytes by the
# length check before it.
@functools.lru_cache(maxsize=4096)
def _characters_problem(value: str) -> str | None:
    if _INVISIBLE.search(value):
        return "contains control, format or invisible characters"
    if value.strip() != value:
        return "starts or ends with whitespace"
    if "  " in value:
        return "has whitespace other than single spaces (U+0020)"
    if value.isascii():  # ASCII whitespace but the space is control characters: done
        return None
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in value):
        return "contains control, format or unassigned characters"
    if any(c.isspace() and c != " " for c in value):
        return "has whitespace other than single spaces (U+0020)"
    if not unicodedata.is_normalized("NFC", value):
        return "is not in Unicode normalization form NFC"
    return None


# Keys the server routes by, or stamps (heldFor, on offers held for an offline callee). A
# receiver's JSON parser may match keys without regard to case (Go's encoding/json, cJSON)
# or stop at a NUL (C strings): no other top-level key may look like one of these to it.
ROUTING_KEYS = frozenset(("type", "to", "from"))
STAMPED_KEYS = frozenset(("heldfor",))


def key_problem(key: str) -> str | None:
    """Why a relayed message may not carry the top-level ``key``, or None."""
    if key.casefold() in STAMPED_KEYS:
        return f"key {key[:16]!r} is set by the server"
    if key in ROUTING_KEYS:
        return None
    if key.casefold() in ROUTING_KEYS:
        return f"key {key[:16]!r} could be read as {key.casefold()!r}"
    if _INVISIBLE.search(key):
        return "keys may not contain control or invisible characters"
    return None
