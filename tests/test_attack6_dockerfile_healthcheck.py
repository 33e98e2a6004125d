"""attack6: the image's HEALTHCHECK still asks /health on PORT when VOLLI_HEALTH_PORT is
set. The probe port exists because in a reconnect storm a probe queued behind thousands
of handshakes on the main port times out (volli/probes.py); Docker then marks the
container unhealthy (and Swarm and other orchestrators replace it), which is the outcome
the probe port was added to avoid. Here the main port is a listener whose queue is never
served (what a probe sees behind a storm) and the real server's probe port is healthy:
the HEALTHCHECK command must pass."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

from conftest import ROOT, Server, free_port


def _healthcheck_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
    assert match, "no HEALTHCHECK CMD in the Dockerfile"
    return json.loads(match.group(1))


def test_the_image_healthcheck_uses_the_probe_port(tmp_path):
    probe = free_port()
    srv = Server(tmp_path, {"VOLLI_HEALTH_PORT": str(probe)}).wait_ready()
    stuck = socket.socket()  # the main port, behind a storm: accepted by the kernel only
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(16)
    try:
        cmd = _healthcheck_command()
        assert cmd[0] == "python"
        env = {**os.environ, "PORT": str(stuck.getsockname()[1]),
               "VOLLI_HEALTH_PORT": str(probe)}
        done = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True,
                              timeout=20)
        assert done.returncode == 0, done.stderr.decode()[-500:]
    finally:
        stuck.close()
        srv.stop()
