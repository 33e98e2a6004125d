"""gunicorn settings for fault tests: the project's gunicorn.conf.py, plus faults injected
into a worker's background loops before they start (tests/test_supervision.py).

- FAULT_STATS_RAISES=N: ``volli.tasks.stats_line`` (called by the stats loop) raises
  RuntimeError its first N calls (``forever``: every call);
- FAULT_KEEPALIVE_RAISES=N: ``Connection.keepalive`` (called by the keepalive loop for
  each connection) raises its first N calls.

Use: gunicorn --config tests/fault_gunicorn.conf.py wsgi:app
"""

import os
from pathlib import Path

_PROJECT_CONF = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
# Every setting and hook of the real file, defined in this module's namespace.
exec(compile(_PROJECT_CONF.read_text(), str(_PROJECT_CONF), "exec"))

_project_post_worker_init = post_worker_init  # noqa: F821 - defined by the exec above


def _raising(times: str, real, what: str):
    """``real`` that raises RuntimeError on its first ``times`` calls (or on every one)."""
    left = [-1 if times == "forever" else int(times)]

    def faulty(*args, **kwargs):
        if left[0] != 0:
            left[0] -= left[0] > 0
            raise RuntimeError(f"injected fault in {what}")
        return real(*args, **kwargs)

    return faulty


def post_worker_init(worker):  # noqa: F811 - wraps the project's hook
    import volli.tasks
    from volli.transport.connection import Connection

    stats = os.environ.get("FAULT_STATS_RAISES")
    if stats:
        assert callable(getattr(volli.tasks, "stats_line", None)), "no volli.tasks.stats_line"
        volli.tasks.stats_line = _raising(stats, volli.tasks.stats_line, "stats_line")
    keepalive = os.environ.get("FAULT_KEEPALIVE_RAISES")
    if keepalive:
        assert callable(getattr(Connection, "keepalive", None)), "no Connection.keepalive"
        Connection.keepalive = _raising(keepalive, Connection.keepalive, "keepalive")
    _project_post_worker_init(worker)
