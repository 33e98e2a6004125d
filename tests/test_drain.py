"""Draining a worker (SIGTERM) that holds many registered connections, with Redis up,
stopped or paused (issue 12, finding 5). The contract: every client gets a close frame
with 1001 and the process exits well within gunicorn's graceful_timeout (30 s); with
Redis unreachable the presence is left to expire by its TTL instead of holding the drain.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import rawws  # noqa: E402  (the bench's lean client: thousands of connections, one epoll)

CONNECTIONS = 1500
EXIT_WITHIN = 15.0  # seconds from SIGTERM; gunicorn's graceful_timeout is 30


def open_pool(srv: Server, count: int, tag: str) -> rawws.DrainPool:
    pool = rawws.DrainPool(rawws.Target("volli", srv.url, "ZHJhaW4="), ["127.0.0.1"], 100, 30)
    result = pool.open([f"{tag}-{i}@drain" for i in range(count)], time.monotonic() + 60)
    assert result["opened"] == count, (result, pool.stats())
    return pool


def drain_and_measure(srv: Server, pool: rawws.DrainPool, count: int,
                      limit: float = 25.0) -> dict:
    """SIGTERM the server; service the clients until all ended or ``limit``; wait for the
    process to exit (bounded). Returns the durations and the close codes seen."""
    term = time.monotonic()
    srv.signal(signal.SIGTERM)
    exited = None
    while time.monotonic() - term < limit:
        pool._poll(0.05)
        if exited is None and srv.proc.poll() is not None:
            exited = time.monotonic() - term
        if not pool.conns and exited is not None:
            break
    codes: dict[int | None, int] = {}
    for _, code in pool.ended:
        codes[code] = codes.get(code, 0) + 1
    still_open = len(pool.conns)
    closes_1001 = sorted(t - term for t, code in pool.ended if code == 1001)
    if exited is None:
        try:
            srv.proc.wait(timeout=max(0.1, limit - (time.monotonic() - term)))
            exited = time.monotonic() - term
        except subprocess.TimeoutExpired:
            pass
    pool.close_all(time.monotonic() + 2)
    return {"codes": codes, "still_open": still_open,
            "all_1001_after": closes_1001[-1] if len(closes_1001) == count else None,
            "got_1001": len(closes_1001), "exited_after": exited,
            "exit_code": srv.proc.returncode}


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}s"


@pytest.mark.parametrize("fault", ["up", "stopped", "paused"])
def test_sigterm_closes_every_client_with_1001_and_exits_even_with_redis_down(
        tmp_path, redis, fault):
    srv = Server(tmp_path, {"VOLLI_REDIS_URL": redis.url, "VOLLI_REDIS_PREFIX": "drain:",
                            "VOLLI_PRESENCE_TTL": "3", "WEB_CONCURRENCY": "1"}).wait_ready()
    try:
        srv.wait_log("redis listener subscribed")
        pool = open_pool(srv, CONNECTIONS, fault)
        assert srv.http("/health")[1]["online"] == CONNECTIONS
        if fault == "stopped":
            redis.stop()
        elif fault == "paused":
            redis.pause(60)
        time.sleep(0.3)
        figures = drain_and_measure(srv, pool, CONNECTIONS)
    finally:
        if fault == "paused" and redis.proc is not None:
            redis.proc.kill()  # DEBUG SLEEP would hold a SIGTERM for its whole 60 s
            redis.proc.wait(timeout=10)
        srv.stop()
    summary = (f"Redis {fault}, {CONNECTIONS} registered connections, SIGTERM: "
               f"{figures['got_1001']} got 1001 (the last after {seconds(figures['all_1001_after'])}), "
               f"close codes {figures['codes']} (None: no close frame), {figures['still_open']} "
               f"still open at the end; the process exited after "
               f"{seconds(figures['exited_after'])} with {figures['exit_code']}")
    within = 5.0 if fault == "up" else EXIT_WITHIN
    assert figures["all_1001_after"] is not None and figures["all_1001_after"] <= within, summary
    assert figures["exited_after"] is not None and figures["exited_after"] <= within, summary
    assert figures["exit_code"] == 0, summary
    print(summary)
