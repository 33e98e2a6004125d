"""Per-process state of one Volli app, kept in ``app.extensions["volli"]``."""

from __future__ import annotations

import dataclasses
import functools
import logging
import resource
from typing import Any
import time

from flask import Flask, current_app

from .backends import Backend, create_backend
from .config import Settings
from .hub import Hub
from .limits import AddressLimits
from .metrics import Metrics
from .supervise import Loops


@dataclasses.dataclass
class Runtime:
    settings: Settings
    backend: Backend
    hub: Hub
    metrics: Metrics  # this worker's counters, for the hub, transport, routes and tasks
    addresses: AddressLimits
    started: float = dataclasses.field(default_factory=time.monotonic)
    # WebSockets admitted and not yet finished, counted from before the upgrade.
    connections: int = 0
    # VOLLI_MAX_CONNECTIONS, or less if this process may not open that many files.
    max_connections: int = 0
    draining: bool = False
    # Set once a drain has finished (created lazily: it must be a gevent Event).
    drained: Any = None
    loops: Loops = dataclasses.field(default_factory=Loops)

    @classmethod
    def init_app(cls, app: Flask, settings: Settings) -> "Runtime":
        metrics = Metrics()
        hub = Hub(settings, functools.partial(create_backend, settings), metrics)
        runtime = cls(settings=settings, backend=hub.backend, hub=hub, metrics=metrics,
                      addresses=AddressLimits(settings.ip_max_connections,
                                              settings.ip_connect_rate, settings.ip_v6_prefix),
                      loops=Loops(on_failure=metrics.loop_failure))
        runtime.max_connections = connection_capacity(settings.max_connections)
        app.extensions["volli"] = runtime
        return runtime

    def uptime(self) -> float:
        return time.monotonic() - self.started


def get_runtime() -> Runtime:
    return current_app.extensions["volli"]


# Descriptors kept free for the listener, Redis connections, logs, metrics files and
# sockets mid-handshake (duplicated while they leave gunicorn's request greenlet).
FD_RESERVE = 256


def raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit to the hard one (allowed unprivileged):
    each WebSocket is one open file. Process setup: gunicorn's post_fork hook calls it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def connection_capacity(wanted: int) -> int:
    """How many WebSockets this process can hold: each is one open file. Past the limit,
    accepting fails inside gevent and gunicorn, where no client gets a clean refusal, so
    cap below it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= wanted:
        return wanted
    capacity = max(1, soft - FD_RESERVE)
    logging.getLogger("volli").warning(
        "VOLLI_MAX_CONNECTIONS=%d does not fit this process's open-file limit (%d): "
        "WebSockets beyond %d get HTTP 503 (raise the limit, e.g. systemd LimitNOFILE=, "
        "or run more workers)", wanted, soft, capacity)
    return capacity

