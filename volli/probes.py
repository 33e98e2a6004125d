"""The probe port (``VOLLI_HEALTH_PORT``): WSGI middleware in front of the Flask app that
serves only the probe paths there, so that load balancers' health checks have a listen
queue of their own. In a reconnect storm the main port's queue holds thousands of
handshakes, about a millisecond of CPU each, and a probe that waits its turn behind them
times out: a load balancer that then marks the node down makes the storm worse."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})

_NOT_A_PROBE = json.dumps({"error": "not-found", "message": "this port serves only /health, "
                           "/ready and /metrics"}).encode()


class ProbePort:
    """On ``port`` (0: none) answer 404 to everything but the probe paths; without Flask,
    so a probe port under attack costs little."""

    def __init__(self, app: Callable, port: int) -> None:
        self.app = app
        self.port = str(port) if port else None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes] | Any:
        if self.port is not None and environ.get("SERVER_PORT") == self.port \
                and environ.get("PATH_INFO") not in PROBE_PATHS:
            start_response("404 NOT FOUND", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(_NOT_A_PROBE)))])
            return [_NOT_A_PROBE]
        return self.app(environ, start_response)
