"""Logging for the ``volli`` logger: one line per record on stderr, with the worker pid.

With VOLLI_LOG_FORMAT=json every record is one JSON object (python-json-logger), and
gunicorn.conf.py gives gunicorn's own loggers the same formatter. Standard library only at
import time: gunicorn.conf.py imports this in the master.
"""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"
JSON_RENAME = {"asctime": "time", "process": "pid", "levelname": "level", "name": "logger"}


def formatter_config(log_format: str) -> dict:
    """A logging.config ``formatters`` entry for this format."""
    if log_format == "json":
        return {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS,
                "rename_fields": JSON_RENAME}
    return {"format": TEXT_FORMAT}


def gunicorn_logconfig(log_format: str) -> dict:
    """gunicorn's ``logconfig_dict``: its error and access logs in the same format."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"volli": formatter_config(log_format)},
        "handlers": {
            "error": {"class": "logging.StreamHandler", "formatter": "volli",
                      "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "volli",
                       "stream": "ext://sys.stdout"},
        },
        "root": {"level": "INFO", "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }


def configure(level: str, log_format: str = "text") -> None:
    # No format here shows a record's thread or source line: skip working them out (the
    # logging HOWTO's "Optimization"); under gevent each greenlet would also get a dummy
    # Thread object. Together about 4% of accepting a connection.
    logging.logThreads = False
    logging._srcfile = None
    logger = logging.getLogger("volli")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_volli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_build(formatter_config(log_format)))
    handler._volli = True
    logger.addHandler(handler)
    logger.propagate = False


def _build(config: dict) -> logging.Formatter:
    if "()" in config:
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(config["fmt"], rename_fields=config["rename_fields"])
    return logging.Formatter(config["format"])
