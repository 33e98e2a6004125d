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
import dataclasses
import inspect
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from volli.limits import TokenBucket
from volli.protocol import hpke, sealing
from volli.protocol.identity import encryption_key_payload, register_payload, rotate_payload

if TYPE_CHECKING:
    from aiortc import RTCIceCandidate, RTCSessionDescription
    from nacl.signing import SigningKey
    from websockets.asyncio.client import ClientConnection

Message = dict[str, Any]
log = logging.getLogger(__name__)
Handler = Callable[[Message], Awaitable[None] | None]
_CLOSED = object()
_RELAY_FIELD = {"offer": "offer", "answer": "answer", "ice-candidate": "candidate"}
_SEAL_MODES = ("auto", "always", "never")
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
                 encryption_key: X25519PrivateKey | None = None, seal: str = "auto",
                 pinned_keys: dict[str, str] | None = None,
                 sealed_max_age: float = sealing.MAX_AGE_MS / 1000,
                 sealed_max_ahead: float = sealing.MAX_AHEAD_MS / 1000,
                 **connect_options: Any) -> None:
        """``signing_key`` signs the registration (and binds ``user_id`` to its key); without
        it ``public_key`` (any base64 string) is registered unsigned. With a signing key the
        client publishes ``encryption_key`` (generated if not given) and seals relays
        (docs/client-python.md, Sealed signaling); ``seal`` is "auto", "always" or "never",
        ``pinned_keys`` maps user IDs to the identity keys to trust for them.
        ``connect_options`` go to ``websockets.asyncio.client.connect``."""
        if seal not in _SEAL_MODES:
            raise ValueError(f"seal must be one of {_SEAL_MODES}")
        if seal == "always" and signing_key is None:
            raise ValueError("seal='always' needs a signing_key: seals are signed")
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
        self.max_message_size: int | None = None  # the server's, from hello
        self._options = {"open_timeout": 10, "close_timeout": 2, **connect_options}
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._handlers: dict[str, Handler] = {}
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._dispatch: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.seal = seal
        self.encryption_key = None
        if signing_key is not None and seal != "never":
            self.encryption_key = encryption_key or X25519PrivateKey.generate()
        self.pinned_keys = dict(pinned_keys or {})
        self._sealed_window = (int(sealed_max_age * 1000), int(sealed_max_ahead * 1000))
        self._replays = sealing.ReplayGuard(sum(self._sealed_window))
        self._peers: dict[str, PeerKeys] = {}  # discovered keys, by user ID, oldest first
        self._lookups = TokenBucket(_LOOKUPS_PER_MINUTE / 60, _LOOKUPS_PER_MINUTE,
                                    time.monotonic())
        self._relay_lock = asyncio.Lock()  # sealed sends may discover first: keeps order

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
            self.max_message_size = hello.get("maxMessageSize")
            self._tasks = [asyncio.create_task(self._read()),
                           asyncio.create_task(self._run_handlers())]
            message: Message = {"type": "register", "userId": self.user_id,
                                "publicKey": self.public_key}
            if self.signing_key is not None:
                message["signature"] = self._sign(register_payload(self.nonce, self.user_id))
                message.update(self._published(self.user_id, self._sign))
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
        """``{"userId", "online", "publicKey", "verified", "encryptionKey"}`` for ``user_id``;
        ``encryptionKey`` only once its signature by the trusted identity key verified (see
        :meth:`peer_keys`)."""
        reply = await self.request({"type": "discover", "userId": user_id})
        peer = self._note_peer(user_id, reply)  # what _look_up does, keeping the reply
        return {"userId": reply.get("userId"), "online": reply.get("online"),
                "publicKey": reply.get("publicKey"), "verified": reply.get("verified"),
                "encryptionKey": peer.encryption_key_text}

    def peer_keys(self, user_id: str) -> PeerKeys | None:
        """What the last ``discover`` of ``user_id`` established: its trusted identity key,
        its encryption key (None: none, or its signature failed) and ``problem``."""
        return self._peers.get(user_id)

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
        reply = await self.request({
            "type": "rotate-key", "newPublicKey": new_public, "signature": signature,
            # re-signed by the new key (the server drops one signed by the old key)
            **self._published(self.user_id, lambda data: _sign_with(new_key, data))})
        self.signing_key, self.public_key, self.nonce = new_key, new_public, reply["nonce"]
        return reply

    # Relays: no reply on success; failures arrive later as "error" messages.

    async def send(self, message: Message) -> None:
        """Send one raw protocol message."""
        if self._ws is None:
            raise ConnectionError("not connected")
        from websockets.exceptions import ConnectionClosed
        # Compact, as the server relays it: such a relay is passed on as written.
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        size = len(text.encode())
        if isinstance(self.max_message_size, int) and size > self.max_message_size:
            # The server would close the connection (1009): refuse here, and stay open.
            raise VolliError("message-too-large", f"a {message.get('type')!r} of {size} bytes "
                             f"is over the server's maxMessageSize {self.max_message_size}")
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            raise ConnectionError(f"signaling connection closed ({exc})") from exc

    async def send_offer(self, to: str, offer: Message | RTCSessionDescription,
                         **extra: Any) -> None:
        """Relay an offer (dict or RTCSessionDescription), sealed when it can be;
        ``extra`` fields pass through."""
        await self._relay("offer", to, description_to_dict(offer), extra)

    async def send_answer(self, to: str, answer: Message | RTCSessionDescription,
                          **extra: Any) -> None:
        """Relay an answer (dict or RTCSessionDescription), sealed when it can be."""
        await self._relay("answer", to, description_to_dict(answer), extra)

    async def send_candidate(self, to: str, candidate: Message | RTCIceCandidate | None,
                             **extra: Any) -> None:
        """Send one ICE candidate, sealed when it can be; ``None`` signals end of
        candidates."""
        if candidate is not None and not isinstance(candidate, dict):
            candidate = candidate_to_dict(candidate)
        await self._relay("ice-candidate", to, candidate, extra)

    async def _relay(self, kind: str, to: str, payload: Any, extra: Message) -> None:
        """Seal when this client signs and ``to`` published a verified encryption key;
        with ``seal="always"`` never send in clear. An offer or an answer (once per call,
        this client's own doing) looks the key up afresh: the peer may have registered
        since with a new one."""
        async with self._relay_lock:
            key = None
            if self.seal != "never" and self.signing_key is not None:
                peer = self._peers.get(to)
                if peer is None or kind != "ice-candidate":
                    peer = await self._look_up(to)
                key = peer.encryption_key
            if key is None:
                if self.seal == "always":
                    raise VolliError("no-encryption-key", f"{to!r} has no verified "
                                     "encryption key: nothing was sent (seal='always')")
                await self.send({"type": kind, "to": to, _RELAY_FIELD[kind]: payload,
                                 **extra})
                return
            try:
                sealed = sealing.seal(kind, self.user_id, to, payload, key, self.signing_key,
                                      _now_ms())
            except ValueError:  # a small-order point: no shared secret with it
                raise VolliError("bad-encryption-key", f"{to!r} published an encryption "
                                 "key that cannot be sealed to: nothing was sent") from None
            await self.send({"type": kind, "to": to, "sealed": sealed, **extra})

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
            if message.get("type") in _RELAY_FIELD:
                try:
                    message = await self._opened(message)
                except Exception:  # never let one relay stop the dispatcher
                    log.exception("volli could not open a relay from %r", message.get("from"))
                    message = _sealed_error("malformed", message)
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
        return _sign_with(self.signing_key, payload)

    def _published(self, user_id: str, sign: Callable[[bytes], str]) -> Message:
        """The encryptionKey fields of a register or rotate-key, signed with ``sign``."""
        if self.encryption_key is None:
            return {}
        key = sealing.b64(hpke.public_bytes(self.encryption_key))
        return {"encryptionKey": key,
                "encryptionKeySignature": sign(encryption_key_payload(user_id, key))}

    def _note_peer(self, user_id: str, reply: Message) -> PeerKeys:
        """Keep what a discover-response for ``user_id`` establishes (see PeerKeys): the
        identity key to trust (pinned, else the discovered one if ``verified``) and the
        encryption key whose signature by that key verifies."""
        public_key = reply.get("publicKey")
        if reply.get("userId") != user_id or not isinstance(public_key, str):
            public_key = None  # a reply about someone else, or no key, proves nothing
        pinned = self.pinned_keys.get(user_id)
        trusted = pinned or (public_key if reply.get("verified") else None)
        peer = PeerKeys(user_id, trusted, None, None, time.monotonic())
        if pinned is not None and reply.get("verified") and public_key != pinned:
            peer.problem = "pinned-key"
        text, signature = reply.get("encryptionKey"), reply.get("encryptionKeySignature")
        if trusted is not None and text is not None:
            try:
                VerifyKey(base64.b64decode(trusted)).verify(
                    encryption_key_payload(user_id, text), base64.b64decode(signature))
                peer.encryption_key = base64.b64decode(text)
            except (BadSignatureError, ValueError, TypeError):
                peer.problem = peer.problem or "bad-encryption-key-signature"
        if peer.problem:
            log.warning("not trusting what the server says of %r: %s", user_id, peer.problem)
            self._dispatch.put_nowait({"type": "key-mismatch", "reason": peer.problem,
                                       "userId": user_id})
        self._remember(peer)
        return peer

    async def _look_up(self, user_id: str) -> PeerKeys:
        """A discover of ``user_id``, for its keys."""
        return self._note_peer(user_id, await self.request(
            {"type": "discover", "userId": user_id}))

    def _remember(self, peer: PeerKeys) -> None:
        self._peers.pop(peer.user_id, None)
        if len(self._peers) >= _PEERS_KEPT:
            self._peers.pop(next(iter(self._peers)))
        self._peers[peer.user_id] = peer

    async def _sender_keys(self, sender: str, refresh: bool) -> PeerKeys | None:
        """The keys known for the sender of a received relay. Looked up only when none
        are known, or (``refresh``) the known ones are older than _PEER_REFRESH, and only
        within _LOOKUPS_PER_MINUTE: relays, anyone's to send, must not spend this
        client's discover allowance. A failed lookup keeps what was known, and an
        unknown sender's failure is remembered as such."""
        peer, now = self._peers.get(sender), time.monotonic()
        if peer is not None and not (refresh and now - peer.at >= _PEER_REFRESH):
            return peer
        if self._lookups.take(now):
            return peer
        try:
            return await self._look_up(sender)
        except (VolliError, ConnectionError, asyncio.TimeoutError):
            if peer is None:
                peer = PeerKeys(sender, self.pinned_keys.get(sender), None, "lookup-failed",
                                now)
                self._remember(peer)
            return peer

    async def _opened(self, message: Message) -> Message:
        """A relay as the application gets it: a sealed one opened (or a ``sealed-error``
        in its place), a plaintext one marked ``sealed: False``. The sender's keys are
        needed only once the relay has opened: junk costs no lookup."""
        kind, sender = message["type"], message.get("from")
        if "sealed" not in message:
            if self.seal == "always":
                return _sealed_error("not-sealed", message)
            return {**message, "sealed": False}
        if self.encryption_key is None or not isinstance(sender, str):
            return _sealed_error("does-not-open", message)
        try:
            envelope = sealing.unseal(kind, sender, self.user_id, message["sealed"],
                                      self.encryption_key)
        except sealing.SealedError as exc:
            return _sealed_error(exc.reason, message)
        peer = await self._sender_keys(sender, refresh=False)
        while True:
            if peer is None or peer.public_key is None:
                return _sealed_error("unknown-sender", message)
            try:
                payload = sealing.verify(envelope, base64.b64decode(peer.public_key),
                                         _now_ms(), max_age=self._sealed_window[0],
                                         max_ahead=self._sealed_window[1])
                self._replays.check(message["sealed"]["enc"], _now_ms())
            except sealing.SealedError as exc:
                # A sender that rotated its identity key: look it up again (throttled).
                fresher = (await self._sender_keys(sender, refresh=True)
                           if exc.reason == "bad-signature" else peer)
                if fresher is not peer:
                    peer = fresher
                    continue
                return _sealed_error(exc.reason, message)
            opened = {k: v for k, v in message.items() if k != "sealed"}
            opened.update({_RELAY_FIELD[kind]: payload, "sealed": True})
            return opened


_PEERS_KEPT = 4096  # discovered users whose keys are kept (the oldest go first)
_PEER_REFRESH = 30.0  # seconds before a received relay may look its sender up again
_LOOKUPS_PER_MINUTE = 30  # lookups received relays may cause (the server allows 120)


@dataclasses.dataclass(slots=True)
class PeerKeys:
    """A discovered user: ``public_key`` the identity key trusted for it (pinned, or
    discovered with ``verified``), ``encryption_key`` its raw X25519 key once the
    signature by that identity key verified, ``problem`` why not
    ("bad-encryption-key-signature", "pinned-key")."""

    user_id: str
    public_key: str | None
    encryption_key: bytes | None
    problem: str | None
    at: float  # when it was looked up (time.monotonic)

    @property
    def encryption_key_text(self) -> str | None:
        return None if self.encryption_key is None else sealing.b64(self.encryption_key)


def _sealed_error(reason: str, message: Message) -> Message:
    """In place of a relay that must not be delivered (never its plaintext)."""
    return {"type": "sealed-error", "reason": reason, "from": message.get("from"),
            "messageType": message.get("type")}


def _sign_with(key: SigningKey, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload).signature).decode()


def _now_ms() -> int:
    return int(time.time() * 1000)


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
