"""Background loops that must not die silently (dead-peer detection, the Redis heartbeat
and listener, stats): each runs under a supervisor that logs an exception, restarts the
loop after a backoff, and reports its state for /health."""

from __future__ import annotations

import logging
import time
from typing import Callable

import gevent

log = logging.getLogger("volli.supervise")

RESTART_FIRST, RESTART_CAP = 0.5, 30.0  # seconds before a failed loop runs again
STEADY = 60.0  # a loop that ran this long before failing restarts after RESTART_FIRST

RUNNING, RESTARTING, FINISHED = "running", "restarting", "finished"


class Loops:
    """Named supervised greenlets of one worker."""

    def __init__(self, on_failure: Callable[[str], None] = lambda name: None) -> None:
        self.states: dict[str, str] = {}
        self._on_failure = on_failure

    def start(self, name: str, target: Callable[..., None], *args) -> gevent.Greenlet:
        self.states[name] = RUNNING
        return gevent.spawn(self._supervise, name, target, args)

    def failing(self) -> list[str]:
        """Loops that raised and are waiting to run again."""
        return [name for name, state in self.states.items() if state == RESTARTING]

    def _supervise(self, name: str, target: Callable[..., None], args: tuple) -> None:
        delay = RESTART_FIRST
        while True:
            self.states[name] = RUNNING
            started = time.monotonic()
            try:
                target(*args)
            except Exception:
                if time.monotonic() - started >= STEADY:
                    delay = RESTART_FIRST
                log.exception("background loop %s failed; restarting it in %.1fs",
                              name, delay)
                self._on_failure(name)
            else:  # loops return only when told to stop
                self.states[name] = FINISHED
                return
            self.states[name] = RESTARTING
            gevent.sleep(delay)
            delay = min(delay * 2, RESTART_CAP)
