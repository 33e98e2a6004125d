"""What Volli counts: per-worker totals for the stats log line, and Prometheus metrics.

With several gunicorn workers, prometheus_client runs in its multiprocess mode: each
worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (gunicorn.conf.py sets
the directory up, and removes a dead worker's live gauges), and ``/metrics`` in any worker
adds them up. The variable must be set before this module is imported.
"""

from __future__ import annotations

import bisect
import collections
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
    generate_latest, multiprocess,
)

CONNECTIONS = Gauge("volli_connections", "Open WebSocket connections.",
                    multiprocess_mode="livesum")
USERS = Gauge("volli_registered_users", "Users registered on connections of this server.",
              multiprocess_mode="livesum")
RECEIVED = Counter("volli_messages_received", "Frames received, by message type.", ["type"])
RELAYED = Counter("volli_messages_relayed", "Relays accepted for their target, by type.",
                  ["type"])
ERRORS = Counter("volli_errors", "error messages sent, by code.", ["code"])
UNDELIVERED = Counter("volli_relays_undelivered",
                      "Accepted relays dropped with a closing receiver (senders are told).")
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
RELAY_LATENCY = Histogram(
    "volli_relay_latency_seconds",
    "From a relay's frame received to its enqueue for the target (or its publish to the "
    "target's worker).",
    buckets=LATENCY_BOUNDS)
REFUSED = Counter("volli_refused", "Refusals by limit: upgrades (503/429/403) and "
                  "rate-limited messages.", ["reason"])
REGISTRATIONS = Counter("volli_registrations", "Successful registrations.", ["signed"])
REDIS_FAILURES = Counter("volli_redis_failures", "Redis operations that failed.", ["operation"])
PRESENCE_EVENTS = Counter("volli_presence_events",
                          "presence messages sent to watchers, by state.", ["online"])
HELD_OFFERS = Counter("volli_held_offers", "Offers held for offline callees, by outcome "
                      "(held, delivered, expired).", ["outcome"])
PUSHES = Counter("volli_pushes", "Web Push wake-ups, by outcome (sent, gone: the "
                 "subscription was removed, failed, overflow: not sent).", ["outcome"])
WATCHED_USERS = Gauge("volli_watched_users", "User IDs watched by connections of this server.",
                      multiprocess_mode="livesum")
LOOP_FAILURES = Counter("volli_loop_failures",
                        "Background loops that raised and were restarted, by loop.", ["loop"])


class Metrics:
    """One call per event updates both the Prometheus metric and this worker's totals.

    The per-message and per-connection events (received, relayed and its latency,
    connections, registrations, users) are counted in plain numbers and written to
    Prometheus by ``flush`` (each second, and before every scrape and stats line): in
    multiprocess mode every increment is a locked mmap write, which cost a fifth of a
    saturated worker. Label children are looked up once and kept."""

    def __init__(self) -> None:
        self.totals: collections.Counter[str] = collections.Counter()
        self._children: dict[tuple[object, str], object] = {}
        self._received: collections.Counter[str] = collections.Counter()
        self._relayed: collections.Counter[str] = collections.Counter()
        self._latency_counts = [0] * (len(LATENCY_BOUNDS) + 1)  # the last is +Inf
        self._latency_sum = 0.0
        self._registrations: collections.Counter[str] = collections.Counter()
        self._gauges: dict[Gauge, int] = {CONNECTIONS: 0, USERS: 0, WATCHED_USERS: 0}  # pending deltas

    def _child(self, metric, label: str):
        key = (metric, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def received(self, kind: str) -> None:
        self._received[kind] += 1

    def relayed(self, kind: str, seconds: float) -> None:
        self._relayed[kind] += 1
        # The bucket Histogram.observe picks: the first bound >= seconds.
        self._latency_counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self._latency_sum += seconds

    def flush(self) -> None:
        """Write the counted per-message events to Prometheus."""
        for name, metric, pending in (("received", RECEIVED, self._received),
                                      ("relayed", RELAYED, self._relayed),
                                      ("registrations", REGISTRATIONS, self._registrations)):
            for kind, count in pending.items():
                self._child(metric, kind).inc(count)
                self.totals[name] += count
            pending.clear()
        for gauge, delta in self._gauges.items():
            if delta:
                gauge.inc(delta)
                self._gauges[gauge] = 0
        # Histogram.observe, one bucket at a time: _buckets and _sum are its own values
        # (prometheus-client is held to 0.26.x in pyproject.toml; tests/test_observability.py
        # checks the result).
        for i, count in enumerate(self._latency_counts):
            if count:
                RELAY_LATENCY._buckets[i].inc(count)
                self._latency_counts[i] = 0
        if self._latency_sum:
            RELAY_LATENCY._sum.inc(self._latency_sum)
            self._latency_sum = 0.0

    def error(self, code: str) -> None:
        self.totals["errors"] += 1
        self._child(ERRORS, code).inc()

    def refused(self, reason: str) -> None:
        self._child(REFUSED, reason).inc()

    def registered(self, signed: bool) -> None:
        self._registrations["true" if signed else "false"] += 1
        self._gauges[USERS] += 1

    def unregistered(self) -> None:
        self._gauges[USERS] -= 1

    def undelivered(self, count: int) -> None:
        self.totals["undelivered"] += count
        UNDELIVERED.inc(count)

    def connection(self, delta: int) -> None:
        self._gauges[CONNECTIONS] += delta

    def redis_failure(self, operation: str) -> None:
        self._child(REDIS_FAILURES, operation).inc()

    def presence_sent(self, online: bool, count: int) -> None:
        self.totals["presence-events"] += count
        self._child(PRESENCE_EVENTS, "true" if online else "false").inc(count)

    def held(self, outcome: str) -> None:
        self.totals[f"held-{outcome}"] += 1
        self._child(HELD_OFFERS, outcome).inc()

    def push(self, outcome: str) -> None:
        self.totals[f"push-{outcome}"] += 1
        self._child(PUSHES, outcome).inc()

    def watched_users(self, delta: int) -> None:
        self._gauges[WATCHED_USERS] += delta

    def loop_failure(self, loop: str) -> None:
        self._child(LOOP_FAILURES, loop).inc()

    def __getitem__(self, key: str) -> int:
        self.flush()
        return self.totals[key]


def exposition() -> tuple[bytes, str]:
    """The Prometheus text for this server: all live and past workers added up."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
