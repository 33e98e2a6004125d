#!/usr/bin/env python
"""Relay load bench: Volli against peerjs-server and a bare flask-sock relay, same load and run.

Run from the repo root:  python bench/relay.py            (every figure, about 3 minutes)
                         python bench/relay.py --quick    (smoke run, about 35 seconds)

For each server (Volli via ./gunicorn.conf.py, the baseline bench/baseline_app.py under the
same gunicorn gevent worker, peerjs-server, npm "peer", with its own node CLI) it starts
the server on a free 127.0.0.1 port, then measures:

1. connections: opens K1 (5,000) registered connections as fast as the lean client
   processes (bench/rawws.py, epoll) can with bounded handshakes in flight, from several
   127.x source addresses: connections/s and server CPU per connection; RSS per idle
   connection at K1; then the same up to K2 (20,000, capped below RLIMIT_NOFILE);
2. throughput: N sender/receiver pairs, each sender keeps at most --window offers in flight
   (closed loop, so no receiver's server-side queue can overflow), lean client; messages
   counted at the receivers inside the measurement window, and the worker's CPU seconds in
   that window (msgs per server CPU-second);
3. latency: the same pairs at a fixed, paced total rate (5,000 msg/s; python-websockets
   client); one-way latency from a time.monotonic_ns() stamp in the payload to its arrival;
4. round trips: one pair, A sends an offer, B answers on receipt, A's send->answer time
   over --rtt-count sequential round trips (two blocking raw connections).

Unless --no-redis, the same run adds two Volli servers that share presence through a
private redis-server (started on a free 127.0.0.1 port, stopped at the end), measured like
the first (throughput and latency) and reported in the main table (figure 6) and against
the single-worker in-memory Volli:

- redis-1w: one worker with VOLLI_REDIS_URL set; every user is local, so no relay touches
  Redis (the cost of the backend when nothing crosses);
- redis-2w: WEB_CONCURRENCY=2, and every sender/receiver pair is CROSS-worker. gunicorn
  hands connections to workers as they come, so the clients register, the bench reads which
  worker logged each registration ("[<pid>] [INFO] volli.hub: registered user=..."), opens
  more connections if one worker holds too few (bounded), and pairs each sender with a
  receiver on the other worker, half in each direction. Server CPU is both workers plus
  redis-server, also shown apart.

Every window reports the load generator's CPU next to the server's. peerjs-server is
installed with npm at bench time into bench/.peerjs/ (git-ignored, never committed) unless
it is there at PEERJS_VERSION already; --no-peerjs leaves it out. A small per-server
protocol adapter (Protocol / PeerjsProtocol, and rawws.Target) holds how a client registers
and how offers look. Results go to bench/results/<UTC>-relay.json with machine, versions
and commit. Every loop is bounded in count and time; servers are stopped with SIGTERM, then
SIGKILL, on their process group. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import secrets
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import rawws  # noqa: E402

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a Volli dependency
    _loads = json.loads

ROOT = Path(__file__).resolve().parent.parent
# Where the Volli server's code comes from: the working tree, or a tree exported from a git
# ref by --volli-ref (so a run measures exactly one commit while volli/ is being edited).
VOLLI_TREE = ROOT
# WebSocket slots each server gets (Volli's VOLLI_MAX_CONNECTIONS + 100, the baseline's
# --worker-connections, peerjs's --concurrent_limit); main() raises it for large K.
SLOTS = 20000
# RLIMIT_NOFILE the servers inherit (main() sets it); Volli keeps 256 descriptors in reserve
# and warns when VOLLI_MAX_CONNECTIONS does not fit, so the bench stays under it.
NOFILE = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASE_SLACK = 30.0  # extra seconds the parent waits on a client process beyond a phase's plan
NOISY_CORES = 0.35  # CPU use by other processes in a window above which a run is flagged
CROSS_STEPS = 10  # rounds of "open more connections" when placing cross-worker pairs
CROSS_EXTRA = 5  # at most this many times 2 x pairs extra connections for that placement
REGISTERED_LINE = re.compile(rb"\[(\d+)\] \[INFO\] volli\.hub: registered user=(\S+) id=")
# peerjs-server: installed with npm at bench time into an ignored folder, never committed.
PEERJS_VERSION = "1.0.2"  # npm package "peer"
PEERJS_DIR = ROOT / "bench" / ".peerjs"
PEERJS_PKG = PEERJS_DIR / "node_modules" / "peer"
PEERJS_CLI = PEERJS_PKG / "dist" / "bin" / "peerjs.js"
PEERJS_PATH = "/bench"  # --path; the WebSocket endpoint is <path>/peerjs
PEERJS_KEY = "peerjs"  # the CLI's default --key

# Servers the bench can run. "volli" is the reference of the --redis section's ratios.
SCENARIOS: dict[str, dict[str, Any]] = {
    "volli": {"app": "volli", "workers": 1, "redis": False, "cross": False,
              "label": "Volli, 1 worker, memory backend"},
    "baseline": {"app": "baseline", "workers": 1, "redis": False, "cross": False,
                 "label": "bare flask-sock relay, 1 worker"},
    "peerjs": {"app": "peerjs", "workers": 1, "redis": False, "cross": False,
               "label": f"peerjs-server (npm peer@{PEERJS_VERSION}), Node.js, one process"},
    "redis-1w": {"app": "volli", "workers": 1, "redis": True, "cross": False,
                 "label": "Volli, 1 worker, Redis backend (all users local)"},
    "redis-2w": {"app": "volli", "workers": 2, "redis": True, "cross": True,
                 "label": "Volli, 2 workers, Redis backend, every pair cross-worker"},
}


# --------------------------------------------------------------------------------------------
# Payload


def make_sdp(size: int) -> str:
    """A plausible SDP body of about ``size`` characters (CRLF lines, like a browser's)."""
    head = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0",
            "a=group:BUNDLE 0 1", "a=extmap-allow-mixed", "a=msid-semantic: WMS stream"]
    media = ["m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126", "c=IN IP4 0.0.0.0",
             "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:Xk3b", "a=ice-pwd:9vEq0rTqR1mYbC2Hq0fYy1nE",
             "a=ice-options:trickle",
             "a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:"
             "DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
             "a=setup:actpass", "a=mid:0", "a=sendrecv", "a=rtcp-mux",
             "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc",
             "a=fmtp:111 minptime=10;useinbandfec=1"]
    lines = list(head)
    i = 0
    while len("\r\n".join(lines)) < size:
        lines.append(media[i % len(media)])
        i += 1
    return ("\r\n".join(lines) + "\r\n")[:size]


# --------------------------------------------------------------------------------------------
# Per-server protocol adapters (client side). The load logic (pairs, window, pacing, latency)
# is the same for every server; only how a client registers, how an offer frame looks and
# which fields a relayed offer carries differ.

# What the client processes are told to load: (protocol name, WebSocket URL).
Target = tuple[str, str]


