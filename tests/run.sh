#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests start for real (Debian names).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
# nginx lives in /usr/sbin, which a non-root PATH may lack.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v turnserver >/dev/null || need+=(coturn)
command -v systemd-analyze >/dev/null || need+=(systemd)
# Real WebRTC in a browser (driven by Playwright; never `playwright install`).
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# The tested set of every package (constraints.txt); pyproject.toml declares ranges.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
# Two processes by default (pytest-xdist): most of the suite is servers waiting out TTLs
# and fault schedules, which overlaps on 2 cores. VOLLI_TEST_PROCESSES=0: no worker processes.
set -- -n "${VOLLI_TEST_PROCESSES:-2}" "$@"
# Run the suite in a network namespace of its own where only loopback exists, so every
# server, load and WebRTC peer it starts can only reach 127.0.0.1/::1 (this machine's
# other interfaces are not targets). Needs root, as in CI; otherwise it says so and runs as is.
if [ "$(id -u)" -eq 0 ] && unshare --net true 2>/dev/null; then
    exec unshare --net sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' sh "$@"
fi
echo "tests/run.sh: no network namespace available; running without one" >&2
exec .venv/bin/python -m pytest "$@"
