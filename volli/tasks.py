"""Per-worker background greenlets, started by gunicorn's ``post_worker_init`` hook."""

from __future__ import annotations

import logging
import time
from typing import Callable

import gevent
import gevent.event
from flask import Flask

from .runtime import Runtime

log = logging.getLogger("volli.tasks")

DRAIN_POLL = 0.2  # seconds between checks of the worker's alive flag
DRAIN_WAIT = 5.0  # seconds to wait for connections to finish after closing with 1001
KEEPALIVE_SLICE = 200  # pings between yields to other greenlets
METRICS_FLUSH = 1.0  # seconds: how far other workers' counters may lag in /metrics
PRESENCE_TICK = 0.2  # seconds: how late after its debounce an offline may be told


def start_worker_tasks(app: Flask, is_alive: Callable[[], bool]) -> None:
    """Start this worker's background loops, each supervised (see supervise.py)."""
    runtime: Runtime = app.extensions["volli"]
    runtime.backend.start(gevent.spawn)
    runtime.hub.push.start()
    loops = {"stats": stats_loop, "keepalive": keepalive_loop, "metrics": metrics_loop,
             "presence": presence_loop}
    for name, loop in loops.items():
        runtime.loops.start(name, loop, runtime)
    for name, loop in runtime.backend.loops().items():
        runtime.loops.start(name, loop)
    runtime.loops.start("drain-watch", drain_on_exit, runtime, is_alive)


def stats_line(runtime: Runtime) -> str:
    totals = runtime.metrics
    bindings = runtime.backend.binding_count()
    return (f"stats online={runtime.backend.online_count()} connections={runtime.connections} "
            + ("" if bindings is None else f"bindings={bindings} ") +
            f"received={totals['received']} relayed={totals['relayed']} "
            f"errors={totals['errors']}")


def stats_loop(runtime: Runtime) -> None:
    while True:
        gevent.sleep(runtime.settings.stats_interval)
        log.info(stats_line(runtime))


def metrics_loop(runtime: Runtime) -> None:
    while True:
        gevent.sleep(METRICS_FLUSH)
        runtime.metrics.flush()


def presence_loop(runtime: Runtime) -> None:
    while True:
        gevent.sleep(PRESENCE_TICK)
        runtime.hub.announce_due()


def keepalive_loop(runtime: Runtime) -> None:
    """One greenlet pings every connection each interval (no timer per connection); a
    connection that has not answered the previous ping is closed with 1008."""
    while True:
        gevent.sleep(runtime.settings.ping_interval)
        for n, session in enumerate(runtime.backend.local_sessions(), 1):
            session.keepalive()
            if not n % KEEPALIVE_SLICE:
                gevent.sleep(0)  # 20,000 pings in one pass held /health for 0.7 s


def drain_on_exit(runtime: Runtime, is_alive: Callable[[], bool]) -> None:
    """When gunicorn stops this worker (SIGTERM), close every client with 1001 at once
    instead of letting them hang until the graceful timeout."""
    while is_alive():
        gevent.sleep(DRAIN_POLL)
    drain(runtime)


def drain(runtime: Runtime) -> None:
    """Close every connection with 1001 and wait (bounded) until they are finished.
    Called by the drain greenlet and again from gunicorn's ``worker_exit`` hook: the worker
    does not wait for connections on its own, since they left its request greenlets."""
    if runtime.drained is None:
        runtime.drained = gevent.event.Event()
    if runtime.draining:
        runtime.drained.wait(DRAIN_WAIT)
        return
    runtime.draining = True
    closed = runtime.hub.shutdown()
    deadline = time.monotonic() + DRAIN_WAIT
    while runtime.connections and time.monotonic() < deadline:
        gevent.sleep(0.05)
    log.info("drained: closed %d connections with 1001; %d still open, %d users online",
             closed, runtime.connections, runtime.backend.online_count())
    runtime.backend.stop()
    runtime.metrics.flush()
    runtime.drained.set()
