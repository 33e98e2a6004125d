"""gunicorn settings for Volli. Read by ``gunicorn wsgi:app`` from this directory.

Only ``volli.config`` (standard library only) is imported here: this file runs in the
master, before the gevent worker monkey-patches, so the app itself must load in the
worker (preload_app stays off).
"""

import os
import shutil
import sys
import tempfile

from volli.config import ConfigError, check_workers, load
from volli.logs import gunicorn_logconfig

try:
    _settings = load(os.environ)
except ConfigError as exc:
    sys.exit(str(exc))

bind = [f"{_settings.host}:{_settings.port}"]
# Probes get a listen queue of their own (volli/probes.py); on_starting adds it to a
# --bind given on the command line too.
_probe_bind = f"{_settings.host}:{_settings.health_port}" if _settings.health_port else None
if _probe_bind:
    bind.append(_probe_bind)
# A reconnect storm waits in the kernel's listen queue (it costs no CPU there): a short
# one overflows, and dropped handshakes wait out TCP retransmissions or fail. Linux caps
# this at net.core.somaxconn (README, "Reconnect storms").
backlog = 65535
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
logconfig_dict = gunicorn_logconfig(_settings.log_format)

# prometheus_client's multiprocess mode: every worker writes its metrics to files here and
# /metrics adds them up. Set before any worker imports prometheus_client; a directory of
# our own making is emptied at start and removed at exit.
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="volli-metrics-")


ACCEPTS_PER_WAKEUP = 16


def on_starting(server):
    # `-w N` on the command line bypasses WEB_CONCURRENCY: check what will really run.
    problem = check_workers(_settings, server.cfg.workers)
    if problem:
        sys.exit(f"invalid Volli configuration: {problem}")
    # `-b`/`--bind` replaces the list above: the probe port must still open, and must not
    # be one of the ports that serve /signaling (the probe filter would 404 everything).
    if _probe_bind and _probe_bind not in server.cfg.bind:
        clash = [b for b in server.cfg.bind
                 if b.rpartition(":")[2] == str(_settings.health_port)]
        if clash:
            sys.exit(f"invalid Volli configuration: VOLLI_HEALTH_PORT={_settings.health_port} "
                     f"is also a --bind address ({', '.join(clash)})")
        server.cfg.set("bind", [*server.cfg.bind, _probe_bind])
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(metrics_dir, exist_ok=True)
    for name in os.listdir(metrics_dir):  # values of an earlier run would be added in
        os.remove(os.path.join(metrics_dir, name))


def child_exit(server, worker):
    # A dead worker's connections and users must leave the live gauges.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def post_fork(server, worker):
    # Process setup, before the app loads: each WebSocket is one open file.
    from volli.runtime import raise_open_file_limit

    raise_open_file_limit()


def post_worker_init(worker):
    # gevent's documented knob: connections accepted per wake-up of the listener (gunicorn
    # sets 1 with several workers). Its default, 100, moved a whole storm into gevent's
    # run queue, where /health and established users waited behind thousands of
    # handshakes; 16 leaves the rest in the listen queue (bench/storm.py).
    import gevent.baseserver

    gevent.baseserver.BaseServer.max_accept = ACCEPTS_PER_WAKEUP
    from volli.tasks import start_worker_tasks

    start_worker_tasks(worker.wsgi, lambda: worker.alive)


def worker_exit(server, worker):
    # WebSockets are not request greenlets, so gunicorn does not wait for them: do it here.
    from volli.tasks import drain

    runtime = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("volli")
    if runtime is not None:
        drain(runtime)
