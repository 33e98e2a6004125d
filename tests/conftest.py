"""Fixtures that run the real thing: gunicorn with the gevent worker on a free loopback
port, and real WebSocket clients (python-websockets, or raw wsproto for misbehaving ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
RECV_TIMEOUT = 5.0
# Every loopback client shares one IP and many tests send fast: servers under test get
# limits out of the way unless a test sets its own (tests/test_limits.py does).
PERMISSIVE_LIMITS = {"VOLLI_IP_MAX_CONNECTIONS": "0", "VOLLI_IP_CONNECT_RATE": "0",
                     "VOLLI_RATE_MESSAGES": "100000", "VOLLI_RATE_BURST": "100000",
                     "VOLLI_FANOUT_PER_MINUTE": "100000", "VOLLI_DISCOVER_PER_MINUTE": "100000",
                     "VOLLI_RATE_FRAMES": "1000000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A gunicorn process group serving Volli; its output goes to a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None,
                 app: str = "wsgi:app", args: list[str] | None = None,
                 command: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "PYTHONPATH": str(ROOT), **PERMISSIVE_LIMITS}
        full_env.pop("WEB_CONCURRENCY", None)
        full_env.update(env or {})
        cmd = command or [sys.executable, "-m", "gunicorn", "--config",
                          str(ROOT / "gunicorn.conf.py"), *(args or []), app]
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/signaling"

    def http(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, deadline: float = 20.0) -> "Server":
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http("/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer /health in {deadline}s:\n{self.log()}")

    def wait_log(self, needle: str, deadline: float = 15.0) -> str:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in the server log within {deadline}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, deadline: float = 30.0) -> int:
        return self.proc.wait(timeout=deadline)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log_file.close()


class Client:
    """A real WebSocket client speaking JSON, with a timeout on every receive."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        kwargs.setdefault("open_timeout", 5)
        kwargs.setdefault("close_timeout", 2)
        kwargs.setdefault("proxy", None)
        kwargs.setdefault("max_size", None)
        self._cm = connect(url, **kwargs)
        self.ws = self._cm.__enter__()
        self.hello = json.loads(self.ws.recv(timeout=RECV_TIMEOUT))
        assert self.hello["type"] == "hello", self.hello
        self.nonce = self.hello["nonce"]

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))

    def request(self, message: Any) -> dict[str, Any]:
        self.send(message)
        return self.recv()

    def call(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send with a fresh requestId and return the reply that carries it, skipping others."""
        request_id = f"call-{next(_counter)}"
        self.send({**message, "requestId": request_id})
        end = time.monotonic() + timeout
        while True:
            reply = self.recv(timeout=max(0.01, end - time.monotonic()))
            if reply.get("requestId") == request_id:
                return reply

    def register(self, user_id: str, public_key: str = "cHVibGljLWtleQ==") -> dict[str, Any]:
        reply = self.request({"type": "register", "userId": user_id, "publicKey": public_key})
        assert reply == {"type": "registered", "userId": user_id}, reply
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cm.__exit__(None, None, None)


class RedisServer:
    """A private redis-server on a free loopback port, with no persistence."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: run the suite with `bash tests/run.sh`, "
                        "which installs it")
        self.port = free_port()
        self.log_path = tmp_path / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--logfile", str(self.log_path),
             # DEBUG SLEEP pauses the server (fault tests): allowed from loopback only.
             "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart_empty(self) -> "RedisServer":
        """Stop and start again on the same port: with no persistence, every key is gone."""
        self.stop()
        return self.start()

    def pause(self, seconds: float) -> threading.Thread:
        """Block the server for ``seconds`` (DEBUG SLEEP) from a thread; join it to wait."""
        def sleep() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=seconds + 10) as c:
                c.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
                c.recv(16)
        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        time.sleep(0.05)  # the command has reached the server
        return thread


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture
def redis(tmp_path):
    """A fresh redis-server for one test (one that may stop and restart it)."""
    srv = RedisServer(tmp_path)
    yield srv
    srv.stop()


# The key prefix of the multi-server Redis tests (`nodes`).
NODES_PREFIX = "it:"


# Redis deployments a test can ask `nodes` for (indirect parametrization of `deployment`).
DEPLOYMENTS = ("single", "cluster", "sentinel")


