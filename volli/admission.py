"""Admission in a reconnect storm: while this worker's event loop runs late, new WebSocket
upgrades get a cheap HTTP 503 with ``Retry-After``, before Flask sees them, so that the
connections already open, ``/health`` and the upgrades already admitted keep the CPU.

How late the loop runs is measured, not configured. gevent runs new greenlets (each
accepted connection's handler) and flush callbacks from one queue, a bounded slice per
turn of the loop: in an accept flood that queue grows seconds long while the loop itself
keeps turning. So an event-loop timer, every ``TICK`` seconds, queues a callback there and
notes how long it took to come round; with the time since the timer last fired (a
callback that holds the loop), that is the lag. The upgrades queued before the lag passes
``VOLLI_ADMISSION_LAG`` are admitted; the ones after it are refused, in a fraction of an
upgrade's cost, until the queue has drained. Refused clients back off (the JS client with
jitter, doubling), which spreads the storm over the time the worker needs.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Iterable

TICK = 0.02  # seconds between the loop's ticks
RETRY_AFTER = (1, 5)  # seconds, drawn at random so that clients that obey come back spread

_BUSY = json.dumps({"error": "unavailable",
                    "message": "server is busy; retry after the Retry-After delay"}).encode()
_NOT_A_PROBE = json.dumps({"error": "not-found", "message": "this port serves only /health, "
                           "/ready and /metrics"}).encode()


class LoopLag:
    """How late this process's event loop runs (0 until ``start``)."""

    def __init__(self) -> None:
        self._timer = None
        self._loop = None
        self._fired = 0.0  # when the timer last fired
        self._queued: float | None = None  # when the callback in the queue was queued
        self._delay = 0.0  # how long the last callback took to come round

    def start(self, loop) -> None:
        """Tick on ``loop`` (gevent's hub loop) from now on."""
        self._loop = loop
        self._fired = time.monotonic()
        self._timer = loop.timer(TICK, TICK)
        self._timer.start(self._fire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.close()
        self._timer = self._loop = self._queued = None
        self._delay = 0.0

    def _fire(self) -> None:
        self._fired = now = time.monotonic()
        if self._queued is None:  # one callback in the queue at a time
            self._queued = now
            self._loop.run_callback(self._came_round)

    def _came_round(self) -> None:
        if self._queued is not None:
            self._delay = time.monotonic() - self._queued
            self._queued = None

    def lag(self, now: float) -> float:
        if self._timer is None:
            return 0.0
        waiting = 0.0 if self._queued is None else now - self._queued
        return max(self._delay, waiting, now - self._fired - TICK)


PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


class Admission:
    """WSGI middleware in front of the Flask app, so that its answers cost no Flask
    dispatch: on the probe port (``VOLLI_HEALTH_PORT``) only the probe paths are served;
    ``path`` upgrades are refused while the loop lags more than ``limit`` seconds (0:
    never)."""

    def __init__(self, app: Callable, *, path: str, limit: float, lag: LoopLag,
                 probe_port: int, refused: Callable[[str], None]) -> None:
        self.app, self.path, self.limit, self.lag = app, path, limit, lag
        self.probe_port = str(probe_port) if probe_port else None
        self._refused = refused

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes] | Any:
        path = environ.get("PATH_INFO")
        if self.probe_port is not None and environ.get("SERVER_PORT") == self.probe_port \
                and path not in PROBE_PATHS:
            return _answer(start_response, "404 NOT FOUND", _NOT_A_PROBE, [])
        if self.limit and path == self.path and "HTTP_UPGRADE" in environ \
                and self.lag.lag(time.monotonic()) > self.limit:
            self._refused("busy")
            return _answer(start_response, "503 SERVICE UNAVAILABLE", _BUSY,
                           [("Retry-After", str(random.randint(*RETRY_AFTER))),
                            ("Connection", "close")])
        return self.app(environ, start_response)


def _answer(start_response: Callable, status: str, body: bytes,
            headers: list[tuple[str, str]]) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]
