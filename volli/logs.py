"""Logging for the ``volli`` logger: one line per record on stderr, with the worker pid."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def configure(level: str) -> None:
    logger = logging.getLogger("volli")
    logger.setLevel(level)
    if not any(getattr(h, "_volli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._volli = True
        logger.addHandler(handler)
        logger.propagate = False
