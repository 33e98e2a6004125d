"""What the load generators send and expect from each server: the offer payload, and a
small adapter per protocol (Volli's, which the baseline speaks too, and peerjs-server's)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import urllib.parse
from typing import Any

try:
    import orjson

    loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a Volli dependency
    loads = json.loads

PEERJS_PATH = "/bench"  # peerjs-server's --path; the WebSocket endpoint is <path>/peerjs
PEERJS_KEY = "peerjs"  # the CLI's default --key


# --------------------------------------------------------------------------------------------
# Payload


def make_sdp(size: int) -> str:
    """A plausible SDP body of about ``size`` characters (CRLF lines, like a browser's)."""
    head = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0",
            "a=group:BUNDLE 0 1", "a=extmap-allow-mixed", "a=msid-semantic: WMS stream"]
    media = ["m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126", "c=IN IP4 0.0.0.0",
             "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:Xk3b", "a=ice-pwd:9vEq0rTqR1mYbC2Hq0fYy1nE",
             "a=ice-options:trickle",
             "a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:"
             "DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
             "a=setup:actpass", "a=mid:0", "a=sendrecv", "a=rtcp-mux",
             "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc",
             "a=fmtp:111 minptime=10;useinbandfec=1"]
    lines = list(head)
    i = 0
    while len("\r\n".join(lines)) < size:
        lines.append(media[i % len(media)])
        i += 1
    return ("\r\n".join(lines) + "\r\n")[:size]


# --------------------------------------------------------------------------------------------
# Per-server protocol adapters (client side). The load logic (pairs, window, pacing, latency)
# is the same for every server; only how a client registers, how an offer frame looks and
# which fields a relayed offer carries differ.

# What the client processes are told to load: (protocol name, WebSocket URL).
Target = tuple[str, str]


class Protocol:
    """Volli's protocol (the baseline speaks the same): {"type":"register",...} answered by
    {"type":"registered"}; offers {"type":"offer","to":id,"offer":{...}} arrive with "from"."""

    offer_type = "offer"  # "type" of a relayed offer at the receiver
    from_key = "from"  # field naming the sender in a relayed offer
    body_key = "offer"  # field holding the payload (with the "t" stamp) in a relayed offer
    error_types = frozenset({"error"})  # replies that stand for offers that won't arrive

    def offer_parts(self, to: str, sdp: str) -> tuple[str, str]:
        """Prefix and suffix of an offer frame; the send timestamp goes between them."""
        prefix = ('{"type":"offer","to":' + json.dumps(to) +
                  ',"offer":{"type":"offer","sdp":' + json.dumps(sdp) + ',"t":')
        return prefix, "}}"

    def sent_at(self, msg: dict[str, Any]) -> int:
        """The send stamp (monotonic ns) of a relayed offer."""
        return msg[self.body_key]["t"]

    def rejected(self, msg: dict[str, Any]) -> int:
        """How many offers an error reply on the sender's connection accounts for."""
        count = msg.get("undelivered")
        return count if isinstance(count, int) and count > 0 else 1

    async def open(self, url: str, user_id: str, opts: dict[str, Any]):
        ws = await _connect(url, opts)
        try:
            await ws.send(json.dumps({"type": "register", "userId": user_id,
                                      "publicKey": "AAAA"}))
            async with asyncio.timeout(10):
                reply = loads(await ws.recv())
                if reply.get("type") == "hello":  # Volli greets first; the baseline does not
                    reply = loads(await ws.recv())
            if reply.get("type") != "registered" or reply.get("userId") != user_id:
                raise RuntimeError(f"register {user_id!r}: unexpected reply {reply!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws


class PeerjsProtocol(Protocol):
    """peerjs-server (npm "peer"): the id, a token and the key go in the query string of
    <path>/peerjs, and the server answers {"type":"OPEN"}. Offers are
    {"type":"OFFER","dst":id,"payload":{...}}; the server relays {type, src, dst, payload}.
    A relay to a peer whose socket fails comes back as LEAVE; one to an unknown id is queued
    and, after expire_timeout, answered with EXPIRE (once per src/dst pair)."""

    offer_type = "OFFER"
    from_key = "src"
    body_key = "payload"
    error_types = frozenset({"ERROR", "LEAVE", "EXPIRE", "ID-TAKEN"})

    def offer_parts(self, to: str, sdp: str) -> tuple[str, str]:
        prefix = ('{"type":"OFFER","dst":' + json.dumps(to) +
                  ',"payload":{"type":"offer","sdp":' + json.dumps(sdp) + ',"t":')
        return prefix, "}}"

    def rejected(self, msg: dict[str, Any]) -> int:
        return 1

    async def open(self, url: str, user_id: str, opts: dict[str, Any]):
        query = urllib.parse.urlencode({"key": PEERJS_KEY, "id": user_id,
                                        "token": secrets.token_hex(8)})
        ws = await _connect(f"{url}?{query}", opts)
        try:
            async with asyncio.timeout(10):
                reply = loads(await ws.recv())
            if reply.get("type") != "OPEN":
                raise RuntimeError(f"connect {user_id!r}: unexpected reply {reply!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws


class SealedProtocol(Protocol):
    """Volli's sealed relays (docs/protocol.md 5e): the offer's payload is a ``sealed``
    {enc, ct} of random bytes, sized so that the frame is as long as the plaintext offer's
    (within 3 bytes: base64 comes in fours). The server checks the outer fields and sizes
    and relays it unread; the send stamp rides in ``requestId`` (a key the server reads
    as fast as the plaintext offer's), as a sealing client's own requestId would."""

    def offer_parts(self, to: str, sdp: str) -> tuple[str, str]:
        plain_prefix, plain_suffix = super().offer_parts(to, sdp)
        enc = base64.b64encode(secrets.token_bytes(32)).decode()
        head = '{"type":"offer","to":' + json.dumps(to) + ',"sealed":{"enc":"' + enc + '","ct":"'
        tail = '"},"requestId":'
        room = len(plain_prefix) + len(plain_suffix) - len(head) - len(tail) - len("}")
        ct = base64.b64encode(secrets.token_bytes(max(16, room // 4 * 3))).decode()
        return head + ct + tail, "}"

    def sent_at(self, msg: dict[str, Any]) -> int:
        return msg["requestId"]


PROTOCOLS: dict[str, Protocol] = {"volli": Protocol(), "peerjs": PeerjsProtocol(),
                                  "volli-sealed": SealedProtocol()}


async def _connect(url: str, opts: dict[str, Any]):
    from websockets.asyncio.client import connect

    return await connect(url, compression="deflate" if opts["deflate"] else None, proxy=None,
                         max_size=None, open_timeout=10, close_timeout=2, ping_interval=None)