@pytest.fixture
def deployment(request):
    """Where `nodes` share presence: the test's own redis-server (``single``, the default),
    or the session's Redis Cluster or Sentinel deployment, used under a prefix of the test's
    own (``@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)``)."""
    kind = getattr(request, "param", "single")
    if kind == "single":
        return request.getfixturevalue("redis")
    return request.getfixturevalue(f"redis_{kind}")


@pytest.fixture
def nodes(tmp_path, deployment):
    """Start gunicorn servers sharing ``deployment`` under one key prefix; each is returned
    once every worker's Redis listener is subscribed (nothing routed to it is lost)."""
    started: list[Server] = []
    # A shared deployment outlives the test: keys of earlier tests must not be seen.
    prefix = NODES_PREFIX if hasattr(deployment, "restart_empty") else f"it{free_port()}:"

    def start(workers: int = 2, **env: str) -> Server:
        srv = Server(tmp_path, {"VOLLI_REDIS_URL": deployment.url, "VOLLI_REDIS_PREFIX": prefix,
                                "WEB_CONCURRENCY": str(workers), **env})
        started.append(srv)
        srv.wait_ready()
        deadline = time.monotonic() + 15
        while srv.log().count("redis listener subscribed") < workers:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        return srv

    start.prefix = prefix
    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def store(redis):
    """A redis-py client of the test's ``redis``, to look at or corrupt what Volli stored."""
    import redis as redis_client  # the suite's client, only where a test asks for it

    client = redis_client.Redis.from_url(redis.url)
    yield client
    client.close()


@pytest.fixture
def open_client():
    """Open clients to given servers; all closed at the end of the test."""
    opened: list[Client] = []

    def open_one(srv: Server) -> Client:
        client = Client(srv.url)
        opened.append(client)
        return client

    yield open_one
    for client in opened:
        client.close()


@pytest.fixture(scope="session", params=["memory", "redis"])
def backend_env(request) -> dict[str, str]:
    """Behaviour tests run against both backends: settings that select one."""
    if request.param == "memory":
        return {}
    return {"VOLLI_REDIS_URL": request.getfixturevalue("redis_server").url}


@pytest.fixture(scope="session")
def server(tmp_path_factory, backend_env):
    """One shared server with default settings, per backend."""
    srv = Server(tmp_path_factory.mktemp("server"), backend_env).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path, backend_env):
    """Start a server with its own settings (on the current backend; with Redis, under its
    own key prefix unless given one); stopped at the end of the test."""
    servers: list[Server] = []

    def start(env: dict[str, str] | None = None, ready: bool = True, **kwargs: Any) -> Server:
        full_env = {**backend_env, "VOLLI_REDIS_PREFIX": f"t{free_port()}:", **(env or {})}
        srv = Server(tmp_path, full_env, **kwargs)
        servers.append(srv)
        return srv.wait_ready() if ready else srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def clients(server):
    """Open clients to ``server`` (or to a given url); all closed at the end of the test."""
    opened: list[Client] = []

    def open_client(url: str | None = None, **kwargs: Any) -> Client:
        client = Client(url or server.url, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


_counter = iter(range(1_000_000))


@pytest.fixture
def uid(request):
    """Unique user ids per test, so tests sharing a server never collide."""
    def make(name: str) -> str:
        return f"{name}-{next(_counter)}@{request.node.name[:40]}"
    return make


# Real Redis Cluster and Sentinel deployments (tests/redis_topologies.py): `redis_cluster`
# and `redis_sentinel` session-wide for tests that leave them as they are,
# `own_redis_cluster` and `own_redis_sentinel` one per test for those that fail them over.
def _redis_topology_fixtures(kind: str, name: str):
    def start(tmp_path: Path):
        import redis_topologies  # imports redis-py: only where a test asks for it

        with getattr(redis_topologies, kind)(tmp_path) as topology:
            yield topology

    @pytest.fixture(scope="session", name=name)
    def shared(tmp_path_factory):
        yield from start(tmp_path_factory.mktemp(name))

    @pytest.fixture(name=f"own_{name}")
    def own(tmp_path):
        yield from start(tmp_path)

    return shared, own


redis_cluster, own_redis_cluster = _redis_topology_fixtures("LocalCluster", "redis_cluster")
redis_sentinel, own_redis_sentinel = _redis_topology_fixtures("LocalSentinel", "redis_sentinel")
