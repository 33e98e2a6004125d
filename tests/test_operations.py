"""Operations against a real gunicorn: health, stats log, shutdown, caps, start-up checks."""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import time
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import ROOT, Client, Server
from volli.runtime import FD_RESERVE


def test_health(server, clients, uid, backend_env):
    c = clients()
    c.register(uid("h"))
    status, body = server.http("/health")
    assert status == 200
    assert body["status"] == "ok" and body["version"] == "0.1.0"
    assert body["backend"] == ("redis" if backend_env else "memory")
    assert body["connections"] >= 1 and body["online"] >= 1
    assert isinstance(body["uptime"], (int, float)) and body["uptime"] > 0
    assert server.http("/ready") == (200, {"ready": True, "reason": "ok",
                                           "backend": body["backend"]})


def test_plain_http_get_on_signaling_is_refused(server):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/signaling", timeout=5)
    assert info.value.code == 400


def test_stats_line_is_logged_periodically(make_server, clients, backend_env):
    srv = make_server({"VOLLI_STATS_INTERVAL": "0.3"})
    a, b = clients(srv.url), clients(srv.url)
    a.register("a@volli.app")
    b.register("b@volli.app")
    a.send({"type": "offer", "to": "b@volli.app", "offer": {}})
    b.recv()
    bindings = "" if "VOLLI_REDIS_URL" in backend_env else "bindings=0 "  # memory only
    srv.wait_log(f"stats online=2 connections=2 {bindings}received=3 relayed=1 errors=0")


def test_sigterm_closes_every_client_with_1001_and_empties_the_registry(make_server):
    srv = make_server()
    conns = [Client(srv.url) for _ in range(40)]
    for i, c in enumerate(conns):
        c.register(f"user{i}@volli.app")
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    for c in conns:
        with pytest.raises(ConnectionClosed) as info:
            c.recv(timeout=10)  # graceful_timeout is 30 s: 10 s proves it did not wait it out
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert srv.wait_exit(20) == 0
    assert "drained: closed 40 connections with 1001; 0 still open, 0 users online" in srv.log()
    assert time.monotonic() - started < 20


def test_connection_cap_refuses_with_503_and_health_still_answers(make_server, clients):
    srv = make_server({"VOLLI_MAX_CONNECTIONS": "2"})
    first, second = clients(srv.url), clients(srv.url)
    with pytest.raises(InvalidStatus) as info:
        clients(srv.url)
    assert info.value.response.status_code == 503
    status, body = srv.http("/health")
    assert status == 200 and body["connections"] == 2
    second.close()
    deadline = time.monotonic() + 5
    while True:  # the freed slot is usable again
        try:
            clients(srv.url).register("late@volli.app")
            break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    first.register("first@volli.app")


def test_handler_fault_answers_internal_error_and_keeps_the_connection(make_server, clients):
    srv = make_server(app="fault_app:app", env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    c = clients(srv.url)
    c.register("victim@volli.app")
    reply = c.request({"type": "discover", "userId": "explode@fault", "requestId": "x"})
    assert reply == {"type": "error", "code": "internal-error",
                     "message": "internal server error", "requestId": "x"}
    assert c.request({"type": "ping"}) == {"type": "pong"}
    assert "injected fault in a handler" in srv.log()


def test_connection_fault_closes_with_1011_and_the_worker_keeps_serving(make_server, clients):
    srv = make_server(app="fault_app:app", env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    doomed, bystander = clients(srv.url), clients(srv.url)
    doomed.register("doomed@volli.app")
    bystander.register("bystander@volli.app")
    doomed.send("crash-connection")
    with pytest.raises(ConnectionClosed) as info:
        doomed.recv()
    assert info.value.rcvd.code == 1011
    assert bystander.call({"type": "discover", "userId": "doomed@volli.app"})["online"] is False
    assert bystander.request({"type": "ping"}) == {"type": "pong"}
    fresh = clients(srv.url)
    fresh.register("doomed@volli.app")
    assert "injected fault outside the hub" in srv.log()


@pytest.mark.parametrize("env,args", [({"WEB_CONCURRENCY": "2"}, []), ({}, ["--workers", "3"])])
def test_several_workers_without_a_shared_backend_refuse_to_start(tmp_path, env, args):
    srv = Server(tmp_path, env, args=args)
    code = srv.wait_exit(30)
    srv.stop()
    assert code != 0
    assert "in-memory backend keeps presence inside one process" in srv.log()


def test_invalid_settings_refuse_to_start_with_every_problem_named(tmp_path):
    srv = Server(tmp_path, {"VOLLI_PING_INTERVAL": "soon", "VOLLI_MAX_CONNECTIONS": "0"})
    code = srv.wait_exit(30)
    srv.stop()
    assert code != 0
    log = srv.log()
    assert "VOLLI_PING_INTERVAL='soon': expected a number" in log
    assert "VOLLI_MAX_CONNECTIONS=0: must be at least 1" in log


def test_procfile_web_command_starts_the_server(tmp_path):
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines()
                if line.startswith("web:"))
    command = shlex.split(line.removeprefix("web:"))
    assert command[0] == "gunicorn"
    bin_dir = os.path.dirname(sys.executable)
    srv = Server(tmp_path, {"HOST": "", "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                 command=command)  # PORT set, HOST unset: as on a Procfile platform
    try:
        srv.wait_ready()
        c = Client(srv.url)
        c.register("procfile@volli.app")
        c.close()
        assert re.search(r"Listening at: http://0\.0\.0\.0:%d" % srv.port, srv.log())
    finally:
        srv.stop()


def test_connection_cap_follows_the_open_file_limit(tmp_path, clients):
    """Past RLIMIT_NOFILE, accept() fails inside gevent and nobody gets a clean answer:
    the cap is lowered to fit the limit, and the excess gets 503."""
    limit = FD_RESERVE + 20
    command = ["prlimit", f"--nofile={limit}:{limit}", "--", sys.executable, "-m", "gunicorn",
               "--config", str(ROOT / "gunicorn.conf.py"), "wsgi:app"]
    srv = Server(tmp_path, {"VOLLI_MAX_CONNECTIONS": "10000"}, command=command).wait_ready()
    try:
        line = srv.wait_log("WebSockets beyond 20 get HTTP 503")
        assert f"open-file limit ({limit})" in line
        opened = [clients(srv.url) for _ in range(20)]
        with pytest.raises(InvalidStatus) as info:
            clients(srv.url)
        assert info.value.response.status_code == 503
        status, body = srv.http("/health")
        assert status == 200 and body["connections"] == 20
        opened[0].register("still@volli.app")
    finally:
        srv.stop()


def test_a_socket_that_cannot_be_detached_is_served_in_place(make_server, clients):
    """Should taking the socket over from gunicorn fail after the 101, the connection is
    read in its request greenlet, with everything else the same."""
    srv = make_server(app="fault_app:app", env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
                                                "FAULT_NO_DETACH": "1"})
    alice, bob = clients(srv.url), clients(srv.url)
    alice.register("alice@volli.app")
    bob.register("bob@volli.app")
    alice.send({"type": "offer", "to": "bob@volli.app", "offer": {"sdp": "x" * 60000}})
    assert bob.recv()["offer"] == {"sdp": "x" * 60000}
    bob.send({"type": "answer", "to": "alice@volli.app", "answer": {"n": 1}})
    assert alice.recv()["answer"] == {"n": 1}
    assert "could not detach a WebSocket" in srv.wait_log("serving it in place")
    bob.close()
    srv.wait_log("user=bob@volli.app code=1000")
    srv.signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as info:
        alice.recv(timeout=10)
    assert info.value.rcvd.code == 1001