class Protocol:
    """Volli's protocol (the baseline speaks the same): {"type":"register",...} answered by
    {"type":"registered"}; offers {"type":"offer","to":id,"offer":{...}} arrive with "from"."""

    offer_type = "offer"  # "type" of a relayed offer at the receiver
    from_key = "from"  # field naming the sender in a relayed offer
    body_key = "offer"  # field holding the payload (with the "t" stamp) in a relayed offer
    error_types = frozenset({"error"})  # replies that stand for offers that won't arrive

    def offer_parts(self, to: str, sdp: str) -> tuple[str, str]:
        """Prefix and suffix of an offer frame; the send timestamp goes between them."""
        prefix = ('{"type":"offer","to":' + json.dumps(to) +
                  ',"offer":{"type":"offer","sdp":' + json.dumps(sdp) + ',"t":')
        return prefix, "}}"

    def rejected(self, msg: dict[str, Any]) -> int:
        """How many offers an error reply on the sender's connection accounts for."""
        count = msg.get("undelivered")
        return count if isinstance(count, int) and count > 0 else 1

    async def open(self, url: str, user_id: str, opts: dict[str, Any]):
        ws = await _connect(url, opts)
        try:
            await ws.send(json.dumps({"type": "register", "userId": user_id,
                                      "publicKey": "AAAA"}))
            async with asyncio.timeout(10):
                reply = _loads(await ws.recv())
                if reply.get("type") == "hello":  # Volli greets first; the baseline does not
                    reply = _loads(await ws.recv())
            if reply.get("type") != "registered" or reply.get("userId") != user_id:
                raise RuntimeError(f"register {user_id!r}: unexpected reply {reply!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws


class PeerjsProtocol(Protocol):
    """peerjs-server (npm "peer"): the id, a token and the key go in the query string of
    <path>/peerjs, and the server answers {"type":"OPEN"}. Offers are
    {"type":"OFFER","dst":id,"payload":{...}}; the server relays {type, src, dst, payload}.
    A relay to a peer whose socket fails comes back as LEAVE; one to an unknown id is queued
    and, after expire_timeout, answered with EXPIRE (once per src/dst pair)."""

    offer_type = "OFFER"
    from_key = "src"
    body_key = "payload"
    error_types = frozenset({"ERROR", "LEAVE", "EXPIRE", "ID-TAKEN"})

    def offer_parts(self, to: str, sdp: str) -> tuple[str, str]:
        prefix = ('{"type":"OFFER","dst":' + json.dumps(to) +
                  ',"payload":{"type":"offer","sdp":' + json.dumps(sdp) + ',"t":')
        return prefix, "}}"

    def rejected(self, msg: dict[str, Any]) -> int:
        return 1

    async def open(self, url: str, user_id: str, opts: dict[str, Any]):
        query = urllib.parse.urlencode({"key": PEERJS_KEY, "id": user_id,
                                        "token": secrets.token_hex(8)})
        ws = await _connect(f"{url}?{query}", opts)
        try:
            async with asyncio.timeout(10):
                reply = _loads(await ws.recv())
            if reply.get("type") != "OPEN":
                raise RuntimeError(f"connect {user_id!r}: unexpected reply {reply!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws


PROTOCOLS: dict[str, Protocol] = {"volli": Protocol(), "peerjs": PeerjsProtocol()}


# --------------------------------------------------------------------------------------------
# /proc helpers


def proc_children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def other_cpu(exclude: set[int]) -> dict[int, tuple[str, int, int, int]]:
    """{pid: (name, ppid, own, reaped)} for every process except ``exclude``, in jiffies:
    own = utime + stime, reaped = cutime + cstime (its reaped children's, so a process that
    is born and reaped inside a window still counts, through its parent). Per-process times
    are exact; /proc/stat's idle is sampled at ticks and misses timer-synchronised work such
    as the paced latency run."""
    out: dict[int, tuple[str, int, int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            if pid in exclude:
                continue
            text = stat.read_text()
        except (OSError, ValueError):
            continue
        f = text[text.rindex(")") + 2:].split()
        out[pid] = (text[text.index("(") + 1:text.rindex(")")], int(f[1]),
                    int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    return out


def other_cpu_delta(a: dict[int, tuple[str, int, int, int]],
                    b: dict[int, tuple[str, int, int, int]],
                    wall: float) -> tuple[float, list[str]]:
    """(cores used by other processes between two other_cpu() readings, the top three as
    "name[pid] cores"). A process that ended in between counts through the reaped time of
    its nearest ancestor still alive, less what it (and its reaped children) had used before
    the first reading. Capped at the machine's cores."""
    used: dict[int, int] = {}
    for pid, (_, _, own, reaped) in b.items():
        before = a.get(pid)
        used[pid] = own + reaped - (before[2] + before[3] if before else 0)
    for pid, (_, ppid, own, reaped) in a.items():
        if pid in b:
            continue
        for _ in range(64):  # walk up, bounded, past ancestors that ended too
            if ppid in b or ppid not in a:
                break
            ppid = a[ppid][1]
        if ppid in used and ppid in a:
            used[ppid] -= own + reaped
    total = min(sum(max(0, j) for j in used.values()) / CLK_TCK / wall,
                float(os.cpu_count() or 1))
    top = sorted(((j, b[pid][0], pid) for pid, j in used.items() if j > 0), reverse=True)
    return total, [f"{name}[{pid}] {j / CLK_TCK / wall:.2f}" for j, name, pid in top[:3]]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])  # guest time is already inside user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Servers


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
        """One command, in RESP; returns the raw reply (a simple string or a bulk string)."""
        req = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w)
                                                   for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
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

    def command_calls(self) -> dict[str, int]:
        """{command: calls} from INFO commandstats (commands run inside scripts included)."""
        text = self.command(b"INFO", b"commandstats").decode(errors="replace")
        return {m.group(1): int(m.group(2))
                for m in re.finditer(r"cmdstat_([\w|]+):calls=(\d+)", text)}

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)  # the process line sums all its threads

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


class Server:
    """One gunicorn process group on 127.0.0.1, output to a log file."""

    def __init__(self, name: str, log_dir: Path, deflate: bool,
                 redis: RedisServer | None = None) -> None:
        spec = SCENARIOS[name]
        self.name = name
        self.app = spec["app"]
        self.nworkers = spec["workers"]
        self.redis = redis if spec["redis"] else None
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        tree = VOLLI_TREE if self.app == "volli" else ROOT
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
                "VOLLI_MAX_CONNECTIONS": str(min(SLOTS - 100, NOFILE - 300)),
                "VOLLI_STATS_INTERVAL": "3600",
                "VOLLI_PERMESSAGE_DEFLATE": "1" if deflate else "0",
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
                env["VOLLI_REDIS_PREFIX"] = f"bench-{name}-{self.port}:"
            self.cmd = py + ["--config", "gunicorn.conf.py", "wsgi:app"]
        else:
            # -c: without it gunicorn, started from the repo root, would read Volli's
            # ./gunicorn.conf.py (its post_worker_init hook needs the Volli app).
            self.cmd = py + ["-c", "bench/gunicorn_baseline.py", "-k", "gevent", "-w", "1",
                             "--worker-connections", str(SLOTS),
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
        return ("volli", self.url)  # the baseline speaks Volli's protocol

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

    def __init__(self, name: str, log_dir: Path, deflate: bool,
                 redis: RedisServer | None = None) -> None:
        self.name = name
        self.app = "peerjs"
        self.nworkers = 1
        self.redis = None
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        env = {**os.environ}
        for var in ("PORT", "PEERSERVER_PATH", "NODE_OPTIONS"):
            env.pop(var, None)
        # --concurrent_limit: the same SLOTS as the others (its default is 5000).
        # --alive_timeout: the bench sends no HEARTBEAT, so a long one keeps the checker
        # (which still runs every 300 ms over all clients) from closing idle connections.
        # --allow_discovery: GET <path>/peerjs/peers lists ids, for the memory run's count.
        self.cmd = [shutil.which("node") or "node", str(PEERJS_CLI),
                    "--host", "127.0.0.1", "--port", str(self.port), "--path", PEERJS_PATH,
                    "--key", PEERJS_KEY, "--concurrent_limit", str(SLOTS),
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


def make_server(name: str, log_dir: Path, deflate: bool,
                redis: RedisServer | None = None) -> Server:
    cls = PeerjsServer if SCENARIOS[name]["app"] == "peerjs" else Server
    return cls(name, log_dir, deflate, redis)


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


# --------------------------------------------------------------------------------------------
# Client processes (asyncio, python-websockets)


class Pair:
    __slots__ = ("sender", "receiver", "sender_id", "receiver_id", "prefix", "suffix", "sent",
                 "received", "in_window", "event", "errors", "unexpected", "bad_from",
                 "samples", "sender_done", "failure", "sender_errors", "rejected",
                 "error_sample", "proto")

    def __init__(self, sender, receiver, sender_id, receiver_id, sdp, proto: Protocol) -> None:
        self.sender, self.receiver = sender, receiver
        self.sender_id, self.receiver_id = sender_id, receiver_id
        self.proto = proto
        self.prefix, self.suffix = proto.offer_parts(receiver_id, sdp)
        self.sent = self.received = self.in_window = 0
        self.errors = self.unexpected = self.bad_from = 0
        # Error replies on the sender's connection, and how many offers they account for
        # (an "undelivered" notice names a count; any other error reply stands for one).
        self.sender_errors = self.rejected = 0
        self.error_sample: str | None = None
        self.event = asyncio.Event()
        self.samples: list[int] = []
        self.sender_done = False
        self.failure: str | None = None


async def _connect(url: str, opts: dict[str, Any]):
    from websockets.asyncio.client import connect

    return await connect(url, compression="deflate" if opts["deflate"] else None, proxy=None,
                         max_size=None, open_timeout=10, close_timeout=2, ping_interval=None)


async def _open_registered(target: Target, user_id: str, opts: dict[str, Any],
                           sem: asyncio.Semaphore):
    async with sem:
        return await PROTOCOLS[target[0]].open(target[1], user_id, opts)


async def _open_many(target: Target, ids: list[str], opts: dict[str, Any]) -> list:
    sem = asyncio.Semaphore(opts["connect_concurrency"])
    results = await asyncio.gather(*(_open_registered(target, u, opts, sem) for u in ids),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    socks = [r for r in results if not isinstance(r, BaseException)]
    if errors:
        await _close_all(socks)
        raise RuntimeError(f"{len(errors)} of {len(ids)} connections failed; first: "
                           f"{errors[0]!r}")
    return socks


async def _close_all(socks: list) -> None:
    async def close(ws):
        with contextlib.suppress(Exception):
            await ws.close()

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(20):
            await asyncio.gather(*(close(ws) for ws in socks))


def _wait_parent(conn, expect: str | tuple[str, ...], timeout: float):
    """Block (the loop is idle here) until the parent sends ``expect`` (or one of them)."""
    if not conn.poll(timeout):
        raise RuntimeError(f"parent sent no {expect!r} within {timeout}s")
    msg = conn.recv()
    if msg[0] not in ((expect,) if isinstance(expect, str) else expect):
        raise RuntimeError(f"expected {expect!r} from parent, got {msg[0]!r}")
    return msg


async def _make_pairs(target: Target, idx: int, n: int, tag: str,
                      opts: dict[str, Any]) -> list[Pair]:
    sids = [f"{tag}-p{idx}-s{i}" for i in range(n)]
    rids = [f"{tag}-p{idx}-r{i}" for i in range(n)]
    socks = await _open_many(target, sids + rids, opts)
    sdp = make_sdp(opts["sdp_size"])
    proto = PROTOCOLS[target[0]]
    return [Pair(socks[i], socks[n + i], sids[i], rids[i], sdp, proto) for i in range(n)]


async def _make_cross_pairs(conn, target: Target, idx: int, tag: str,
                            opts: dict[str, Any]) -> list[Pair]:
    """Register connections as the parent asks ("open", k), report their ids, and pair
    them as the parent decides ("pairs", [(sender, receiver), ...]) once it has read from
    the server log which worker holds each. Unpaired connections are closed."""
    socks: dict[str, Any] = {}
    try:
        for _ in range(CROSS_STEPS + 1):
            msg = _wait_parent(conn, ("open", "pairs"), 120)
            if msg[0] == "open":
                ids = [f"{tag}-p{idx}-c{len(socks) + i}" for i in range(msg[1])]
                socks.update(zip(ids, await _open_many(target, ids, opts)))
                conn.send(("opened", ids))
                continue
            chosen = msg[1]
            used = {u for pair in chosen for u in pair}
            await _close_all([ws for u, ws in socks.items() if u not in used])
            sdp = make_sdp(opts["sdp_size"])
            proto = PROTOCOLS[target[0]]
            return [Pair(socks[s], socks[r], s, r, sdp, proto) for s, r in chosen]
        raise RuntimeError(f"no pairs from the parent after {CROSS_STEPS} rounds")
    except BaseException:
        await _close_all(list(socks.values()))
        raise


async def _receiver(p: Pair, t_a: float, t_b: float, t_a_ns: int, t_b_ns: int,
                    record: bool, deadline: float, limit: int) -> None:
    ws = p.receiver
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    expected_from = p.sender_id
    offer_type, from_key, body_key = p.proto.offer_type, p.proto.from_key, p.proto.body_key
    error_types = p.proto.error_types
    async with asyncio.timeout_at(deadline):
        for _ in range(limit):  # no sender sends more than max_messages
            data = await ws.recv()
            now_ns = monotonic_ns()
            now = monotonic()
            msg = _loads(data)
            kind = msg.get("type")
            if kind == offer_type:
                if msg.get(from_key) != expected_from:
                    p.bad_from += 1
                p.received += 1
                p.event.set()
                if t_a <= now <= t_b:
                    p.in_window += 1
                if record:
                    t = msg[body_key]["t"]
                    if t_a_ns <= t <= t_b_ns:
                        p.samples.append(now_ns - t)
            elif kind in error_types:
                p.errors += 1
            else:
                p.unexpected += 1


async def _sender_reader(p: Pair, deadline: float, limit: int) -> None:
    """Error replies on the sender's own connection (peer-offline, unavailable, ...): each
    stands for offers that will not arrive, so the closed loop does not wait for them."""
    error_types = p.proto.error_types
    async with asyncio.timeout_at(deadline):
        for _ in range(limit):
            msg = _loads(await p.sender.recv())
            if msg.get("type") in error_types:
                p.sender_errors += 1
                p.rejected += p.proto.rejected(msg)
                if p.error_sample is None:
                    p.error_sample = f"to sender {p.sender_id}: {json.dumps(msg)[:300]}"
                p.event.set()
            else:
                p.unexpected += 1


async def _throughput_sender(p: Pair, t_b: float, window: int, max_count: int) -> None:
    ws, prefix, suffix = p.sender, p.prefix, p.suffix
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    try:
        while p.sent < max_count and monotonic() < t_b:
            if p.sent - p.received - p.rejected >= window:
                p.event.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await p.event.wait()
                continue
            await ws.send(prefix + str(monotonic_ns()) + suffix)
            p.sent += 1
    except Exception as exc:  # the connection died: record it, the others go on
        p.failure = f"sender {p.sender_id}: {exc!r}"
    finally:
        p.sender_done = True


async def _paced_sender(pairs: list[Pair], t_start: float, t_b: float, rate: float,
                        max_count: int, t_a: float, lags: list[float]) -> None:
    """Open loop: message i is due at t_start + i/rate, round-robin over the senders."""
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    n = len(pairs)
    i = 0
    try:
        while i < max_count:
            now = monotonic()
            if now >= t_b or all(p.failure for p in pairs):
                break
            due = t_start + i / rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            # Send everything due now (bounded by max_count and the end of the window).
            while i < max_count and t_start + i / rate <= now:
                p = pairs[i % n]
                i += 1
                if p.failure:
                    continue
                if t_a <= now:
                    lags.append(now - (t_start + (i - 1) / rate))
                try:
                    await p.sender.send(p.prefix + str(monotonic_ns()) + p.suffix)
                except Exception as exc:
                    p.failure = f"sender {p.sender_id}: {exc!r}"
                    continue
                p.sent += 1
    finally:
        for p in pairs:
            p.sender_done = True


async def _cpu_sampler(t_a: float, t_b: float, out: dict[str, float]) -> None:
    await asyncio.sleep(max(0.0, t_a - time.monotonic()))
    out["a"] = sum(os.times()[:2])
    await asyncio.sleep(max(0.0, t_b - time.monotonic()))
    out["b"] = sum(os.times()[:2])


async def _relay_phase(conn, target: Target, idx: int, kind: str, n: int, tag: str, cross: bool,
                       opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    if cross:
        pairs = await _make_cross_pairs(conn, target, idx, tag, opts)
    else:
        pairs = await _make_pairs(target, idx, n, tag, opts)
    tasks: list[asyncio.Task] = []
    failures: list[str] = []
    lags: list[float] = []
    cpu: dict[str, float] = {}
    try:
        conn.send(("ready", time.monotonic() - t0))
        _, t_start, t_a, t_b = _wait_parent(conn, "go", 60)
        # A full collection in the client stalls its loop for milliseconds, which would
        # show up as relay latency: collect now, then not until the phase is over.
        gc.collect()
        gc.disable()
        t_a_ns, t_b_ns = int(t_a * 1e9), int(t_b * 1e9)
        deadline = t_b + opts["drain_grace"]
        record = kind == "latency"
        limit = opts["max_messages"] + 1000
        receivers = [asyncio.create_task(_receiver(p, t_a, t_b, t_a_ns, t_b_ns, record,
                                                   deadline, limit)) for p in pairs]
        readers = [asyncio.create_task(_sender_reader(p, deadline, limit)) for p in pairs]
        sampler = asyncio.create_task(_cpu_sampler(t_a, t_b, cpu))
        tasks = receivers + readers + [sampler]
        await asyncio.sleep(max(0.0, t_start - time.monotonic()))
        if kind == "throughput":
            await asyncio.gather(*(_throughput_sender(p, t_b, opts["window"],
                                                      opts["max_messages"]) for p in pairs))
        else:
            await _paced_sender(pairs, t_start, t_b, opts["rate"] / opts["procs"],
                                opts["max_messages"], t_a, lags)
        # Drain: wait (bounded) until every live receiver has what its sender sent, and
        # the CPU sampler has taken its reading at t_b.
        while time.monotonic() < deadline and (not sampler.done() or any(
                p.received + p.rejected < p.sent and not receivers[i].done()
                for i, p in enumerate(pairs))):
            await asyncio.sleep(0.01)
        for p, task in zip(pairs, receivers):
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                why = ("nothing more before the deadline" if isinstance(exc, TimeoutError)
                       else repr(exc))
                failures.append(f"receiver {p.receiver_id}: {why}")
        for p, task in zip(pairs, readers):  # a reader times out only at the deadline
            if task.done() and not task.cancelled() and not isinstance(
                    task.exception(), (TimeoutError, type(None))):
                failures.append(f"sender {p.sender_id} (reading): {task.exception()!r}")
        failures += [p.failure for p in pairs if p.failure]
    finally:
        gc.enable()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # also retrieves exceptions
        await _close_all([s for p in pairs for s in (p.sender, p.receiver)])
    samples = [s for p in pairs for s in p.samples]
    lags.sort()
    return {
        **_pair_totals(pairs, failures, cpu),
        "samples": samples,
        "lag_p99": lags[int(0.99 * (len(lags) - 1))] if lags else 0.0,
        "lag_max": lags[-1] if lags else 0.0,
    }


async def _warmup_phase(target: Target, idx: int, tag: str,
                        opts: dict[str, Any]) -> dict[str, Any]:
    """A few relays through the server, so lazily loaded code is loaded before measuring."""
    pairs = await _make_pairs(target, idx, 2, tag, opts)
    try:
        for p in pairs:
            for _ in range(5):
                await p.sender.send(p.prefix + str(time.monotonic_ns()) + p.suffix)
        async with asyncio.timeout(10):
            for p in pairs:
                for _ in range(5):
                    msg = _loads(await p.receiver.recv())
                    if msg.get("type") != p.proto.offer_type:
                        raise RuntimeError(f"warm-up got {msg!r}")
    finally:
        await _close_all([s for p in pairs for s in (p.sender, p.receiver)])
    return {"ok": True}


def client_main(conn, idx: int, opts: dict[str, Any]) -> None:
    """A client process: runs the phases the parent asks for, one at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    for _ in range(10_000):  # commands; a run sends a handful per server and round
        if not conn.poll(900):
            return
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        try:
            name, target, tag = cmd[0], cmd[1], cmd[2]
            if name == "warmup":
                result = asyncio.run(_warmup_phase(target, idx, tag, opts))
            elif name == "rtt":
                result = _rtt_phase(target, tag, cmd[3], cmd[4], opts)
            else:
                result = asyncio.run(_relay_phase(conn, target, idx, name, cmd[3], tag, cmd[4],
                                                  opts))
            conn.send(("result", result))
        except BaseException as exc:  # report, then keep serving (the parent decides)
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))


def _rtt_phase(target: Target, tag: str, count: int, limit_s: float,
               opts: dict[str, Any]) -> dict[str, Any]:
    """One pair, sequential round trips on two blocking raw connections (bench/rawws.py,
    TCP_NODELAY): A sends an offer to B; B, on receipt, answers A; A's time from its send
    to the answer's arrival is one sample. The same thread plays both ends, so a sample
    includes B's parse-and-answer (a few microseconds of Python) but no scheduling between
    processes. 50 unrecorded round trips first; bounded by ``count`` and ``limit_s``."""
    proto, url = target
    tgt = rawws.Target(proto, url)
    a_id, b_id = f"{tag}-a", f"{tag}-b"
    a = rawws.BlockingWS(tgt, a_id)
    b = rawws.BlockingWS(tgt, b_id)
    sdp = make_sdp(opts["sdp_size"])
    if proto == "peerjs":
        offer_head = ('{"type":"OFFER","dst":' + json.dumps(b_id) +
                      ',"payload":{"type":"offer","sdp":' + json.dumps(sdp) + ',"i":')
        answer_head = ('{"type":"ANSWER","dst":' + json.dumps(a_id) +
                       ',"payload":{"type":"answer","sdp":' + json.dumps(sdp) + ',"i":')
        kinds, from_key, body = ("OFFER", "ANSWER"), "src", "payload"
    else:
        offer_head = ('{"type":"offer","to":' + json.dumps(b_id) +
                      ',"offer":{"type":"offer","sdp":' + json.dumps(sdp) + ',"i":')
        answer_head = ('{"type":"answer","to":' + json.dumps(a_id) +
                       ',"answer":{"type":"answer","sdp":' + json.dumps(sdp) + ',"i":')
        kinds, from_key, body = ("offer", "answer"), "from", None
    samples: list[int] = []
    bad = 0
    bad_sample = None
    perf = time.perf_counter_ns
    for s in (a.sock, b.sock):
        s.settimeout(5.0)
    end = time.monotonic() + limit_s
    gc.collect()
    gc.disable()
    cpu0 = sum(os.times()[:2])
    t0 = time.monotonic()
    try:
        for i in range(-50, count):
            if time.monotonic() > end:
                break
            t = perf()
            a.send_text((offer_head + str(i) + "}}").encode())
            got = _loads(b.recv_text())
            ok = got.get("type") == kinds[0] and got.get(from_key) == a_id and \
                got[body or "offer"]["i"] == i
            b.send_text((answer_head + str(i) + "}}").encode())
            back = _loads(a.recv_text())
            dt = perf() - t
            ok = ok and back.get("type") == kinds[1] and back.get(from_key) == b_id and \
                back[body or "answer"]["i"] == i
            if not ok:
                bad += 1
                bad_sample = bad_sample or f"{json.dumps(got)[:150]} / {json.dumps(back)[:150]}"
            if i >= 0:
                samples.append(dt)
        wall = time.monotonic() - t0
        cpu = sum(os.times()[:2]) - cpu0
    finally:
        gc.enable()
        a.close()
        b.close()
    samples.sort()
    return {"round_trips": len(samples), "asked": count, "bad": bad, "bad_sample": bad_sample,
            "wall_s": wall, "client_cpu": cpu,
            "p50_ms": percentile(samples, 0.50) / 1e6, "p99_ms": percentile(samples, 0.99) / 1e6,
            "max_ms": samples[-1] / 1e6 if samples else float("nan"),
            "mean_ms": sum(samples) / len(samples) / 1e6 if samples else float("nan")}


class LeanPair:
    __slots__ = ("sender", "receiver", "sender_id", "receiver_id", "sent", "received",
                 "in_window", "rejected", "errors", "sender_errors", "unexpected", "bad_from",
                 "failure", "error_sample")

    def __init__(self, sender, receiver, sender_id: str, receiver_id: str) -> None:
        self.sender, self.receiver = sender, receiver
        self.sender_id, self.receiver_id = sender_id, receiver_id
        self.sent = self.received = self.in_window = self.rejected = 0
        self.errors = self.sender_errors = self.unexpected = self.bad_from = 0
        self.failure: str | None = None
        self.error_sample: str | None = None


def _lean_open_pairs(conn, pool: rawws.Pool, idx: int, n: int, tag: str,
                     cross: bool) -> list[tuple[Any, Any, str, str]]:
    """Register the pairs' connections on the lean pool: n senders and n receivers, or, for
    cross-worker pairs, as the parent asks ("open"/"pairs", see _make_cross_pairs)."""
    deadline = time.monotonic() + 120

    def by_uid() -> dict[str, Any]:
        return {c.uid: c for c in pool.conns.values() if c.state == rawws.OPEN}

    def open_ids(ids: list[str]) -> None:
        r = pool.open(ids, deadline)
        if r["failed"]:
            raise RuntimeError(f"{r['failed']} of {len(ids)} connections failed: "
                               f"{pool.stats()['failures']}")

    if not cross:
        sids = [f"{tag}-p{idx}-s{i}" for i in range(n)]
        rids = [f"{tag}-p{idx}-r{i}" for i in range(n)]
        open_ids(sids + rids)
        conns = by_uid()
        return [(conns[a], conns[b], a, b) for a, b in zip(sids, rids)]
    held: list[str] = []
    for _ in range(CROSS_STEPS + 1):
        msg = _wait_parent(conn, ("open", "pairs"), 120)
        if msg[0] == "open":
            ids = [f"{tag}-p{idx}-c{len(held) + i}" for i in range(msg[1])]
            open_ids(ids)
            held += ids
            conn.send(("opened", ids))
            continue
        conns = by_uid()
        used = {u for pair in msg[1] for u in pair}
        frame = rawws.client_frame(rawws.CLOSE_1000, rawws.OP_CLOSE)
        for u, c in conns.items():  # unpaired: close frame now, the pool reaps them later
            if u not in used:
                c.state = rawws.CLOSING
                pool._send(c, frame)
        return [(conns[a], conns[b], a, b) for a, b in msg[1]]
    raise RuntimeError(f"no pairs from the parent after {CROSS_STEPS} rounds")


def _lean_throughput(conn, target: Target, idx: int, n: int, tag: str, cross: bool,
                     opts: dict[str, Any]) -> dict[str, Any]:
    """The throughput run on the lean client (bench/rawws.py): the same closed loop as
    _relay_phase (each pair keeps at most --window offers in flight; offers counted at the
    receivers inside the window) in one epoll loop, with about a third of
    python-websockets' CPU per message."""
    import random
    import select as sel

    t0 = time.monotonic()
    proto_name, url = target
    proto = PROTOCOLS[proto_name]
    pool = rawws.Pool(rawws.Target(proto_name, url), ["127.0.0.1"], opts["conn_concurrency"],
                      opts["handshake_timeout"])
    failures: list[str] = []
    cpu: dict[str, float] = {}
    pairs: list[LeanPair] = []
    try:
        pairs = [LeanPair(*x) for x in _lean_open_pairs(conn, pool, idx, n, tag, cross)]
        conn.send(("ready", time.monotonic() - t0))
        _, t_start, t_a, t_b = _wait_parent(conn, "go", 60)
        window, max_count = opts["window"], opts["max_messages"]
        sdp = make_sdp(opts["sdp_size"])
        parts = {p: tuple(x.encode() for x in proto.offer_parts(p.receiver_id, sdp))
                 for p in pairs}
        offer_type, from_key = proto.offer_type, proto.from_key
        error_types = proto.error_types
        ep = sel.epoll()
        fd_map: dict[int, tuple[LeanPair, int]] = {}
        for p in pairs:
            for role, c in ((0, p.sender), (1, p.receiver)):
                fd_map[c.fd] = (p, role)
                ep.register(c.fd, sel.EPOLLIN)
        monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
        getrandbits = random.getrandbits
        client_frame, send_or_queue = rawws.client_frame, rawws.send_or_queue
        IN, OUT = sel.EPOLLIN, sel.EPOLLOUT

        def send_offer(p: LeanPair) -> None:
            prefix, suffix = parts[p]
            payload = prefix + str(monotonic_ns()).encode() + suffix
            # getrandbits: a mask key without a syscall per offer (os.urandom's default)
            frame = client_frame(payload, key=getrandbits(32).to_bytes(4, "little"))
            p.sent += 1
            send_or_queue(ep, p.sender, frame)

        sleep_until(t_start)
        gc.collect()
        gc.disable()
        for p in pairs:
            for _ in range(min(window, max_count)):
                send_offer(p)
        deadline = t_b + opts["drain_grace"]
        sending = True
        for _ in range(100_000_000):
            now = monotonic()
            if "a" not in cpu and now >= t_a:
                cpu["a"] = sum(os.times()[:2])
            if now >= t_b:
                if "b" not in cpu:
                    cpu["b"] = sum(os.times()[:2])
                    sending = False
                if now >= deadline or all(p.received + p.rejected >= p.sent or p.failure
                                          for p in pairs):
                    break
            for fd, ev in ep.poll(0.01):
                p, role = fd_map[fd]
                if p.failure:
                    continue
                c = p.receiver if role else p.sender
                try:
                    if ev & OUT and c.out:
                        k = c.sock.send(c.out)
                        c.out = c.out[k:]
                        if not c.out:
                            ep.modify(c.fd, IN)
                    if not ev & (IN | sel.EPOLLHUP | sel.EPOLLERR):
                        continue
                    data = c.sock.recv(262144)
                    if not data:
                        raise ConnectionError("EOF")
                    now = monotonic()
                    for op, payload in c.reader.feed(data):
                        if op == rawws.OP_TEXT:
                            msg = _loads(payload)
                            kind = msg.get("type")
                            if role:
                                if kind == offer_type:
                                    p.received += 1
                                    if msg.get(from_key) != p.sender_id:
                                        p.bad_from += 1
                                    if t_a <= now <= t_b:
                                        p.in_window += 1
                                elif kind in error_types:
                                    p.errors += 1
                                else:
                                    p.unexpected += 1
                            elif kind in error_types:
                                p.sender_errors += 1
                                p.rejected += proto.rejected(msg)
                                if p.error_sample is None:
                                    p.error_sample = (f"to sender {p.sender_id}: "
                                                      f"{payload[:300].decode(errors='replace')}")
                            else:
                                p.unexpected += 1
                        elif op == rawws.OP_PING:
                            c.sock.sendall(rawws.client_frame(payload, rawws.OP_PONG))
                        elif op == rawws.OP_CLOSE:
                            raise ConnectionError(f"closed by the server: {payload[:2].hex()}")
                    if sending:
                        while p.sent - p.received - p.rejected < window and \
                                p.sent < max_count:
                            send_offer(p)
                except (OSError, ConnectionError, rawws.ProtocolError, ValueError) as exc:
                    p.failure = f"{'receiver' if role else 'sender'} {c.uid}: {exc!r}"
                    failures.append(p.failure)
        ep.close()
    finally:
        gc.enable()
        pool.close_all(time.monotonic() + 20)
    return {**_pair_totals(pairs, failures, cpu), "samples": [], "lag_p99": 0.0, "lag_max": 0.0}


def _pair_totals(pairs: list, failures: list[str], cpu: dict[str, float]) -> dict[str, Any]:
    """What a relay phase's pairs counted (both load generators), summed."""
    return {
        "sent": sum(p.sent for p in pairs),
        "received": sum(p.received for p in pairs),
        "in_window": sum(p.in_window for p in pairs),
        "errors": sum(p.errors for p in pairs),
        "sender_errors": sum(p.sender_errors for p in pairs),
        "rejected": sum(p.rejected for p in pairs),
        "error_samples": [p.error_sample for p in pairs if p.error_sample][:3],
        "unexpected": sum(p.unexpected for p in pairs),
        "bad_from": sum(p.bad_from for p in pairs),
        "connection_failures": failures[:5],
        "connection_failure_count": len(failures),
        "client_cpu": (cpu["b"] - cpu["a"]) if "b" in cpu and "a" in cpu else float("nan"),
    }


def raw_client_main(conn, idx: int, opts: dict[str, Any]) -> None:
    """A lean client process (bench/rawws.py, epoll): opens, holds and closes many registered
    connections for the connections phase, one step at a time as the parent asks:
    ("conns", target, [ids per step], sources) -> per step it waits for ("go",), opens that
    step's connections, reports ("ready", stats) and keeps answering pings until the next
    ("go",) or ("close",); then closes all and reports ("result", ...)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for _ in range(10_000):
        if not conn.poll(900):
            return
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        if cmd[0] == "throughput":  # (kind, target, tag, n, cross), as for client_main
            try:
                result = _lean_throughput(conn, cmd[1], idx, cmd[3], cmd[2], cmd[4], opts)
                conn.send(("result", result))
            except BaseException as exc:
                conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            continue
        pool = None
        try:
            _, (proto, url), steps, sources = cmd
            rawws.raise_nofile(sum(len(ids) for ids in steps) + 200)
            pool = rawws.Pool(rawws.Target(proto, url), sources, opts["conn_concurrency"],
                              opts["handshake_timeout"])
            step_results = []
            msg = _wait_parent(conn, ("go", "close"), 300)
            for ids in steps:
                if msg[0] == "close":
                    break
                cpu0 = sum(os.times()[:2])
                r = pool.open(ids, time.monotonic() + opts["open_timeout"],
                              max_failures=opts["max_failures"])
                r["client_cpu"] = sum(os.times()[:2]) - cpu0
                r.update(pool.stats())
                step_results.append(r)
                conn.send(("ready", r))
                end = time.monotonic() + 600
                while not conn.poll(0) and time.monotonic() < end:
                    pool.service(time.monotonic() + 0.05)
                msg = _wait_parent(conn, ("go", "close"), 1)
            if msg[0] != "close":
                _wait_parent(conn, "close", 600)
            held = pool.stats()
            closed = pool.close_all(time.monotonic() + 30)
            pool = None
            conn.send(("result", {"steps": step_results, "held": held, "closed": closed}))
        except BaseException as exc:
            if pool is not None:
                with contextlib.suppress(Exception):
                    pool.close_all(time.monotonic() + 5)
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------------------
# Orchestration (parent)


class Clients:
    def __init__(self, nprocs: int, opts: dict[str, Any], main=None,
                 name: str = "relay-client") -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(nprocs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=main or client_main, args=(child, i, opts), daemon=True,
                            name=f"{name}-{i}")
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def send_all(self, msg) -> None:
        for c in self.conns:
            c.send(msg)

    def gather(self, expect: str, timeout: float) -> list[Any]:
        end = time.monotonic() + timeout
        return [self.recv(i, expect, max(0.0, end - time.monotonic()), timeout)
                for i in range(len(self.conns))]

    def recv(self, i: int, expect: str, timeout: float, planned: float | None = None) -> Any:
        """The payload of client process i's next message, which must be ``expect``."""
        c = self.conns[i]
        if not c.poll(timeout):
            raise RuntimeError(f"client process {i} sent nothing within "
                               f"{planned if planned is not None else timeout:.0f}s")
        msg = c.recv()
        if msg[0] == "failed":
            raise RuntimeError(f"client process {i} failed: {msg[1]}")
        if msg[0] != expect:
            raise RuntimeError(f"client process {i}: expected {expect!r}, got {msg[0]!r}")
        return msg[1]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(("quit",))
        for p in self.procs:
            stop_process(p, grace=5)


def stop_process(p, grace: float) -> None:
    """Wait ``grace`` seconds for a client process to exit, then terminate, then kill."""
    p.join(timeout=grace)
    if p.is_alive():
        p.terminate()
        p.join(timeout=5)
    if p.is_alive():
        p.kill()
        p.join(timeout=5)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(round(q * (len(sorted_vals) - 1))))]


def place_cross_pairs(server: Server, clients: Clients, per_proc: list[int]) -> dict[str, Any]:
    """Have each client process register connections until it holds ``n`` on each of the
    two workers (read from the server log), then pair every sender with a receiver on the
    other worker, half of the pairs in each direction. Bounded: CROSS_STEPS rounds and
    CROSS_EXTRA x 2n extra connections per process."""
    w_a, w_b = server.workers
    nprocs = len(clients.conns)
    held: list[list[str]] = [[] for _ in range(nprocs)]
    want = [2 * n for n in per_proc]
    budget = [CROSS_EXTRA * 2 * n for n in per_proc]
    where: dict[str, int] = {}
    history: list[list[str]] = [[] for _ in range(nprocs)]  # per step: "+k -> a/b"
    for _ in range(CROSS_STEPS):
        asking = [i for i in range(nprocs) if want[i] > 0]
        if not asking:
            break
        for i in asking:
            clients.conns[i].send(("open", want[i]))
        new: list[str] = []
        for i in asking:
            ids = clients.recv(i, "opened", 120)
            held[i] += ids
            new += ids
        where.update(server.wait_registered(new, 15))
        for i, n in enumerate(per_proc):
            on_a = sum(1 for u in held[i] if where[u] == w_a)
            if want[i]:
                history[i].append(f"+{want[i]} -> {on_a}/{len(held[i]) - on_a}")
            minority = min(on_a, len(held[i]) - on_a)
            short = n - minority
            # The split is often uneven (and a small batch tends to land on one worker):
            # ask for what the split so far predicts, plus a quarter, at least 8.
            share = max(minority / len(held[i]), 0.05)
            guess = int(short / share * 1.25) + 1
            want[i] = min(max(guess, 8), budget[i]) if short > 0 else 0
            budget[i] -= want[i]
    strangers = {pid for pid in where.values() if pid not in (w_a, w_b)}
    chosen: list[list[tuple[str, str]]] = []
    for i, n in enumerate(per_proc):
        on_a = [u for u in held[i] if where[u] == w_a]
        on_b = [u for u in held[i] if where[u] == w_b]
        if strangers or min(len(on_a), len(on_b)) < n:
            # The caller restarts the client processes, which closes their connections.
            raise RuntimeError(
                f"could not place {n} cross-worker pairs in client process {i}: its "
                f"{len(held[i])} connections landed {len(on_a)} on worker {w_a} and "
                f"{len(on_b)} on worker {w_b}" +
                (f" (and on unknown pids {sorted(strangers)})" if strangers else "") +
                f"; steps (opened -> on {w_a}/{w_b}): {', '.join(history[i])}")
        half = (n + 1 - i % 2) // 2  # odd pair counts: alternate the extra one's direction
        chosen.append([(on_a[k], on_b[k]) for k in range(half)] +
                      [(on_b[k], on_a[k]) for k in range(half, n)])
    for c, pairs in zip(clients.conns, chosen):
        c.send(("pairs", pairs))
    opened = sum(len(h) for h in held)
    landed = {pid: sum(1 for pid2 in where.values() if pid2 == pid) for pid in (w_a, w_b)}
    for i, pairs in enumerate(chosen):  # by construction; checked once more
        assert all(where[snd] != where[rcv] for snd, rcv in pairs), i
    return {"opened": opened, "extra": opened - 2 * sum(per_proc), "landed": landed,
            "steps": history,
            "a_to_b": sum(1 for pairs in chosen for snd, _ in pairs if where[snd] == w_a),
            "b_to_a": sum(1 for pairs in chosen for snd, _ in pairs if where[snd] == w_b)}


def run_relay(server: Server, clients: Clients, kind: str, args, tag: str) -> dict[str, Any]:
    nprocs = len(clients.conns)
    per_proc = split(args.pairs, nprocs)
    cross = SCENARIOS[server.name]["cross"]
    for c, n in zip(clients.conns, per_proc):
        c.send((kind, server.target, tag, n, cross))
    placement = place_cross_pairs(server, clients, per_proc) if cross else None
    setup = clients.gather("ready", 120)
    if kind == "throughput":
        warm, dur = args.warmup, args.duration
    else:
        warm, dur = args.warmup, args.latency_duration
    t_start = time.monotonic() + 0.3
    t_a, t_b = t_start + warm, t_start + warm + dur
    clients.send_all(("go", t_start, t_a, t_b))
    redis = server.redis
    ours = {os.getpid(), server.proc.pid, *server.workers, *clients.pids()}
    if redis:
        ours.add(redis.pid)
    try:
        sleep_until(t_a)
        cpu_a, mach_a, other_a = server.cpu_each(), machine_cpu(), other_cpu(ours)
        red_a = (redis.cpu(), redis.command_calls()) if redis else None
        sleep_until(t_b)
        cpu_b, mach_b, other_b = server.cpu_each(), machine_cpu(), other_cpu(ours)
        red_b = (redis.cpu(), redis.command_calls()) if redis else None
    except OSError:
        server.check_worker()  # raises, naming the change and with the log tail
        raise
    wall = t_b - t_a
    results = clients.gather("result", args.drain_grace + PHASE_SLACK)
    server.check_worker()
    samples = sorted(s for r in results for s in r["samples"])
    worker_cpu = [b - a for a, b in zip(cpu_a, cpu_b)]
    out = {
        "setup_seconds": max(setup),
        "window_seconds": wall,
        "workers": len(server.workers),
        "placement": placement,
        "sent": sum(r["sent"] for r in results),
        "received": sum(r["received"] for r in results),
        "in_window": sum(r["in_window"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "sender_errors": sum(r["sender_errors"] for r in results),
        "rejected": sum(r["rejected"] for r in results),
        "error_samples": [e for r in results for e in r["error_samples"]][:3],
        "unexpected": sum(r["unexpected"] for r in results),
        "bad_from": sum(r["bad_from"] for r in results),
        "connection_failures": [f for r in results for f in r["connection_failures"]][:5],
        "connection_failure_count": sum(r["connection_failure_count"] for r in results),
        "worker_cpu": worker_cpu,
        "server_cpu": sum(worker_cpu),
        "redis_cpu": (red_b[0] - red_a[0]) if redis else None,
        "client_cpu": [r["client_cpu"] for r in results],
        "machine_busy_cores": (mach_b[0] - mach_a[0]) / wall,
        "machine_cores": (mach_b[1] - mach_a[1]) / wall,
    }
    # Offers sent and neither received nor answered with an error reply.
    out["lost"] = out["sent"] - out["received"] - out["rejected"]
    out["rate"] = out["in_window"] / wall
    out["worker_util"] = [c / wall for c in worker_cpu]
    out["server_util"] = out["server_cpu"] / wall
    out["client_util"] = [c / wall for c in out["client_cpu"]]
    out["client_util_sum"] = sum(out["client_util"])
    out["other_busy_cores"], out["other_top"] = other_cpu_delta(other_a, other_b, wall)
    out["total_cpu"] = out["server_cpu"] + (out["redis_cpu"] or 0.0)
    out["total_util"] = out["total_cpu"] / wall
    if redis:
        out["redis_util"] = out["redis_cpu"] / wall
        calls = {k: red_b[1].get(k, 0) - red_a[1].get(k, 0) for k in red_b[1]}
        out["redis_calls"] = {k: v for k, v in calls.items() if v}
        out["evalsha_per_msg"] = (calls.get("evalsha", 0) / out["in_window"]
                                  if out["in_window"] else float("nan"))
        out["publish_per_msg"] = (calls.get("publish", 0) / out["in_window"]
                                  if out["in_window"] else float("nan"))
    if kind == "latency":
        out.update({
            "offered_rate": args.rate,
            "samples": len(samples),
            "p50_ms": percentile(samples, 0.50) / 1e6,
            "p99_ms": percentile(samples, 0.99) / 1e6,
            "max_ms": (samples[-1] / 1e6) if samples else float("nan"),
            "pacer_lag_p99_ms": max(r["lag_p99"] for r in results) * 1e3,
            "pacer_lag_max_ms": max(r["lag_max"] for r in results) * 1e3,
        })
    # Per CPU-second of everything serving the relay: the workers, plus redis-server when
    # the server uses it (apart: per worker CPU-second). In the latency run every server
    # gets the same paced rate, so there the figure compares servers at equal load.
    out["msgs_per_cpu_s"] = (out["in_window"] / out["total_cpu"]
                             if out["total_cpu"] > 0 else float("nan"))
    out["msgs_per_worker_cpu_s"] = (out["in_window"] / out["server_cpu"]
                                    if out["server_cpu"] > 0 else float("nan"))
    out["bottleneck"], out["client_bound"] = bottleneck(out)
    return out


def usage(r: dict[str, Any]) -> str:
    """Who used how much CPU in a window, in cores."""
    ws = r["worker_util"]
    parts = [("server worker " if len(ws) == 1 else "server workers ") +
             "/".join(f"{w:.0%}" for w in ws) + " of a core"]
    if r.get("redis_util") is not None:
        parts.append(f"redis-server {r['redis_util']:.0%}")
    parts += ["clients " + "/".join(f"{c:.0%}" for c in r["client_util"]),
              f"machine {r['machine_busy_cores']:.2f}/{r['machine_cores']:.0f} cores busy "
              f"(other processes {r['other_busy_cores']:.2f})"]
    return ", ".join(parts)


def bottleneck(r: dict[str, Any]) -> tuple[str, bool]:
    """(verdict with the CPU figures, whether the load generator limited the figure)."""
    ws, cli, red = r["worker_util"], r["client_util"], r.get("redis_util") or 0.0
    busy = r["machine_busy_cores"]
    used = sum(ws) + sum(cli) + red + r["other_busy_cores"]
    client_bound = False
    if max(ws) >= 0.9:
        verdict = "a server worker (one core) saturated"
    elif red >= 0.9:
        verdict = "redis-server (single-threaded) saturated"
    elif cli and max(cli) >= 0.9:
        verdict = "a client process saturated (client-bound: the load generator limits it)"
        client_bound = True
    elif max(busy, used) >= 0.85 * r["machine_cores"]:
        verdict = (f"machine CPU saturated (server, clients and other processes share the "
                   f"cores; the load generator took {sum(cli):.2f} of them)")
        # The client's share is CPU the server could have used: with more cores than
        # server processes plus the client this would not limit the server.
        client_bound = len(ws) + (1 if red else 0) + len(cli) > r["machine_cores"] + 0.5
    else:
        verdict = "nothing CPU-saturated (window/latency-bound)"
    return f"{verdict}: " + usage(r), client_bound


def run_connections(server: Server, raw: Clients, args, tag: str) -> dict[str, Any]:
    """Connections phase, with the lean client processes (bench/rawws.py): open K1 (e.g.
    5,000) registered connections as fast as --conn-concurrency handshakes in flight per
    process allow (connections per second, server CPU per connection), let them settle and
    read the server's RSS (memory per idle connection at K1); then the same up to K2 (e.g.
    20,000); then close all. The connections come from several source addresses."""
    ks = args.idle_ks
    nprocs = len(raw.conns)
    total = ks[-1]
    nsources = max(nprocs, math.ceil(total / 20_000))
    sources = rawws.source_addresses(nsources)
    steps_ids: list[list[list[str]]] = [[] for _ in range(nprocs)]
    prev = 0
    for k in ks:
        ids = [f"{tag}-c{i}" for i in range(prev, k)]
        for i in range(nprocs):
            steps_ids[i].append(ids[i::nprocs])
        prev = k
    for i, c in enumerate(raw.conns):
        c.send(("conns", server.target, steps_ids[i], sources[i::nprocs] or sources))
    ours = {os.getpid(), server.proc.pid, *server.workers, *raw.pids()}
    time.sleep(args.settle)
    rss0 = server.rss_kb()
    steps: list[dict[str, Any]] = []
    prev = 0
    try:
        for k in ks:
            cpu_a, other_a = server.cpu(), other_cpu(ours)
            mach_a = machine_cpu()
            raw.send_all(("go",))
            got = raw.gather("ready", args.conn_open_timeout + PHASE_SLACK)
            cpu_b, other_b = server.cpu(), other_cpu(ours)
            mach_b = machine_cpu()
            t0 = min(r["t_start"] for r in got)
            t1 = max(r["t_end"] for r in got)
            wall = max(t1 - t0, 1e-6)
            opened = sum(r["opened"] for r in got)
            failed = sum(r["failed"] for r in got)
            reasons: dict[str, int] = {}
            for r in got:
                for why, n in r["failures"].items():
                    reasons[why] = reasons.get(why, 0) + n
            time.sleep(args.settle)
            rss = server.rss_kb()
            online = None
            with contextlib.suppress(Exception):
                online = server.health().get("online")
            client_cpu = [r["client_cpu"] for r in got]
            step = {
                "k": k, "new": k - prev, "opened": opened, "failed": failed,
                "failure_reasons": reasons, "seconds": wall,
                "conn_per_s": opened / wall,
                "server_cpu": cpu_b - cpu_a,
                "server_util": (cpu_b - cpu_a) / wall,
                "server_cpu_ms_per_conn": (cpu_b - cpu_a) / opened * 1e3 if opened else None,
                "client_cpu": client_cpu, "client_util": [c / wall for c in client_cpu],
                "client_util_sum": sum(client_cpu) / wall,
                "machine_busy_cores": (mach_b[0] - mach_a[0]) / wall,
                "handshake_p50_ms": max((r["handshake_p50_ms"] or 0) for r in got),
                "handshake_p99_ms": max((r["handshake_p99_ms"] or 0) for r in got),
                "rss_kb": rss, "online_reported": online,
                "kb_per_conn": (rss - rss0) / k,
            }
            step["other_busy_cores"], step["other_top"] = other_cpu_delta(other_a, other_b,
                                                                          wall)
            steps.append(step)
            prev = k
            print(f"[{server.name}] connections: {opened:,} new in {wall:.1f}s = "
                  f"{step['conn_per_s']:,.0f}/s (server {step['server_util']:.0%} of a core, "
                  f"{step['server_cpu_ms_per_conn'] or 0:.2f} ms CPU/conn; clients "
                  f"{step['client_util_sum']:.0%}), {failed} failed; RSS "
                  f"{rss / 1024:.0f} MB at {k:,} = {step['kb_per_conn']:.1f} kB/conn"
                  + (f"; failures {reasons}" if reasons else ""), flush=True)
            if failed:
                break
    finally:
        raw.send_all(("close",))
        results = raw.gather("result", 120)
    time.sleep(args.settle)
    after_close = server.rss_kb()
    server.check_worker()
    dropped: dict[str, int] = {}
    for r in results:
        for why, n in r["held"]["dropped"].items():
            dropped[why] = dropped.get(why, 0) + n
    return {"ks": ks, "sources": sources, "rss_before_kb": rss0, "steps": steps,
            "rss_after_close_kb": after_close, "dropped": dropped,
            "forced_closes": sum(r["closed"]["forced"] for r in results),
            "close_seconds": max(r["closed"]["seconds"] for r in results)}


def run_rtt(server: Server, clients: Clients, args, tag: str) -> dict[str, Any]:
    """Round trips of one pair, from client process 0; server CPU over the same time."""
    cpu_a = server.cpu()
    t0 = time.monotonic()
    clients.conns[0].send(("rtt", server.target, tag, args.rtt_count, args.rtt_limit))
    r = clients.recv(0, "result", args.rtt_limit + PHASE_SLACK)
    wall = time.monotonic() - t0
    r["server_cpu"] = server.cpu() - cpu_a
    r["server_cpu_us_per_rt"] = (r["server_cpu"] / r["round_trips"] * 1e6
                                 if r["round_trips"] else None)
    r["client_util"] = r["client_cpu"] / r["wall_s"] if r["wall_s"] else None
    r["client_cpu_us_per_rt"] = (r["client_cpu"] / r["round_trips"] * 1e6
                                 if r["round_trips"] else None)
    r["server_util"] = r["server_cpu"] / wall
    server.check_worker()
    return r


def print_placement(name: str, phase: str, r: dict[str, Any]) -> None:
    pl = r.get("placement")
    if pl:
        print(f"[{name}] {phase} run, cross-worker pairs: opened {pl['opened']} connections "
              f"({pl['extra']} extra, {sum(len(h) for h in pl['steps'])} step(s)), landed " +
              ", ".join(f"{n} on worker {pid}" for pid, n in pl["landed"].items()) +
              f"; pairs {pl['a_to_b']} one way, {pl['b_to_a']} the other", flush=True)


def run_server(name: str, clients: Clients, args, log_dir: Path,
               redis: RedisServer | None = None, raw: Clients | None = None,
               lean: Clients | None = None) -> dict[str, Any]:
    """One round against one server: start it, warm up, connections (conn/s and memory at
    K1 and K2; not for the --redis servers), throughput, latency, round trips (not for the
    --redis servers), stop."""
    server = make_server(name, log_dir, args.deflate, redis)
    result: dict[str, Any] = {"command": server.command_line(), "log": str(server.log_path),
                              "label": SCENARIOS[name]["label"],
                              "env": {k: v for k, v in sorted(server.env.items())
                                      if k.startswith("VOLLI_") or k == "WEB_CONCURRENCY"}}
    print(f"[{name}] starting: {server.command_line()}  (port {server.port})", flush=True)
    try:
        server.start()
        result["worker_pids"] = server.workers
        tag = f"{name}{server.port}"
        clients.send_all(("warmup", server.target, tag + "w"))
        clients.gather("result", 30)
        if args.idle_ks and raw is not None and not SCENARIOS[name]["redis"]:
            result["connections"] = run_connections(server, raw, args, tag + "c")
            result["conn"] = flatten_connections(result["connections"])
        result["throughput"] = t = run_relay(server, lean or clients, "throughput", args,
                                             tag + "t")
        t["client"] = "lean (bench/rawws.py)" if lean else "python-websockets"
        print_placement(name, "throughput", t)
        extra = ""
        if server.redis is not None:
            extra = (f" (workers + redis-server; per worker CPU-s "
                     f"{t['msgs_per_worker_cpu_s']:.0f}; EVALSHA per msg "
                     f"{t['evalsha_per_msg']:.2f})")
        print(f"[{name}] throughput: {t['rate']:.0f} msg/s, {t['msgs_per_cpu_s']:.0f} msg per "
              f"server CPU-s{extra}, lost={t['lost']} errors={t['errors'] + t['sender_errors']};"
              f" {t['bottleneck']}", flush=True)
        result["latency"] = lat = run_relay(server, clients, "latency", args, tag + "l")
        print_placement(name, "latency", lat)
        print(f"[{name}] latency @ {args.rate:g} msg/s: p50 {lat['p50_ms']:.2f} ms, p99 "
              f"{lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms ({lat['samples']} samples, "
              f"achieved {lat['rate']:.0f} msg/s, lost={lat['lost']} "
              f"errors={lat['errors'] + lat['sender_errors']}; other processes "
              f"{lat['other_busy_cores']:.2f} cores)", flush=True)
        if args.rtt_count > 0 and not SCENARIOS[name]["redis"]:
            result["rtt"] = rt = run_rtt(server, clients, args, tag + "r")
            print(f"[{name}] round trips: {rt['round_trips']} in {rt['wall_s']:.1f}s, p50 "
                  f"{rt['p50_ms']:.3f} ms, p99 {rt['p99_ms']:.3f} ms, max {rt['max_ms']:.2f} ms;"
                  f" server {rt['server_cpu_us_per_rt']:.0f} us CPU per round trip; client "
                  f"{rt['client_util']:.0%} of a core" +
                  (f"; {rt['bad']} BAD replies, e.g. {rt['bad_sample']}" if rt["bad"] else ""),
                  flush=True)
        result["rss_end_kb"] = server.rss_kb()
    except Exception as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {result['failure']}", flush=True)
    finally:
        server.stop()
    result["log_findings"] = scan_log(server.log(), server.nworkers)
    return result


# --------------------------------------------------------------------------------------------
# Report


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def ratio(a: Any, b: Any) -> str:
    try:
        if a is None or b is None or b == 0 or a != a or b != b:
            return "n/a"
        return f"{a / b:.2f}"
    except TypeError:
        return "n/a"


def lookup(r: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = r
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def median(vals: list[float]) -> float | None:
    vals = sorted(v for v in vals if v is not None and v == v)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def total_over(res: dict[str, list[dict[str, Any]]], name: str, key: str) -> int | None:
    """Sum of a count over both relay phases of every round ("errors": error replies on
    either side of a pair)."""
    keys = ("errors", "sender_errors") if key == "errors" else (key,)
    rounds = res.get(name, [])
    vals = [lookup(r, (ph, k)) for r in rounds for ph in ("throughput", "latency")
            for k in keys]
    return sum(vals) if rounds and all(v is not None for v in vals) else None


def redis_table(res: dict[str, list[dict[str, Any]]], args) -> str:
    """The --redis section: each Redis server against the single-worker memory Volli."""
    names = ["volli", "redis-1w", "redis-2w"]

    def get(name: str, *path: str) -> Any:
        return median([lookup(r, path) for r in res.get(name, [])])

    rows = [
        ("relay throughput (msg/s, at receivers)", ("throughput", "rate"), ",.0f", True),
        ("server CPU used: workers (s, in window, sum)", ("throughput", "server_cpu"), ".2f",
         True),
        ("server CPU used: redis-server (s, in window)", ("throughput", "redis_cpu"), ".2f",
         False),
        ("server CPU utilisation: workers + redis (cores)", ("throughput", "total_util"),
         ".2f", True),
        ("msgs per server CPU-second (workers + redis-server)",
         ("throughput", "msgs_per_cpu_s"), ",.0f", True),
        ("msgs per worker CPU-second (workers only)", ("throughput", "msgs_per_worker_cpu_s"),
         ",.0f", True),
        ("Redis EVALSHA per relayed msg", ("throughput", "evalsha_per_msg"), ".3f", False),
        ("Redis PUBLISH per relayed msg", ("throughput", "publish_per_msg"), ".3f", False),
        ("client CPU utilisation, throughput run (cores)", ("throughput", "client_util_sum"),
         ".2f", True),
        (f"latency p50 (ms) @ {args.rate:g} msg/s", ("latency", "p50_ms"), ".2f", True),
        (f"latency p99 (ms) @ {args.rate:g} msg/s", ("latency", "p99_ms"), ".2f", True),
        (f"latency max (ms) @ {args.rate:g} msg/s", ("latency", "max_ms"), ".2f", True),
        ("latency run: achieved rate (msg/s)", ("latency", "rate"), ",.0f", True),
        ("latency run: server CPU, workers + redis (cores)", ("latency", "total_util"), ".2f",
         True),
        ("latency run: msgs per server CPU-second (same rate for all)",
         ("latency", "msgs_per_cpu_s"), ",.0f", True),
        ("lost messages (throughput + latency, all rounds)", None, "d", False),
        ("error replies received (all rounds)", None, "d", False),
    ]
    for rs in res.values():  # derived figure used above
        for r in rs:
            t = r.get("throughput")
            if t:
                t["client_util_sum"] = sum(t["client_util"])
    lines = ["| figure | 1 worker, memory | 1 worker, Redis (all local) | ratio | "
             "2 workers, Redis, all cross-worker | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, path, spec, with_ratio in rows:
        if path is None:
            key = "lost" if label.startswith("lost") else "errors"
            v = [total_over(res, n, key) for n in names]
            lines.append(f"| {label} | {fmt(v[0], spec)} | {fmt(v[1], spec)} | - | "
                         f"{fmt(v[2], spec)} | - |")
            continue
        v = [get(n, *path) for n in names]
        r1 = ratio(v[1], v[0]) if with_ratio else "-"
        r2 = ratio(v[2], v[0]) if with_ratio else "-"
        lines.append(f"| {label} | {fmt(v[0], spec)} | {fmt(v[1], spec)} | {r1} | "
                     f"{fmt(v[2], spec)} | {r2} |")
    return "\n".join(lines)


def flatten_connections(c: dict[str, Any]) -> dict[str, Any]:
    """The connections phase's figures by step number (1 = K1, 2 = K2), for the table."""
    out: dict[str, Any] = {"failed": sum(st["failed"] for st in c["steps"])}
    for i, st in enumerate(c["steps"], 1):
        out.update({f"k{i}": st["k"], f"conn_per_s_{i}": st["conn_per_s"],
                    f"server_ms_per_conn_{i}": st["server_cpu_ms_per_conn"],
                    f"server_util_{i}": st["server_util"],
                    f"client_util_{i}": st["client_util_sum"],
                    f"handshake_p99_{i}": st["handshake_p99_ms"],
                    f"kb_per_conn_{i}": st["kb_per_conn"], f"rss_mb_{i}": st["rss_kb"] / 1024})
    return out


def main_rows(args) -> list[tuple[str, str, tuple[str, ...] | None, str, str]]:
    """(key, label, path into a result, format, which servers): the main table's figures.
    "which" is "all" (Volli, baseline, peerjs), or "redis": the Volli column is the 2-worker
    Redis server (every pair cross-worker), the peerjs column peerjs's single process."""
    ks = args.idle_ks or [0, 0]
    k1, k2 = ks[0], ks[-1]
    r = f"{args.rate:g}"
    rows = [
        ("throughput", "1. relay throughput at saturation (msg/s, at receivers)",
         ("throughput", "rate"), ",.0f", "all"),
        ("throughput_server_cores", "   server CPU used, throughput run (cores)",
         ("throughput", "server_util"), ".2f", "all"),
        ("msgs_per_server_cpu_s", "   **msgs relayed per server CPU-second**",
         ("throughput", "msgs_per_cpu_s"), ",.0f", "all"),
        ("throughput_client_cores", "   load generator CPU, throughput run (cores)",
         ("throughput", "client_util_sum"), ".2f", "all"),
        ("latency_p50_ms", f"2. latency p50 (ms) @ {r} msg/s offered", ("latency", "p50_ms"),
         ".2f", "all"),
        ("latency_p99_ms", f"   latency p99 (ms) @ {r} msg/s", ("latency", "p99_ms"), ".2f",
         "all"),
        ("latency_max_ms", f"   latency max (ms) @ {r} msg/s", ("latency", "max_ms"), ".2f",
         "all"),
        ("latency_rate", "   achieved rate (msg/s)", ("latency", "rate"), ",.0f", "all"),
        ("latency_server_cores", "   server CPU, latency run (cores)",
         ("latency", "server_util"), ".2f", "all"),
        ("latency_msgs_per_server_cpu_s", "   msgs per server CPU-second at that rate",
         ("latency", "msgs_per_cpu_s"), ",.0f", "all"),
        ("latency_client_cores", "   load generator CPU, latency run (cores)",
         ("latency", "client_util_sum"), ".2f", "all"),
        ("latency_pacer_lag_p99_ms", "   load generator pacer lag p99 (ms)",
         ("latency", "pacer_lag_p99_ms"), ".2f", "all"),
        ("rtt_p50_ms", f"3. round trip offer->answer p50 (ms), 1 pair, {args.rtt_count} "
         f"sequential", ("rtt", "p50_ms"), ".3f", "all"),
        ("rtt_p99_ms", "   round trip p99 (ms)", ("rtt", "p99_ms"), ".3f", "all"),
        ("rtt_max_ms", "   round trip max (ms)", ("rtt", "max_ms"), ".2f", "all"),
        ("rtt_server_us", "   server CPU per round trip (us, 2 relays)",
         ("rtt", "server_cpu_us_per_rt"), ",.0f", "all"),
        ("rtt_client_us", "   load generator CPU per round trip (us, both ends, in the RTT)",
         ("rtt", "client_cpu_us_per_rt"), ",.0f", "all"),
        ("kb_per_conn_k1", f"4. server RSS per idle registered conn at K={k1:,} (kB)",
         ("conn", "kb_per_conn_1"), ".1f", "all"),
        ("kb_per_conn_k2", f"   server RSS per idle registered conn at K={k2:,} (kB)",
         ("conn", "kb_per_conn_2"), ".1f", "all"),
        ("rss_mb_k2", f"   server RSS with K={k2:,} idle conns (MB)", ("conn", "rss_mb_2"),
         ".0f", "all"),
        ("conn_per_s", f"5. connections accepted+registered per second (first {k1:,})",
         ("conn", "conn_per_s_1"), ",.0f", "all"),
        ("conn_server_ms", "   server CPU per connection (ms)",
         ("conn", "server_ms_per_conn_1"), ".2f", "all"),
        ("conn_server_cores", "   server CPU, connections run (cores)",
         ("conn", "server_util_1"), ".2f", "all"),
        ("conn_client_cores", "   load generator CPU, connections run (cores, lean client)",
         ("conn", "client_util_1"), ".2f", "all"),
        ("conn_handshake_p99_ms", "   connect->registered p99 (ms)",
         ("conn", "handshake_p99_1"), ".0f", "all"),
        ("conn_per_s_k2", f"   connections per second ({k1:,} -> {k2:,})",
         ("conn", "conn_per_s_2"), ",.0f", "all"),
    ]
    if args.redis:
        rows += [
            ("redis2w_throughput", "6. Redis, 2 workers, all pairs cross-worker: throughput "
             "(msg/s)", ("throughput", "rate"), ",.0f", "redis"),
            ("redis2w_msgs_per_server_cpu_s", "   msgs per server CPU-second (workers + "
             "redis-server)", ("throughput", "msgs_per_cpu_s"), ",.0f", "redis"),
            ("redis2w_server_cores", "   server CPU, throughput run (cores, workers + redis)",
             ("throughput", "total_util"), ".2f", "redis"),
            ("redis2w_client_cores", "   load generator CPU, throughput run (cores)",
             ("throughput", "client_util_sum"), ".2f", "redis"),
            ("redis2w_latency_p50_ms", f"   latency p50 (ms) @ {r} msg/s", ("latency", "p50_ms"),
             ".2f", "redis"),
            ("redis2w_latency_p99_ms", f"   latency p99 (ms) @ {r} msg/s", ("latency", "p99_ms"),
             ".2f", "redis"),
            ("redis2w_latency_rate", "   achieved rate (msg/s)", ("latency", "rate"), ",.0f",
             "redis"),
            ("redis2w_latency_msgs_per_server_cpu_s", "   msgs per server CPU-second at that "
             "rate", ("latency", "msgs_per_cpu_s"), ",.0f", "redis"),
        ]
    return rows


def main_values(res: dict[str, list[dict[str, Any]]], args) -> dict[str, dict[str, Any]]:
    """{row key: {"volli": v, "baseline": b, "peerjs": p, "ratio_volli_peerjs": ...,
    "ratio_volli_baseline": ...}}, medians over rounds."""
    def get(name: str, path: tuple[str, ...]) -> Any:
        return median([lookup(r, path) for r in res.get(name, [])])

    def rat(a: Any, b: Any) -> float | None:
        try:
            return a / b if a is not None and b and a == a and b == b else None
        except TypeError:
            return None

    out: dict[str, dict[str, Any]] = {}
    for key, _label, path, _spec, which in main_rows(args):
        if which == "redis":
            v, b, pj = get("redis-2w", path), None, get("peerjs", path)
        else:
            v, b, pj = (get(n, path) for n in ("volli", "baseline", "peerjs"))
        out[key] = {"volli": v, "baseline": b, "peerjs": pj,
                    "ratio_volli_baseline": rat(v, b), "ratio_volli_peerjs": rat(v, pj)}
    for key in ("lost", "errors"):
        out[key] = {n: total_over(res, n, key) for n in res}
    return out


def table(res: dict[str, list[dict[str, Any]]], args) -> str:
    """Each figure is the median over rounds (one round: the value itself)."""
    vals = main_values(res, args)
    lines = ["| figure | Volli | peerjs | ratio Volli/peerjs | baseline | "
             "ratio Volli/baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label, _path, spec, which in main_rows(args):
        row = vals[key]
        lines.append(f"| {label} | {fmt(row['volli'], spec)} | {fmt(row['peerjs'], spec)} | "
                     f"{fmt(row['ratio_volli_peerjs'], '.2f')} | "
                     f"{fmt(row['baseline'], spec) if which == 'all' else '-'} | "
                     f"{fmt(row['ratio_volli_baseline'], '.2f') if which == 'all' else '-'} |")
    for key, label in (("lost", "lost messages (all relay runs)"),
                       ("errors", "error replies received (all relay runs)")):
        v = vals[key]
        lines.append(f"| {label} | {fmt(v.get('volli'), 'd')} | {fmt(v.get('peerjs'), 'd')} "
                     f"| - | {fmt(v.get('baseline'), 'd')} | - |")
    conn_failed = {n: median([lookup(r, ("conn", "failed")) for r in res.get(n, [])])
                   for n in ("volli", "peerjs", "baseline")}
    lines.append(f"| connections failed (connections run) | "
                 f"{fmt(conn_failed['volli'], '.0f')} | {fmt(conn_failed['peerjs'], '.0f')} | - "
                 f"| {fmt(conn_failed['baseline'], '.0f')} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="throughput measurement window (s)")
    ap.add_argument("--latency-duration", type=float, default=8.0,
                    help="latency measurement window (s)")
    ap.add_argument("--warmup", type=float, default=1.5,
                    help="seconds of load before each measurement window")
    ap.add_argument("--window", type=int, default=16,
                    help="offers in flight per pair in the throughput run")
    ap.add_argument("--rate", type=float, default=5000.0,
                    help="total offered rate in the latency run (msg/s)")
    ap.add_argument("--max-messages", type=int, default=2_000_000,
                    help="cap on offers per sender (throughput) / per process (latency)")
    ap.add_argument("--idle", default="5000,20000",
                    help="K1,K2,...: the connections phase opens K1 registered connections "
                         "as fast as it can (connections/s, server CPU per connection), reads "
                         "the RSS (memory per idle connection at K1), then the same up to K2; "
                         "0 = skip. K is capped below the open-file limit (see README)")
    ap.add_argument("--conn-procs", type=int, default=2,
                    help="lean client processes (bench/rawws.py) for the connections phase")
    ap.add_argument("--conn-concurrency", type=int, default=100,
                    help="handshakes in flight per lean client process")
    ap.add_argument("--handshake-timeout", type=float, default=20.0,
                    help="seconds from connect() to registered before a connection fails")
    ap.add_argument("--conn-open-timeout", type=float, default=300.0,
                    help="bound on the time to open one step of the connections phase (s)")
    ap.add_argument("--max-failures", type=int, default=500,
                    help="per lean client process: stop opening after this many failures")
    ap.add_argument("--throughput-client", choices=["lean", "websockets"], default="lean",
                    help="load generator of the throughput run: the lean epoll client "
                         "(bench/rawws.py) or python-websockets (the latency run always uses "
                         "python-websockets)")
    ap.add_argument("--rtt-count", type=int, default=5000,
                    help="sequential round trips of one pair (0 = skip)")
    ap.add_argument("--rtt-limit", type=float, default=60.0,
                    help="bound on the round-trip run's time (s)")
    ap.add_argument("--sdp-size", type=int, default=1500, help="characters of SDP per offer")
    ap.add_argument("--procs", type=int, default=1, help="client processes")
    ap.add_argument("--connect-concurrency", type=int, default=50,
                    help="handshakes in flight per client process")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to wait before reading RSS")
    ap.add_argument("--drain-grace", type=float, default=5.0,
                    help="seconds after a run to wait for in-flight messages")
    ap.add_argument("--deflate", action="store_true",
                    help="clients offer permessage-deflate (and Volli accepts it)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds; the order alternates (V,B then B,V) and the table shows "
                         "medians")
    ap.add_argument("--only", choices=["volli", "baseline", "peerjs"],
                    help="run one of volli/baseline/peerjs only (--redis still adds its "
                         "servers)")
    ap.add_argument("--no-peerjs", action="store_true",
                    help=f"leave out peerjs-server (otherwise npm peer@{PEERJS_VERSION} is "
                         f"installed into bench/.peerjs/ if it is not there, and run)")
    ap.add_argument("--redis", action="store_true", default=True,
                    help="run Volli with the Redis backend too (the default; private "
                         "redis-server): one worker, and two workers with every pair "
                         "cross-worker; in the main table and against the single-worker "
                         "memory Volli in a second table")
    ap.add_argument("--no-redis", dest="redis", action="store_false",
                    help="leave out the Redis servers")
    machine.add_run_options(ap, "relay")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 10 pairs, 1 s windows, 500 msg/s, K=100 "
                         "(options given explicitly still win)")
    if ap.parse_known_args(argv)[0].quick:  # new defaults; explicit options still win
        ap.set_defaults(pairs=10, duration=1.0, latency_duration=1.0, warmup=0.3, rate=1000.0,
                        idle="500,2000", settle=0.3, drain_grace=2.0, rtt_count=200,
                        rtt_limit=10.0)
    args = ap.parse_args(argv)
    try:
        args.idle_ks = sorted({int(k) for k in str(args.idle).split(",") if int(k) > 0})
    except ValueError:
        ap.error("--idle takes K1,K2,... (integers)")
    for name in ("pairs", "procs", "window", "max_messages", "connect_concurrency", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.procs > args.pairs:
        ap.error("--procs must not exceed --pairs")
    if min(args.duration, args.latency_duration, args.rate) <= 0:
        ap.error("durations and --rate must be positive")
    if args.redis and args.only in ("baseline", "peerjs"):
        args.redis = False  # the Redis section reports against the volli run
    if args.no_peerjs and args.only == "peerjs":
        ap.error("--only peerjs contradicts --no-peerjs")
    notes: list[str] = []
    if args.redis and not (shutil.which("redis-server") or os.path.exists(
            "/usr/bin/redis-server")):
        args.redis = False
        notes.append("redis-server is not on PATH: the Redis servers were left out")

    os.chdir(ROOT)
    global SLOTS, VOLLI_TREE, NOFILE
    k_max = args.idle_ks[-1] if args.idle_ks else 0
    # Every server process inherits this process's RLIMIT_NOFILE; as root the hard limit can
    # usually be raised (not where CAP_SYS_RESOURCE is missing, e.g. in some containers).
    soft = rawws.raise_nofile(max(65536, k_max + 2000))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if args.idle_ks and soft < k_max + 500:
        capped = (soft - 500) // 100 * 100
        notes.append(f"K={k_max:,} was capped to {capped:,}: RLIMIT_NOFILE is {soft} "
                     f"(hard {hard}) and could not be raised, and each server process "
                     f"holds one descriptor per connection")
        args.idle_ks = sorted({min(k, capped) for k in args.idle_ks})
        k_max = capped
    SLOTS = max(20000, k_max + 1000)
    NOFILE = soft if soft != resource.RLIM_INFINITY else 1 << 20
    need = 2 * args.pairs * (1 + 2 * CROSS_EXTRA if args.redis else 1) + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        ap.error(f"open-file limit {soft} is below the {need} this run needs")

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tree, volli_commit, tree_before = machine.server_code(args.volli_ref, log_dir, notes)
    if tree is not None:
        VOLLI_TREE = tree
    for note in notes:
        print(f"NOTE: {note}", flush=True)
    opts = {"deflate": args.deflate, "sdp_size": args.sdp_size, "window": args.window,
            "rate": args.rate, "procs": args.procs, "max_messages": args.max_messages,
            "connect_concurrency": args.connect_concurrency, "drain_grace": args.drain_grace,
            "conn_concurrency": args.conn_concurrency,
            "handshake_timeout": args.handshake_timeout,
            "open_timeout": args.conn_open_timeout, "max_failures": args.max_failures}
    started = time.monotonic()
    print(f"relay bench: {args.pairs} pairs, {args.procs} client process(es), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, logs in {log_dir}",
          flush=True)

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (and ^C) unwind through the finally blocks that stop servers and clients.
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    clients = Clients(args.procs, opts)
    raw = Clients(args.conn_procs, opts, raw_client_main, "raw-client") if args.idle_ks \
        else None
    lean = Clients(args.procs, opts, raw_client_main, "lean-client") \
        if args.throughput_client == "lean" else None
    names = [n for n in ("volli", "baseline", "peerjs") if not args.only or n == args.only]
    peerjs_info: dict[str, Any] = {}
    if args.no_peerjs:
        names.remove("peerjs")
    elif "peerjs" in names:
        try:
            peerjs_info = {"package": f"peer@{PEERJS_VERSION}", "dir": str(PEERJS_DIR),
                           "node": ensure_peerjs()}
            print(f"[peerjs] using npm peer@{PEERJS_VERSION} from {PEERJS_DIR} "
                  f"(node {peerjs_info['node']})", flush=True)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            peerjs_info = {"failure": str(exc)}
            names.remove("peerjs")
            print(f"[peerjs] SKIPPED, could not install or run it: {exc}", file=sys.stderr,
                  flush=True)
    if args.redis:
        names += ["redis-1w", "redis-2w"]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    redis: RedisServer | None = None
    interrupted = False
    try:
        if args.redis:
            redis = RedisServer(log_dir)
            print(f"[redis] starting: {redis.command_line()}", flush=True)
            redis.start()
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f"--- round {rnd + 1}/{args.rounds}", flush=True)
            for name in (names if rnd % 2 == 0 else names[::-1]):
                results[name].append(run_server(name, clients, args, log_dir, redis, raw,
                                                lean))
                if results[name][-1].get("failure"):
                    # A client process may still be in the failed phase: start afresh.
                    clients.stop()
                    clients = Clients(args.procs, opts)
                    if raw is not None:
                        raw.stop()
                        raw = Clients(args.conn_procs, opts, raw_client_main, "raw-client")
                    if lean is not None:
                        lean.stop()
                        lean = Clients(args.procs, opts, raw_client_main, "lean-client")
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", file=sys.stderr)
    except RuntimeError as exc:  # redis-server did not start
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        clients.stop()
        for extra in (raw, lean):
            if extra is not None:
                extra.stop()
        if redis is not None:
            redis.stop()
    elapsed = time.monotonic() - started

    print()
    print(table(results, args))
    print()
    if args.redis:
        print("Redis backend: single-worker memory Volli (the reference) against a single "
              "worker with Redis\nand two workers with Redis where every pair is "
              "cross-worker; ratios are against the first column.\n")
        print(redis_table(results, args))
        print()
        cores = os.cpu_count() or 1
        if cores < 2 + 1 + args.procs:
            print(f"CAVEAT: {cores} CPUs. In the 2-worker run the two workers, redis-server "
                  f"and {args.procs} client process(es) share them, so its throughput is "
                  f"bounded by the machine, not by Volli; compare msgs per server CPU-second, "
                  f"not msg/s. The 1-worker runs have about a core each for server and "
                  f"client.")
        print("Per-message CPU falls as a worker gets busier (more work per wake-up): the "
              "throughput run compares a\nsaturated single worker with two unsaturated "
              "ones, which favours the single worker; the latency run's\nmsgs per server "
              "CPU-second compares all three at the same paced rate.\n")
    problems, noise = [], []
    tree_after = None if args.volli_ref else machine.server_tree_state()
    if tree_before and tree_after and tree_after["digest"] != tree_before["digest"]:
        problems.append(f"Volli's files in the working tree changed during the run (now "
                        f"uncommitted: {', '.join(tree_after['dirty'][:5]) or 'none'}): "
                        f"servers started at different times ran different code; use "
                        f"--volli-ref to pin one commit")
    if peerjs_info.get("failure"):
        problems.append(f"peerjs: not run: {peerjs_info['failure']}")
    for name, rounds in results.items():
        for i, r in enumerate(rounds):
            where = f"{name}" + (f" round {i + 1}" if len(rounds) > 1 else "")
            t = r.get("throughput") or {}
            if t.get("bottleneck"):
                print(f"- {where} throughput run: {t['bottleneck']}")
            if t.get("client_bound"):
                print(f"  LOAD GENERATOR: in the {where} throughput run the client used "
                      f"{sum(t['client_util']):.2f} of the {t['machine_cores']:.0f} cores "
                      f"that the server processes needed too, so its msg/s is bound by the "
                      f"shared machine, not by the server alone; compare its msgs per server "
                      f"CPU-second instead")
            lat = r.get("latency") or {}
            if lat:
                print(f"- {where} latency run: {usage(lat)}, pacer lag "
                      f"p99 {lat['pacer_lag_p99_ms']:.2f} ms / max {lat['pacer_lag_max_ms']:.2f} "
                      f"ms (how late the client sent; the stamp is taken at the real send)")
                if lat["rate"] < 0.95 * args.rate:
                    print(f"  LOAD GENERATOR or SERVER: the {where} latency run achieved only "
                          f"{lat['rate']:.0f} of {args.rate:g} msg/s")
            if r.get("failure"):
                problems.append(f"{where}: run failed: {r['failure']}")
            for phase in ("throughput", "latency"):
                p = r.get(phase) or {}
                for key in ("lost", "errors", "sender_errors", "unexpected", "bad_from"):
                    if p.get(key):
                        problems.append(f"{where} {phase}: {key}={p[key]}")
                if p.get("error_samples"):
                    problems.append(f"{where} {phase}: error replies, e.g. "
                                    f"{'; '.join(p['error_samples'])}")
                if p.get("connection_failure_count"):
                    problems.append(f"{where} {phase}: {p['connection_failure_count']} client "
                                    f"connections failed, e.g. {p['connection_failures']}")
                if p.get("other_busy_cores", 0) > NOISY_CORES:
                    noise.append(f"{where} {phase}: other processes kept "
                                 f"{p['other_busy_cores']:.2f} cores busy (top: "
                                 f"{', '.join(p.get('other_top') or []) or '?'})")
            c = r.get("connections") or {}
            for st in c.get("steps") or []:
                if st["failed"]:
                    problems.append(f"{where} connections: {st['failed']} of {st['new']} "
                                    f"failed: {st['failure_reasons']}")
                if st.get("online_reported") not in (None, st["k"]) and not st["failed"]:
                    problems.append(f"{where} connections: server reported "
                                    f"{st['online_reported']} online, expected {st['k']}")
                if st.get("other_busy_cores", 0) > NOISY_CORES:
                    noise.append(f"{where} connections to {st['k']}: other processes kept "
                                 f"{st['other_busy_cores']:.2f} cores busy (top: "
                                 f"{', '.join(st.get('other_top') or []) or '?'})")
                if max(st["client_util"] or [0]) >= 0.9:
                    print(f"  LOAD GENERATOR: in the {where} connections run to {st['k']:,} a "
                          f"lean client process used {max(st['client_util']):.0%} of a core")
            if c.get("dropped"):
                problems.append(f"{where} connections: the server closed idle connections: "
                                f"{c['dropped']}")
            if c.get("forced_closes"):
                problems.append(f"{where} connections: {c['forced_closes']} connections "
                                f"not closed by the server within 30 s of our close frame")
            rt = r.get("rtt") or {}
            if rt.get("bad"):
                problems.append(f"{where} round trips: {rt['bad']} wrong replies, e.g. "
                                f"{rt['bad_sample']}")
            if rt and rt.get("round_trips", 0) < rt.get("asked", 0):
                problems.append(f"{where} round trips: only {rt['round_trips']} of "
                                f"{rt['asked']} within {args.rtt_limit:g}s")
            problems += machine.log_problems(where, r.get("log_findings"))
    machine.print_report(noise, problems, elapsed, log_dir)
    machine.save_results(args, "relay", lambda: {
        **machine.describe(PEERJS_PKG), "volli_ref": args.volli_ref,
        "volli_commit": volli_commit or "working tree", "volli_tree_before": tree_before,
        "volli_tree_after": tree_after, "args": vars(args), "elapsed_seconds": elapsed,
        "notes": notes, "peerjs": peerjs_info, "figures": main_values(results, args),
        "table_markdown": table(results, args),
        "redis_table_markdown": redis_table(results, args) if args.redis else None,
        "results": results, "problems": problems, "noise": noise})
    if interrupted:
        return 130
    return 1 if peerjs_info.get("failure") or any(
        r.get("failure") for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
