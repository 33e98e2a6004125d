"""attack6: VOLLI_HEALTH_PORT is appended to gunicorn.conf.py's ``bind``, but a ``--bind``
on the command line (``gunicorn -b 0.0.0.0:$PORT wsgi:app``, or GUNICORN_CMD_ARGS) replaces
that list: the probe port is then silently never opened, and the load balancer's probes
to it fail while the server looks fine. gunicorn.conf.py already refuses the same kind of
command-line override for ``-w`` (on_starting: check_workers); ``--bind`` needs the same:
open the probe port anyway, or refuse to start."""

from __future__ import annotations

import socket
import time
import urllib.request

from conftest import Server, free_port


def _probe_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_command_line_bind_does_not_silently_drop_the_probe_port(tmp_path):
    port, probe = free_port(), free_port()
    srv = Server(tmp_path, {"PORT": str(port), "VOLLI_HEALTH_PORT": str(probe)},
                 args=["--bind", f"127.0.0.1:{port}"])  # as `gunicorn -b :$PORT` does
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if srv.proc.poll() is not None:  # refusing to start is fine, if it says why
                assert srv.proc.returncode != 0
                assert "VOLLI_HEALTH_PORT" in srv.log(), srv.log()
                return
            if _probe_answers(port):  # the main port is up: the probe port must be too
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"server never came up:\n{srv.log()}")
        time.sleep(0.5)
        assert _probe_answers(probe), (
            f"VOLLI_HEALTH_PORT={probe} is not listening although gunicorn runs on {port}")
    finally:
        srv.stop()


def test_a_command_line_bind_on_the_probe_port_is_refused(tmp_path):
    """--bind on the probe port itself would serve /signaling where the probe filter
    answers 404 to everything but the probes: gunicorn must refuse to start, saying why."""
    port, probe = free_port(), free_port()
    srv = Server(tmp_path, {"PORT": str(port), "VOLLI_HEALTH_PORT": str(probe)},
                 args=["--bind", f"0.0.0.0:{probe}"])
    try:
        assert srv.proc.wait(timeout=30) != 0
        assert f"VOLLI_HEALTH_PORT={probe} is also a --bind address" in srv.log(), srv.log()
    finally:
        srv.stop()
