"""A real WebSocket man-in-the-middle between a client and a real Volli server, for tests
of what a malicious server (or anyone on its path) can do to sealed signaling.

    from signaling_mitm import Mitm, rewrite_json

    def swap_key(msg):                      # a dict in, a dict (or None to drop) out
        if msg.get("type") == "discover-response" and msg.get("encryptionKey"):
            msg["encryptionKey"] = OTHER_KEY
        return msg

    with Mitm(server.url, to_client=rewrite_json(swap_key)) as proxy:
        connect a client to proxy.url ...
        proxy.frames                        # [(direction, text as received, text forwarded)]

Hooks take the text of one frame and return the text to forward, None to drop it, or a
list of texts to send instead (a replay: the same text twice);
`to_client` sees server -> client frames, `to_server` client -> server frames. Binary
frames pass unchanged. Every client connection gets its own upstream connection (the
client's `Origin` is passed on). The proxy runs an asyncio loop (python-websockets) in a
thread of its own on 127.0.0.1, so it works under Playwright's sync API and from plain
threads alike.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

Hook = Callable[[str], "str | list[str] | None"]


def rewrite_json(fn: Callable[[dict[str, Any]], Any]) -> Hook:
    """A hook from a function of the decoded message (a dict it may change in place)
    returning a dict, None (drop) or a list of dicts; non-objects pass unchanged."""
    def hook(text: str) -> str | list[str] | None:
        try:
            msg = json.loads(text)
        except ValueError:
            return text
        if not isinstance(msg, dict):
            return text
        out = fn(msg)
        if isinstance(out, list):
            return [json.dumps(m) for m in out]
        return None if out is None else json.dumps(out)
    return hook


class Mitm:
    def __init__(self, upstream_url: str, to_client: Hook | None = None,
                 to_server: Hook | None = None) -> None:
        self.upstream_url = upstream_url
        self.to_client = to_client
        self.to_server = to_server
        # ("to-client" | "to-server", text received, text forwarded or None if dropped);
        # a frame the hook turned into several appears once per text sent
        self.frames: list[tuple[str, str, str | None]] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The proxy's endpoint: a client connects here instead of the server."""
        return f"ws://127.0.0.1:{self.port}/signaling"

    def __enter__(self) -> "Mitm":
        self._thread = threading.Thread(target=self._run, name="mitm", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"the proxy did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        if self._thread:
            self._thread.join(10)

    def sent(self, direction: str) -> list[dict[str, Any]]:
        """The JSON messages forwarded in one direction ("to-client" or "to-server")."""
        out = []
        for way, _, forwarded in list(self.frames):
            if way == direction and forwarded is not None:
                try:
                    out.append(json.loads(forwarded))
                except ValueError:
                    pass
        return out

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ when it happens early
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(self._handle, "127.0.0.1", 0, max_size=None, ping_interval=None) as srv:
            self.port = srv.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    async def _handle(self, client) -> None:
        origin = client.request.headers.get("Origin")
        headers = {"Origin": origin} if origin else {}
        try:
            upstream = await connect(self.upstream_url, additional_headers=headers, proxy=None,
                                     max_size=None, ping_interval=None, open_timeout=5)
        except Exception:
            await client.close(1011, "upstream unreachable")
            return
        async with upstream:
            pumps = [asyncio.create_task(self._pump(client, upstream, "to-server", "to_server")),
                     asyncio.create_task(self._pump(upstream, client, "to-client", "to_client"))]
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            code = next(iter(done)).result()
            for ws in (client, upstream):
                await ws.close(code or 1000)

    async def _pump(self, source, sink, direction: str, hook_name: str) -> int | None:
        """Forward frames until `source` closes; returns its close code."""
        try:
            async for frame in source:
                if isinstance(frame, str):
                    hook = getattr(self, hook_name)
                    out = hook(frame) if hook else frame
                    texts = (out or [None]) if isinstance(out, list) else [out]
                    for text in texts:
                        self.frames.append((direction, frame, text))
                        if text is not None:
                            await sink.send(text)
                    continue
                await sink.send(frame)
        except ConnectionClosed:
            pass
        code = source.close_code
        return code if code not in (None, 1005, 1006) else 1000
