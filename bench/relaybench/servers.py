"""The servers a run measures, each on a free 127.0.0.1 port with its output in a log file:
Volli and the baseline under gunicorn, peerjs-server under node, and a private
redis-server; how to start, watch and stop them, and what their logs say."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Union

from .procfs import proc_children, proc_cpu_seconds, proc_rss_kb
from .protocol import PEERJS_KEY, PEERJS_PATH, Target

ROOT = Path(__file__).resolve().parent.parent.parent
REGISTERED_LINE = re.compile(rb"\[(\d+)\] \[INFO\] volli\.hub: registered user=(\S+) id=")
# peerjs-server: installed with npm at bench time into an ignored folder, never committed.
PEERJS_VERSION = "1.0.2"  # npm package "peer"
PEERJS_DIR = ROOT / "bench" / ".peerjs"
PEERJS_PKG = PEERJS_DIR / "node_modules" / "peer"
PEERJS_CLI = PEERJS_PKG / "dist" / "bin" / "peerjs.js"

# Servers the bench can run; "redis" is the kind of Redis a server needs (start_redis).
# "volli" is the reference of the Redis section's ratios.
SCENARIOS: dict[str, dict[str, Any]] = {
    "volli": {"app": "volli", "workers": 1, "redis": None, "cross": False,
              "label": "Volli, 1 worker, memory backend"},
    "baseline": {"app": "baseline", "workers": 1, "redis": None, "cross": False,
                 "label": "bare flask-sock relay, 1 worker"},
    "peerjs": {"app": "peerjs", "workers": 1, "redis": None, "cross": False,
               "label": f"peerjs-server (npm peer@{PEERJS_VERSION}), Node.js, one process"},
    "redis-1w": {"app": "volli", "workers": 1, "redis": "single", "cross": False,
                 "label": "Volli, 1 worker, Redis backend (all users local)"},
    "redis-2w": {"app": "volli", "workers": 2, "redis": "single", "cross": True,
                 "label": "Volli, 2 workers, Redis backend, every pair cross-worker"},
    "cluster-2w": {"app": "volli", "workers": 2, "redis": "cluster", "cross": True,
                   "label": "Volli, 2 workers, Redis Cluster backend (3 primaries), every "
                            "pair cross-worker"},
}
# The kinds of Redis start_redis knows, in the order a run starts them.
REDIS_KINDS = ("single", "cluster")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What every server of a run shares, decided once by the script that starts them."""

    # Where Volli's code comes from: the working tree, or a tree exported from a git ref
    # (--volli-ref), so a run measures one commit while volli/ is being edited.
    tree: Path = ROOT
    # WebSocket slots each server gets (Volli's VOLLI_MAX_CONNECTIONS + 100, the baseline's
    # --worker-connections, peerjs's --concurrent_limit).
    slots: int = 20000
    # RLIMIT_NOFILE the servers inherit; Volli keeps 256 descriptors in reserve and warns
    # when VOLLI_MAX_CONNECTIONS does not fit, so the bench stays under it.
    nofile: int = 1 << 20
    deflate: bool = False  # Volli accepts permessage-deflate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port: int, *words: bytes, timeout: float = 2.0) -> bytes:
    """One command to the redis-server on 127.0.0.1:``port``, in RESP; returns the raw reply
    (a simple string or a bulk string)."""
    req = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(req)
        buf = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if buf[:1] != b"$":
                if buf.endswith(b"\r\n"):
                    return buf
                continue
            head, _, body = buf.partition(b"\r\n")
            if _ and len(body) >= int(head[1:]) + 2:
                return body[:int(head[1:])]
    raise OSError("incomplete reply from redis-server")


def command_calls(port: int) -> dict[str, int]:
    """{command: calls} from INFO commandstats of one redis-server (commands run inside
    scripts included)."""
    text = redis_command(port, b"INFO", b"commandstats").decode(errors="replace")
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"cmdstat_([\w|]+):calls=(\d+)", text)}


