"""gunicorn settings for Volli. Read by ``gunicorn wsgi:app`` from this directory.

Only ``volli.config`` (standard library only) is imported here: this file runs in the
master, before the gevent worker monkey-patches, so the app itself must load in the
worker (preload_app stays off).
"""

import os
import sys

from volli.config import ConfigError, check_workers, load

try:
    _settings = load(os.environ)
except ConfigError as exc:
    sys.exit(str(exc))

bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
worker_class = "gevent"
# Every open WebSocket holds a slot for its whole life; the app refuses upgrades (503)
# at max_connections, and the headroom keeps /health and refusals answering.
worker_connections = _settings.max_connections + 100
preload_app = False
graceful_timeout = 30
timeout = 30
# Two gunicorns on one machine would otherwise share ~/.gunicorn/gunicorn.ctl.
control_socket_disable = True
# Serve https/wss directly when a certificate is configured (else terminate TLS at a proxy).
if _settings.tls_certfile:
    certfile, keyfile = _settings.tls_certfile, _settings.tls_keyfile
accesslog = "-"
errorlog = "-"


def on_starting(server):
    # `-w N` on the command line bypasses WEB_CONCURRENCY: check what will really run.
    problem = check_workers(_settings, server.cfg.workers)
    if problem:
        sys.exit(f"invalid Volli configuration: {problem}")


def post_worker_init(worker):
    from volli.tasks import start_worker_tasks

    start_worker_tasks(worker.wsgi, lambda: worker.alive)
