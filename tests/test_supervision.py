"""A worker's background loops are supervised (issue 12, finding 6): a loop that raises is
logged as "background loop <name> failed", restarted after a short backoff (at most 2 s
the first time), and while it is not running GET /health answers 503
{"status": "degraded", "loops": {"<name>": "restarting", ...}}; once every loop runs again
/health is 200 with each loop "running". Loops: stats, keepalive, metrics, drain-watch,
and with Redis redis-listener and redis-heartbeat.

Faults are injected by tests/fault_gunicorn.conf.py (the project's gunicorn.conf.py with
a wrapped post_worker_init), before the loops start.
"""

from __future__ import annotations

import json
import sys
import time

from conftest import ROOT, Server
from rawclient import RawClient

FAULT_CONF = str(ROOT / "tests" / "fault_gunicorn.conf.py")
LOOPS = {"stats", "keepalive", "metrics", "presence", "drain-watch"}
REDIS_LOOPS = {"redis-listener", "redis-heartbeat"}


def fault_server(tmp_path, env: dict[str, str]) -> Server:
    srv = Server(tmp_path, {"VOLLI_STATS_INTERVAL": "0.2", **env},
                 command=[sys.executable, "-m", "gunicorn", "--config", FAULT_CONF, "wsgi:app"])
    # /health may answer 503 (degraded) from the start: wait for the socket, not for 200.
    deadline = time.monotonic() + 20
    while True:
        assert srv.proc.poll() is None, srv.log()
        try:
            srv.http("/health")
            return srv
        except OSError:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)


def health_history(srv: Server, until, seconds: float) -> list[tuple[float, int, object]]:
    """Poll /health every 0.1 s until ``until(status, body)`` or ``seconds`` pass."""
    start, seen = time.monotonic(), []
    while time.monotonic() - start < seconds:
        status, body = srv.http("/health")
        seen.append((round(time.monotonic() - start, 2), status, body))
        if until(status, body):
            break
        time.sleep(0.1)
    return seen


def test_a_loop_that_keeps_failing_makes_health_degraded_naming_it(tmp_path):
    srv = fault_server(tmp_path, {"FAULT_STATS_RAISES": "forever"})
    try:
        seen = health_history(srv, lambda status, body: status == 503, 10)
        log = srv.log()
    finally:
        srv.stop()
    status, body = seen[-1][1:]
    shown = json.dumps(seen[-3:])
    assert status == 503, f"/health never answered 503 while the stats loop failed: {shown}"
    assert body["status"] == "degraded", shown
    assert body["loops"]["stats"] == "restarting", shown
    assert {name: body["loops"].get(name) for name in LOOPS - {"stats"}} == \
        dict.fromkeys(LOOPS - {"stats"}, "running"), shown
    assert "background loop stats failed" in log, log[-3000:]
    assert "injected fault in stats_line" in log, log[-3000:]


def test_loops_that_failed_restart_and_keepalive_still_closes_a_dead_peer(tmp_path, redis):
    srv = fault_server(tmp_path, {"FAULT_STATS_RAISES": "2", "FAULT_KEEPALIVE_RAISES": "1",
                                  "VOLLI_PING_INTERVAL": "1", "VOLLI_REDIS_URL": redis.url,
                                  "VOLLI_REDIS_PREFIX": "sup:"})
    try:
        # A peer that never answers a ping; the keepalive pass that meets it first raises.
        dead = RawClient(srv.port)
        dead.sock.settimeout(15)
        dead.send_json({"type": "register", "userId": "dead@peer", "publicKey": "ZGVhZA=="})
        assert json.loads(dead.next_message())["type"] == "registered"
        connected = time.monotonic()
        try:
            code = dead.wait_close(deadline=15)
        except TimeoutError:
            code = "still open"
        closed_after = time.monotonic() - connected
        dead.close()
        every_loop = LOOPS | REDIS_LOOPS
        seen = health_history(
            srv, lambda status, body: status == 200 and isinstance(body.get("loops"), dict)
            and all(body["loops"].get(name) == "running" for name in every_loop), 10)
        log = srv.log()
    finally:
        srv.stop()
    failures = {name: log.count(f"background loop {name} failed") for name in ("stats",
                                                                                "keepalive")}
    stats_after = log.rsplit("background loop stats failed", 1)[-1].count("stats online=")
    summary = (f"dead peer: close {code} after {closed_after:.1f}s; failures logged "
               f"{failures}; stats lines after the last failure {stats_after}; last /health "
               f"{json.dumps(seen[-1])}")
    assert code == 1008, "keepalive no longer closes a dead peer: " + summary
    assert failures["stats"] >= 2 and failures["keepalive"] >= 1, summary
    assert stats_after >= 1, "the stats loop did not run again: " + summary
    status, body = seen[-1][1:]
    assert status == 200 and body["status"] == "ok", summary
    assert {name: body["loops"].get(name) for name in LOOPS | REDIS_LOOPS} == \
        dict.fromkeys(LOOPS | REDIS_LOOPS, "running"), summary