class RedisServer:
    """A private redis-server on a free 127.0.0.1 port: no persistence, output to a log file."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"redis-{self.port}.log"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(log_dir)]
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def command_line(self) -> str:
        return " ".join(c if c else '""' for c in self.cmd)

    def start(self, deadline: float = 10.0) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                if self.command(b"PING").startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not answering PING within {deadline}s")

    def command(self, *words: bytes, timeout: float = 2.0) -> bytes:
        return redis_command(self.port, *words, timeout=timeout)

    def command_calls(self) -> dict[str, int]:
        return command_calls(self.port)

    @property
    def pids(self) -> list[int]:
        """Every redis-server process of this Redis (a run leaves them out of "other")."""
        return [self.pid]

    def cpu_each(self) -> list[float]:
        return [proc_cpu_seconds(self.pid)]

    def cpu(self) -> float:
        return sum(self.cpu_each())  # each process line sums all its threads

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisClusterServer:
    """A Redis Cluster of 3 primaries and no replicas on free 127.0.0.1 ports: the tests'
    LocalCluster (tests/redis_topologies.py), with RedisServer's accounting summed over its
    nodes (CPU, INFO commandstats) and every node's pid. Starts when built; no persistence,
    node logs and configs in ``<log_dir>/redis-cluster``."""

    def __init__(self, log_dir: Path) -> None:
        # The tests' helper, not a copy (bench/drain.py reuses tests/conftest.py likewise);
        # appended, so no test module can shadow a bench one.
        if str(ROOT / "tests") not in sys.path:
            sys.path.append(str(ROOT / "tests"))
        from redis_topologies import LocalCluster

        self.dir = log_dir / "redis-cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = LocalCluster(self.dir, primaries=3, replicas=0)

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def pids(self) -> list[int]:
        return [self.cluster.processes.procs[p].pid for p in self.cluster.ports]

    def command_line(self) -> str:
        return (f"Redis Cluster, 3 primaries, no replicas (tests/redis_topologies.py "
                f"LocalCluster), nodes {','.join(map(str, self.cluster.ports))}, logs in "
                f"{self.dir}")

    def command_calls(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for port in self.cluster.ports:
            for name, calls in command_calls(port).items():
                total[name] = total.get(name, 0) + calls
        return total

    def cpu_each(self) -> list[float]:
        return [proc_cpu_seconds(pid) for pid in self.pids]

    def cpu(self) -> float:
        return sum(self.cpu_each())

    def stop(self) -> None:
        self.cluster.stop()


# What a Redis server of a run (Server.redis) is: one redis-server or a cluster.
AnyRedis = Union[RedisServer, RedisClusterServer]


def start_redis(kind: str, log_dir: Path) -> AnyRedis:
    """The one place a run starts the Redis its Redis servers share (SCENARIOS' "redis"
    names the kind): "single" is one private redis-server, "cluster" a 3-primary Redis
    Cluster. Raises RuntimeError when it does not start (and stops what it started)."""
    if kind == "cluster":
        print(f"[redis] starting a Redis Cluster (3 primaries, no replicas) in "
              f"{log_dir / 'redis-cluster'}", flush=True)
        try:
            cluster = RedisClusterServer(log_dir)  # stops its nodes itself if it fails
        except (OSError, subprocess.SubprocessError) as exc:  # TimeoutError: an OSError
            detail = getattr(exc, "stderr", None) or b""
            raise RuntimeError(f"Redis Cluster did not start: {exc} "
                               f"{detail.decode(errors='replace')[-1000:]}") from exc
        print(f"[redis] started: {cluster.command_line()}", flush=True)
        return cluster
    if kind != "single":
        raise ValueError(f"no such kind of Redis: {kind!r}")
    redis = RedisServer(log_dir)
    print(f"[redis] starting: {redis.command_line()}", flush=True)
    try:
        redis.start()
    except BaseException:
        redis.stop()
        raise
    return redis


class Server:
    """One gunicorn process group on 127.0.0.1, output to a log file."""

    def __init__(self, scenario: str, log_dir: Path, config: ServerConfig,
                 redis: AnyRedis | None = None, *, name: str | None = None,
                 workers: int | None = None, prefix: str | None = None) -> None:
        """``scenario``: a key of SCENARIOS; ``name`` (in messages and the log's name),
        ``workers`` and the Redis key ``prefix`` (the port is appended) override its own."""
        spec = SCENARIOS[scenario]
        self.scenario = scenario
        self.protocol = "volli"  # what the load generators speak to it (protocol.PROTOCOLS)
        self.name = name or scenario
        self.app = spec["app"]
        self.nworkers = workers or spec["workers"]
        self.redis = redis if spec["redis"] else None
        self.port = free_port()
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        tree = config.tree if self.app == "volli" else ROOT
        self.cwd = tree
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
               "PYTHONPATH": str(tree)}
        # The bench decides the worker count and the backend of each server.
        for var in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS", "VOLLI_REDIS_URL",
                    "VOLLI_REDIS_PREFIX"):
            env.pop(var, None)
        py = [sys.executable, "-m", "gunicorn"]
        if self.app == "volli":
            env.update({
                # gunicorn.conf.py adds 100 for worker_connections.
                "VOLLI_MAX_CONNECTIONS": str(min(config.slots - 100, config.nofile - 300)),
                "VOLLI_STATS_INTERVAL": "3600",
                "VOLLI_PERMESSAGE_DEFLATE": "1" if config.deflate else "0",
                # One loopback address and a deliberate flood: the abuse limits stay on the
                # hot path (they are still checked per message) but never trigger.
                "VOLLI_IP_MAX_CONNECTIONS": "0", "VOLLI_IP_CONNECT_RATE": "0",
                # Load clients send no Origin; a list keeps the all-origins warning quiet.
                "VOLLI_ALLOWED_ORIGINS": "http://bench.invalid",
                "VOLLI_RATE_MESSAGES": "1000000000", "VOLLI_RATE_BURST": "1000000000",
                "VOLLI_RATE_FRAMES": "1000000000",
                "VOLLI_FANOUT_PER_MINUTE": "1000000", "VOLLI_DISCOVER_PER_MINUTE": "1000000",
            })
            if self.nworkers != 1:
                env["WEB_CONCURRENCY"] = str(self.nworkers)
            if self.redis is not None:
                # A prefix of its own: nothing left by an earlier server can interfere.
                env["VOLLI_REDIS_URL"] = self.redis.url
                env["VOLLI_REDIS_PREFIX"] = f"{prefix or 'bench-' + scenario}-{self.port}:"
            self.cmd = py + ["--config", "gunicorn.conf.py", "wsgi:app"]
        else:
            # -c: without it gunicorn, started from the repo root, would read Volli's
            # ./gunicorn.conf.py (its post_worker_init hook needs the Volli app).
            self.cmd = py + ["-c", "bench/gunicorn_baseline.py", "-k", "gevent", "-w", "1",
                             "--worker-connections", str(config.slots),
                             "-b", f"127.0.0.1:{self.port}", "bench.baseline_app:app"]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.workers: list[int] = []
        self._log = None
        self._scan_offset = 0
        self._scan_rest = b""
        self.registered: dict[str, int] = {}  # userId -> worker pid, from the log

    @property
    def worker(self) -> int:
        return self.workers[0]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/signaling"

    @property
    def target(self) -> Target:
        # The baseline speaks Volli's protocol; "volli-sealed" sends sealed offers.
        return (self.protocol, self.url)

    def command_line(self) -> str:
        extra = [f"{k}={self.env[k]}" for k in ("WEB_CONCURRENCY", "VOLLI_REDIS_URL",
                                                 "VOLLI_REDIS_PREFIX") if k in self.env]
        return " ".join(extra + self.cmd)

    def start(self, deadline: float = 30.0) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        expect_backend = "redis" if self.redis is not None else "memory"
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited with {self.proc.returncode}"
                                   f":\n{self.log_tail()}")
            try:
                health = self.health()
                kids = proc_children(self.proc.pid)
                if health.get("status") == "ok" and len(kids) == self.nworkers:
                    if self.app == "volli" and health.get("backend") != expect_backend:
                        raise RuntimeError(f"{self.name}: backend {health.get('backend')!r}, "
                                           f"expected {expect_backend!r}")
                    # Each worker's Redis listener must be subscribed before anyone
                    # registers: a PUBLISH to a node nobody listens to drops the presence.
                    if self.redis is None or all(
                            f"[{k}] [INFO] volli.redis: redis listener subscribed" in self.log()
                            for k in kids):
                        self.workers = sorted(kids)
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not ready in {deadline}s:\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.loads(r.read())

    def check_worker(self) -> None:
        """The workers we measure must still be the ones that booted."""
        kids = sorted(proc_children(self.proc.pid)) if self.proc else []
        if kids != self.workers:
            raise RuntimeError(f"{self.name}: workers changed ({self.workers} -> {kids}); "
                               f"log:\n{self.log_tail()}")

    def cpu_each(self) -> list[float]:
        return [proc_cpu_seconds(w) for w in self.workers]

    def cpu(self) -> float:
        return sum(self.cpu_each())

    def rss_kb(self) -> int:
        return sum(proc_rss_kb(w) for w in self.workers)

    def wait_registered(self, user_ids: list[str], timeout: float) -> dict[str, int]:
        """{userId: worker pid} for each of ``user_ids``, read from the registration lines of
        the log (bounded wait: a worker writes its line before it answers the client)."""
        end = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(self._scan_offset)
                data = f.read()
            self._scan_offset += len(data)
            data = self._scan_rest + data
            cut = data.rfind(b"\n") + 1
            self._scan_rest = data[cut:]
            for m in REGISTERED_LINE.finditer(data, 0, cut):
                self.registered[m.group(2).decode()] = int(m.group(1))
            missing = [u for u in user_ids if u not in self.registered]
            if not missing:
                return {u: self.registered[u] for u in user_ids}
            if time.monotonic() >= end:
                raise RuntimeError(f"{self.name}: {len(missing)} registrations not in the log "
                                   f"after {timeout}s, e.g. {missing[:3]}")
            time.sleep(0.05)

    def log_tail(self, n: int = 12) -> str:
        """The last ``n`` log lines, without Volli's per-connection open/close lines."""
        lines = [line for line in self.log().splitlines()
                 if "volli.ws: connection open" not in line
                 and "volli.ws: connection closed" not in line
                 and "volli.hub: registered user=" not in line]
        return "\n".join(lines[-n:])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # Anything left in the group (a stuck worker) goes too.
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


def peerjs_installed_version() -> str | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((PEERJS_PKG / "package.json").read_text()).get("version")
    return None


def ensure_peerjs(timeout: float = 300.0) -> str:
    """Install npm "peer" at PEERJS_VERSION into bench/.peerjs (ignored by git) unless it is
    there already. Returns node's version; raises RuntimeError with the reason otherwise."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH")
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
    if peerjs_installed_version() == PEERJS_VERSION and PEERJS_CLI.exists():
        return node_version
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH")
    cmd = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(PEERJS_DIR),
           f"peer@{PEERJS_VERSION}"]
    print(f"[peerjs] installing: {' '.join(cmd)}", flush=True)
    PEERJS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"npm install did not finish within {timeout:.0f}s") from None
    if done.returncode != 0 or peerjs_installed_version() != PEERJS_VERSION:
        raise RuntimeError(f"npm install failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout)[-1500:]}")
    return node_version


class PeerjsServer(Server):
    """peerjs-server's own CLI (node <pkg>/dist/bin/peerjs.js) on 127.0.0.1: one Node.js
    process, which is both the "master" and the measured "worker" (its CPU line sums all its
    threads: V8's GC helpers and libuv's pool included)."""

    def __init__(self, scenario: str, log_dir: Path, config: ServerConfig,
                 redis: AnyRedis | None = None) -> None:
        self.scenario = self.name = scenario
        self.app = "peerjs"
        self.nworkers = 1
        self.redis = None
        self.port = free_port()
        self.log_path = log_dir / f"{scenario}-{self.port}.log"
        env = {**os.environ}
        for var in ("PORT", "PEERSERVER_PATH", "NODE_OPTIONS"):
            env.pop(var, None)
        # --concurrent_limit: the same slots as the others (its default is 5000).
        # --alive_timeout: the bench sends no HEARTBEAT, so a long one keeps the checker
        # (which still runs every 300 ms over all clients) from closing idle connections.
        # --allow_discovery: GET <path>/peerjs/peers lists ids, for the memory run's count.
        self.cmd = [shutil.which("node") or "node", str(PEERJS_CLI),
                    "--host", "127.0.0.1", "--port", str(self.port), "--path", PEERJS_PATH,
                    "--key", PEERJS_KEY, "--concurrent_limit", str(config.slots),
                    "--alive_timeout", "3600000", "--allow_discovery"]
        self.env = env
        self.proc = None
        self.workers = []
        self._log = None
        self._scan_offset = 0
        self._scan_rest = b""
        self.registered = {}

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{PEERJS_PATH}/peerjs"

    @property
    def target(self) -> Target:
        return ("peerjs", self.url)

    def command_line(self) -> str:
        return " ".join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                        for c in self.cmd)

    def start(self, deadline: float = 30.0) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: node exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if self.health().get("status") == "ok":
                    self.workers = [self.proc.pid]
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not ready in {deadline}s:\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        base = f"http://127.0.0.1:{self.port}{PEERJS_PATH}"
        with urllib.request.urlopen(f"{base}/", timeout=5) as r:
            if "PeerJS" not in json.loads(r.read()).get("name", ""):
                raise ValueError("not a PeerJS server")
        with urllib.request.urlopen(f"{base}/{PEERJS_KEY}/peers", timeout=10) as r:
            return {"status": "ok", "online": len(json.loads(r.read()))}

    def check_worker(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: node exited; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 12) -> str:
        lines = [line for line in self.log().splitlines()
                 if not line.startswith(("Client connected: ", "Client disconnected: "))]
        return "\n".join(lines[-n:])


def make_server(scenario: str, log_dir: Path, config: ServerConfig,
                redis: AnyRedis | None = None) -> Server:
    cls = PeerjsServer if SCENARIOS[scenario]["app"] == "peerjs" else Server
    return cls(scenario, log_dir, config, redis)


_LOG_PATTERNS = [
    ("traceback", re.compile(r"Traceback")),
    ("error/critical lines", re.compile(r"\[(ERROR|CRITICAL)\]")),
    ("worker timeout/exit", re.compile(r"WORKER TIMEOUT|Worker \(pid:\d+\) (was sent|exited)|"
                                       r"Worker exiting.*code|Booting worker", re.I)),
    ("slow-consumer / internal-error closes", re.compile(r"code=(4002|1011|1009)\b")),
    ("volli warnings (Redis, undelivered, ...)", re.compile(r"\[WARNING\] volli")),
    # peerjs's CLI prints uncaught exceptions as "Error: ..." and goes on.
    ("uncaught errors (peerjs log)", re.compile(r"^(Error: |Warning: )")),
]


def scan_log(text: str, workers: int = 1) -> dict[str, Any]:
    """Counts of worrying lines and a short excerpt of each kind."""
    found: dict[str, Any] = {}
    lines = text.splitlines()
    for label, pattern in _LOG_PATTERNS:
        hits = [i for i, line in enumerate(lines) if pattern.search(line)]
        if label == "worker timeout/exit":
            # One "Booting worker" line per worker is expected.
            boots = [i for i in hits if "Booting worker" in lines[i]]
            hits = [i for i in hits if i not in boots[:workers]]
        if hits:
            first = hits[0]
            found[label] = {"count": len(hits),
                            "excerpt": "\n".join(lines[max(0, first - 2):first + 12])}
    codes: dict[str, int] = {}
    for m in re.finditer(r"connection closed .*? code=(\S+)", text):
        codes[m.group(1)] = codes.get(m.group(1), 0) + 1
    if codes:
        found["close codes (volli log)"] = codes
    return found
