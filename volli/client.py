"""An asyncio client for the Volli signaling protocol (docs/protocol.md, docs/client-python.md).

Needs the ``client`` extra (python-websockets); aiortc is optional and only imported by the
conversion helpers. The server never imports this module.

Design: one reader task owns the socket. A reply carrying the ``requestId`` of a pending
request (register, discover, ice-servers, ping, rotate-key, watch, unwatch) resolves that
request; every other message (relayed offer/answer/ice-candidate, pushed ``ice-servers``,
``presence``, ``session-replaced``, errors without a pending ``requestId``) goes to the
handler registered
for its ``type`` with :meth:`VolliClient.on` if there is one, else to :meth:`VolliClient.recv`
(also ``async for message in client``). Handlers run one at a time, in arrival order, in a
dispatcher task, so a handler may await requests on the same client.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from volli.protocol.identity import register_payload, rotate_payload

if TYPE_CHECKING:
    from aiortc import RTCIceCandidate, RTCSessionDescription
    from nacl.signing import SigningKey
    from websockets.asyncio.client import ClientConnection

Message = dict[str, Any]
log = logging.getLogger(__name__)
Handler = Callable[[Message], Awaitable[None] | None]
_CLOSED = object()
# Only these can answer a request: a relayed message may carry its sender's own requestId.
_REPLY_TYPES = frozenset({"registered", "discover-response", "pong", "ice-servers",
                          "key-rotated", "watching", "unwatched", "error"})


class VolliError(Exception):
    """An ``error`` reply from the server (``code`` as in docs/protocol.md section 7)."""

    def __init__(self, code: str, message: str, reply: Message | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.reply = code, message, reply or {}


class VolliClient:
    """One registered signaling connection. Use ``async with VolliClient(...) as c`` or
    ``await c.connect()`` … ``await c.close()``."""

    def __init__(self, url: str, user_id: str, signing_key: SigningKey | None = None,
                 public_key: str | None = None, *, request_timeout: float = 10.0,
                 **connect_options: Any) -> None:
        """``signing_key`` signs the registration (and binds ``user_id`` to its key); without
        it ``public_key`` (any base64 string) is registered unsigned. ``connect_options`` go
        to ``websockets.asyncio.client.connect`` (e.g. ``open_timeout``, ``proxy``)."""
        if signing_key is not None:
            derived = base64.b64encode(bytes(signing_key.verify_key)).decode()
            if public_key is not None and public_key != derived:
                raise ValueError("public_key does not match signing_key")
            public_key = derived
        if public_key is None:
            raise ValueError("give a signing_key or a public_key")
        self.url, self.user_id, self.public_key = url, user_id, public_key
        self.signing_key = signing_key
        self.request_timeout = request_timeout
        self.nonce: str | None = None  # the nonce for the next signed operation
        self._options = {"open_timeout": 10, "close_timeout": 2, **connect_options}
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._handlers: dict[str, Handler] = {}
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._dispatch: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> Message:
        """Open the WebSocket, read ``hello`` and register; returns the ``registered`` reply.
        Raises :class:`VolliError` if the server refuses the registration."""
        try:
            from websockets.asyncio.client import connect
        except ImportError as exc:  # pragma: no cover
            raise ImportError("volli.client needs websockets: "
                              "pip install 'volli-signaling[client]'") from exc
        self._ws = await connect(self.url, **self._options)
        try:
            hello = json.loads(await asyncio.wait_for(self._ws.recv(), self.request_timeout))
            if hello.get("type") != "hello":
                raise VolliError("protocol", f"expected hello, got {hello!r}", hello)
            self.nonce = hello["nonce"]
            self._tasks = [asyncio.create_task(self._read()),
                           asyncio.create_task(self._run_handlers())]
            message: Message = {"type": "register", "userId": self.user_id,
                                "publicKey": self.public_key}
            if self.signing_key is not None:
                message["signature"] = self._sign(register_payload(self.nonce, self.user_id))
            reply = await self.request(message)
        except BaseException:
            await self.close()
            raise
        self.nonce = reply.get("nonce", self.nonce)
        return reply

    async def close(self) -> None:
        """Close the connection (code 1000) and stop the reader and the dispatcher;
        :meth:`recv` then raises ``ConnectionError``."""
        if self._ws is not None:
            await self._ws.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        if tasks:
            await asyncio.wait(tasks[:1], timeout=self._options["close_timeout"])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_pending()
        self._inbox.put_nowait(_CLOSED)

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code once closed (4000: session replaced, see the protocol)."""
        return None if self._ws is None else self._ws.close_code

    async def __aenter__(self) -> VolliClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Requests with a reply.

    async def request(self, message: Message) -> Message:
        """Send ``message`` with a fresh ``requestId`` and return the reply carrying it;
        an ``error`` reply raises :class:`VolliError`."""
        request_id = f"py-{next(self._ids)}"
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.send({**message, "requestId": request_id})
            reply = await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._pending.pop(request_id, None)
        if reply.get("type") == "error":
            raise VolliError(reply.get("code", "?"), reply.get("message", ""), reply)
        return reply

    async def discover(self, user_id: str) -> Message:
        """``{"userId", "online", "publicKey"}`` for ``user_id``."""
        reply = await self.request({"type": "discover", "userId": user_id})
        return {k: reply.get(k) for k in ("userId", "online", "publicKey")}

    async def watch(self, *user_ids: str) -> dict[str, bool]:
        """Subscribe to the presence of ``user_ids``; returns ``{userId: online}`` now.
        Each change then arrives as a ``presence`` message (``{"userId", "online"}``):
        give it a handler with ``on("presence", …)`` or read it with :meth:`recv`."""
        reply = await self.request({"type": "watch", "userIds": list(user_ids)})
        return {p["userId"]: p["online"] for p in reply["presence"]}

    async def unwatch(self, *user_ids: str) -> None:
        await self.request({"type": "unwatch", "userIds": list(user_ids)})

    async def ice_servers(self) -> list[Message]:
        """The ``iceServers`` list (RTCConfiguration shape); empty without TURN configured."""
        return (await self.request({"type": "ice-servers"}))["iceServers"]

    async def ping(self) -> float:
        """Application-level ping; returns the round-trip time in seconds."""
        start = time.perf_counter()
        await self.request({"type": "ping"})
        return time.perf_counter() - start

    async def rotate_key(self, new_key: SigningKey) -> Message:
        """Bind ``new_key`` to this (signed) user ID; later signatures use it."""
        if self.signing_key is None or self.nonce is None:
            raise VolliError("signature-required", "register with a signing_key first")
        new_public = base64.b64encode(bytes(new_key.verify_key)).decode()
        signature = self._sign(rotate_payload(self.nonce, self.user_id, new_public))
        reply = await self.request({"type": "rotate-key", "newPublicKey": new_public,
                                    "signature": signature})
        self.signing_key, self.public_key, self.nonce = new_key, new_public, reply["nonce"]
        return reply

    # Relays: no reply on success; failures arrive later as "error" messages.

    async def send(self, message: Message) -> None:
        """Send one raw protocol message."""
        if self._ws is None:
            raise ConnectionError("not connected")
        from websockets.exceptions import ConnectionClosed
        try:
            # Compact, as the server relays it: such a relay is passed on as written.
            await self._ws.send(json.dumps(message, separators=(",", ":"), ensure_ascii=False))
        except ConnectionClosed as exc:
            raise ConnectionError(f"signaling connection closed ({exc})") from exc

    async def send_offer(self, to: str, offer: Message | RTCSessionDescription,
                         **extra: Any) -> None:
        """Relay an offer (dict or RTCSessionDescription); ``extra`` fields pass through."""
        await self.send({"type": "offer", "to": to, "offer": description_to_dict(offer), **extra})

    async def send_answer(self, to: str, answer: Message | RTCSessionDescription,
                          **extra: Any) -> None:
        """Relay an answer (dict or RTCSessionDescription)."""
        await self.send({"type": "answer", "to": to, "answer": description_to_dict(answer),
                         **extra})

    async def send_candidate(self, to: str, candidate: Message | RTCIceCandidate | None,
                             **extra: Any) -> None:
        """Send one ICE candidate; ``None`` signals end of candidates."""
        if candidate is not None and not isinstance(candidate, dict):
            candidate = candidate_to_dict(candidate)
        await self.send({"type": "ice-candidate", "to": to, "candidate": candidate, **extra})

    # Incoming messages.

    def on(self, type_: str, handler: Handler) -> None:
        """Route messages of ``type_`` to ``handler`` (sync or async) instead of :meth:`recv`."""
        self._handlers[type_] = handler

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message that is no reply and has no handler; raises ``ConnectionError``
        once the connection has closed and everything before that was read."""
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)
            raise ConnectionError("signaling connection closed")
        return item

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except ConnectionError:
                return

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for text in self._ws:
                message = json.loads(text)
                future = None
                if message.get("type") in _REPLY_TYPES:
                    future = self._pending.get(str(message.get("requestId")))
                if future is not None and not future.done():
                    future.set_result(message)
                else:
                    self._dispatch.put_nowait(message)
        except Exception as exc:  # an abnormal close ends the connection like a normal one
            log.debug("signaling connection ended: %r", exc)
        finally:
            self._fail_pending()
            self._dispatch.put_nowait(_CLOSED)

    async def _run_handlers(self) -> None:
        while (message := await self._dispatch.get()) is not _CLOSED:
            handler = self._handlers.get(message.get("type"))
            if handler is None:
                self._inbox.put_nowait(message)
                continue
            try:
                result = handler(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("volli handler for %r failed", message.get("type"))
        self._inbox.put_nowait(_CLOSED)

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("signaling connection closed"))

    def _sign(self, payload: bytes) -> str:
        assert self.signing_key is not None
        return base64.b64encode(self.signing_key.sign(payload).signature).decode()


# aiortc conversions (aiortc is imported only when a dict is turned into an aiortc object).

def description_to_dict(description: Message | RTCSessionDescription) -> Message:
    """An RTCSessionDescription (or dict) as ``{"type", "sdp"}``."""
    if isinstance(description, dict):
        return description
    return {"type": description.type, "sdp": description.sdp}


def description_from_dict(data: Message) -> RTCSessionDescription:
    """``{"type", "sdp"}`` as an aiortc RTCSessionDescription."""
    from aiortc import RTCSessionDescription
    return RTCSessionDescription(sdp=data["sdp"], type=data["type"])


def candidate_to_dict(candidate: RTCIceCandidate | None) -> Message | None:
    """An aiortc RTCIceCandidate in the browser's ``toJSON()`` form
    ``{"candidate": "candidate:…", "sdpMid", "sdpMLineIndex"}``; ``None`` stays ``None``."""
    if candidate is None:
        return None
    from aiortc.sdp import candidate_to_sdp
    return {"candidate": "candidate:" + candidate_to_sdp(candidate),
            "sdpMid": candidate.sdpMid, "sdpMLineIndex": candidate.sdpMLineIndex}


def candidate_from_dict(data: Message | None) -> RTCIceCandidate | None:
    """A browser-form candidate as an aiortc RTCIceCandidate. ``None`` and an empty
    ``candidate`` string (both mean end of candidates) give ``None``, which is what
    ``RTCPeerConnection.addIceCandidate`` takes for end of candidates."""
    if data is None or not data.get("candidate"):
        return None
    from aiortc.sdp import candidate_from_sdp
    text = data["candidate"].strip()
    text = text.removeprefix("a=").removeprefix("candidate:")
    candidate = candidate_from_sdp(text)
    candidate.sdpMid = data.get("sdpMid")
    candidate.sdpMLineIndex = data.get("sdpMLineIndex")
    return candidate
