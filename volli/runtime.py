"""Per-process state of one Volli app, kept in ``app.extensions["volli"]``."""

from __future__ import annotations

import dataclasses
from typing import Any
import time

from flask import Flask, current_app

from .backends import Backend, create_backend
from .config import Settings
from .hub import Hub
from .limits import AddressLimits


@dataclasses.dataclass
class Runtime:
    settings: Settings
    backend: Backend
    hub: Hub
    addresses: AddressLimits
    started: float = dataclasses.field(default_factory=time.monotonic)
    # WebSockets admitted and not yet finished, counted from before the upgrade.
    connections: int = 0
    draining: bool = False
    # Set once a drain has finished (created lazily: it must be a gevent Event).
    drained: Any = None

    @classmethod
    def init_app(cls, app: Flask, settings: Settings) -> "Runtime":
        backend = create_backend(settings)
        runtime = cls(settings=settings, backend=backend, hub=Hub(backend, settings),
                      addresses=AddressLimits(settings.ip_max_connections,
                                              settings.ip_connect_rate))
        app.extensions["volli"] = runtime
        return runtime

    def uptime(self) -> float:
        return time.monotonic() - self.started


def get_runtime() -> Runtime:
    return current_app.extensions["volli"]
