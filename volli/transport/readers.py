"""Greenlets that read connections with input waiting.

A connection holds no greenlet while idle: when its socket turns readable, one of these
reads it. They are kept and reused, since starting a greenlet costs about 13 µs, more
than reading and relaying a small frame. A reader that blocks (say, on a Redis round
trip) holds up only the connection it is reading: if no reader is idle, another starts.
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

import gevent
from gevent.hub import Waiter

log = logging.getLogger("volli.ws")

MAX_IDLE = 16  # readers kept waiting for work; more exit when idle


class Readable(Protocol):
    def read(self) -> None: ...


class Readers:
    def __init__(self) -> None:
        self._ready: collections.deque[Readable] = collections.deque()
        self._idle: list[Waiter] = []

    def submit(self, conn: Readable) -> None:
        """Have ``conn`` read soon (called from the event loop's watcher callbacks)."""
        self._ready.append(conn)
        if self._idle:
            self._idle.pop().switch(None)
        else:
            gevent.spawn(self._run)

    def _run(self) -> None:
        ready = self._ready
        while True:
            while ready:
                conn = ready.popleft()
                try:
                    conn.read()
                except Exception:  # read() handles its own errors; never lose a reader
                    log.exception("reading a connection failed")
            if len(self._idle) >= MAX_IDLE:
                return
            waiter = Waiter()
            self._idle.append(waiter)
            waiter.get()


readers = Readers()
