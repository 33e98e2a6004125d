"""Messages between nodes on their pub/sub channels (sans-I/O: bytes in, bytes out).

Version 1, the current one. A header line, then the body:

    0xFF <version, ASCII digits> SP <kind, one letter> LF <body>

    D  a relay:    <userId> LF <origin userId or empty> LF <frame text>
    B  a batch:    JSON array of [userId, origin userId or "", frame text]
    R  a takeover: <session id> (close that session of yours as replaced)
    P  a presence change of a user this node watches: <userId> LF <1 online, 0 offline>
       LF <the node that holds, or held, it>

0xFF never occurs in UTF-8, so a node from before versions (which decodes the whole
message as UTF-8 first) drops a versioned message as bad and never misreads it.

Version 0, before versions: the same bodies after ``D\\n``, ``B\\n`` or ``R\\n``, no header.
Nodes read it for ever, so during a rolling upgrade nothing an old node sends is lost.

Which version to write: a node's id ends with ``/w<version it reads>`` (ids of nodes
from before versions have no such suffix); a node writes to a peer the highest version
both read (``version_for``), so an upgraded node writes version 0 to an old one. Scripts
that publish pick the header the same way (``peer_header`` in Lua). A message of an
unknown version or kind is refused (WireError): the listener logs and counts it.
"""

from __future__ import annotations

import dataclasses
import re

import orjson

VERSION = 1
MARK = b"\xff"
_NODE_VERSION = re.compile(r"/w(\d+)$")
# The same test in Lua (scripts.py): does the node id name a version it reads?
LUA_NODE_VERSION = "/w%d+$"


class WireError(ValueError):
    """Not a message this node can read (unknown version or kind, or malformed)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Deliver:
    user_id: str
    origin: str  # "" when the frame comes from no user
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    frames: tuple[tuple[str, str, str], ...]  # (userId, origin, text)


@dataclasses.dataclass(frozen=True, slots=True)
class Replace:
    session_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceChange:
    """Sent only by scripts, only to nodes that watch (so never to a node from before P)."""

    user_id: str
    online: bool
    node: str


Message = Deliver | Batch | Replace | PresenceChange
_KINDS = {Deliver: b"D", Batch: b"B", Replace: b"R", PresenceChange: b"P"}


def node_id(base: str) -> str:
    """This node's id: ``base`` marked with the wire version it reads."""
    return f"{base}/w{VERSION}"


def version_for(node: str) -> int:
    """The version to write to ``node``: the highest that both it and this node read."""
    match = _NODE_VERSION.search(node)
    return min(VERSION, int(match.group(1))) if match else 0


def header(kind: bytes, version: int = VERSION) -> bytes:
    if version == 0:
        return kind + b"\n"
    return MARK + str(version).encode() + b" " + kind + b"\n"


# Every publish starts with one of these: built once, not per message.
_HEADERS = {(kind, version): header(kind, version)
            for kind in _KINDS.values() for version in range(VERSION + 1)}
_VERSION = str(VERSION).encode()


def body(message: Message) -> bytes:
    if isinstance(message, Deliver):
        return f"{message.user_id}\n{message.origin}\n{message.text}".encode()
    if isinstance(message, Batch):
        return orjson.dumps(message.frames)
    if isinstance(message, PresenceChange):
        return f"{message.user_id}\n{int(message.online)}\n{message.node}".encode()
    return message.session_id.encode()


def encode(message: Message, version: int = VERSION) -> bytes:
    return _HEADERS[_KINDS[type(message)], version] + body(message)


def decode(data: bytes) -> Message:
    if data[:1] == MARK:
        line, _, rest = data.partition(b"\n")
        version, _, kind = line[1:].partition(b" ")
        if version != _VERSION:
            raise WireError(f"unknown wire version {version[:8]!r}")
    else:  # version 0: a node from before versions
        kind, sep, rest = data.partition(b"\n")
        if not sep:
            raise WireError("no header")
    try:
        if kind == b"D":
            user_id, origin, text = rest.decode().split("\n", 2)
            return Deliver(user_id, origin, text)
        if kind == b"B":
            return Batch(tuple((u, o, t) for u, o, t in orjson.loads(rest)))
        if kind == b"R":
            return Replace(rest.decode())
        if kind == b"P":
            user_id, online, node = rest.decode().split("\n", 2)
            if online not in ("0", "1"):
                raise ValueError(f"online must be 0 or 1, not {online[:8]!r}")
            return PresenceChange(user_id, online == "1", node)
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise WireError(f"malformed {kind[:8]!r} message: {exc}") from exc
    raise WireError(f"unknown message kind {kind[:8]!r}")
