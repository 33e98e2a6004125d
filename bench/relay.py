#!/usr/bin/env python
"""Relay load bench: Volli against a bare flask-sock relay, same load, same run.

Run from the repo root:  python bench/relay.py            (full run, about 1 minute on 2 cores)
                         python bench/relay.py --quick    (smoke run, about 10 seconds)

For each server (Volli via ./gunicorn.conf.py, then the baseline bench/baseline_app.py under
the same gunicorn gevent worker) it starts gunicorn on a free 127.0.0.1 port, then measures:

1. idle memory: worker RSS before/after K registered idle connections, per connection;
2. throughput: N sender/receiver pairs, each sender keeps at most --window offers in flight
   (closed loop, so no receiver's server-side queue can overflow); messages counted at the
   receivers inside the measurement window, and the worker's CPU seconds in that window;
3. latency: the same pairs at a fixed, paced total rate; one-way latency from a
   time.monotonic_ns() stamp in the payload to its arrival (same machine clock).

With --redis the same run adds two Volli servers that share presence through a private
redis-server (started on a free 127.0.0.1 port, stopped at the end), measured like the
first (throughput and latency; no idle-memory figure) and reported against the single-worker
in-memory Volli figures:

- redis-1w: one worker with VOLLI_REDIS_URL set; every user is local, so no relay touches
  Redis (the cost of the backend when nothing crosses);
- redis-2w: WEB_CONCURRENCY=2, and every sender/receiver pair is CROSS-worker. gunicorn
  hands connections to workers as they come, so the clients register, the bench reads which
  worker logged each registration ("[<pid>] [INFO] volli.hub: registered user=..."), opens
  more connections if one worker holds too few (bounded), and pairs each sender with a
  receiver on the other worker, half in each direction. Server CPU is both workers plus
  redis-server, also shown apart.

The load comes from --procs client processes (python-websockets asyncio client). Every loop
is bounded in count and time; servers are stopped with SIGTERM, then SIGKILL, on their
process group. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
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
import time
import urllib.request
from pathlib import Path
from typing import Any

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a Volli dependency
    _loads = json.loads

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASE_SLACK = 30.0  # extra seconds the parent waits on a client process beyond a phase's plan
NOISY_CORES = 0.35  # CPU use by other processes in a window above which a run is flagged
CROSS_STEPS = 6  # rounds of "open more connections" when placing cross-worker pairs
CROSS_EXTRA = 3  # at most this many times 2 x pairs extra connections for that placement
REGISTERED_LINE = re.compile(rb"\[(\d+)\] \[INFO\] volli\.hub: registered user=(\S+) id=")

# Servers the bench can run. "volli" is the reference of the --redis section's ratios.
SCENARIOS: dict[str, dict[str, Any]] = {
    "volli": {"app": "volli", "workers": 1, "redis": False, "cross": False,
              "label": "Volli, 1 worker, memory backend"},
    "baseline": {"app": "baseline", "workers": 1, "redis": False, "cross": False,
                 "label": "bare flask-sock relay, 1 worker"},
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


def offer_parts(to: str, sdp: str) -> tuple[str, str]:
    """Prefix and suffix of an offer frame; the send timestamp goes between them."""
    prefix = ('{"type":"offer","to":' + json.dumps(to) +
              ',"offer":{"type":"offer","sdp":' + json.dumps(sdp) + ',"t":')
    return prefix, "}}"


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


def other_cpu_seconds(exclude: set[int]) -> float:
    """CPU seconds used so far by every process except ``exclude``: utime + stime plus the
    children's (cutime + cstime), so a process that exits and is reaped mid-window still
    counts through its parent. Per-process times are exact; /proc/stat's idle is sampled at
    ticks and misses timer-synchronised work such as the paced latency run."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            if pid in exclude:
                continue
            text = stat.read_text()
        except (OSError, ValueError):
            continue
        f = text[text.rindex(")") + 2:].split()
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


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


class Server:
    """One gunicorn process group on 127.0.0.1, output to a log file."""

    def __init__(self, name: str, log_dir: Path, deflate: bool) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{self.port}.log"
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
               "PYTHONPATH": str(ROOT)}
        for var in ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS"):
            env.pop(var, None)
        py = [sys.executable, "-m", "gunicorn"]
        if name == "volli":
            env.update({
                "VOLLI_MAX_CONNECTIONS": "19900",  # gunicorn.conf.py adds 100 -> 20000 slots
                "VOLLI_STATS_INTERVAL": "3600",
                "VOLLI_PERMESSAGE_DEFLATE": "1" if deflate else "0",
            })
            self.cmd = py + ["--config", "gunicorn.conf.py", "wsgi:app"]
        else:
            # -c: without it gunicorn, started from the repo root, would read Volli's
            # ./gunicorn.conf.py (its post_worker_init hook needs the Volli app).
            self.cmd = py + ["-c", "bench/gunicorn_baseline.py", "-k", "gevent", "-w", "1",
                             "--worker-connections", "20000",
                             "-b", f"127.0.0.1:{self.port}", "bench.baseline_app:app"]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.worker = 0
        self._log = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/signaling"

    def command_line(self) -> str:
        return " ".join(self.cmd)

    def start(self, deadline: float = 30.0) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited with {self.proc.returncode}"
                                   f":\n{self.log_tail()}")
            try:
                if self.health().get("status") == "ok":
                    kids = proc_children(self.proc.pid)
                    if len(kids) == 1:
                        self.worker = kids[0]
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not ready in {deadline}s:\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.loads(r.read())

    def check_worker(self) -> None:
        """The worker we measure must still be the one that booted."""
        kids = proc_children(self.proc.pid) if self.proc else []
        if kids != [self.worker]:
            raise RuntimeError(f"{self.name}: worker changed ({self.worker} -> {kids}); "
                               f"log:\n{self.log_tail()}")

    def cpu(self) -> float:
        return proc_cpu_seconds(self.worker)

    def rss_kb(self) -> int:
        return proc_rss_kb(self.worker)

    def log_tail(self, n: int = 12) -> str:
        """The last ``n`` log lines, without Volli's per-connection open/close lines."""
        lines = [line for line in self.log().splitlines()
                 if "volli.ws: connection open" not in line
                 and "volli.ws: connection closed" not in line]
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


_LOG_PATTERNS = [
    ("traceback", re.compile(r"Traceback")),
    ("error/critical lines", re.compile(r"\[(ERROR|CRITICAL)\]")),
    ("worker timeout/exit", re.compile(r"WORKER TIMEOUT|Worker \(pid:\d+\) (was sent|exited)|"
                                       r"Worker exiting.*code|Booting worker", re.I)),
    ("slow-consumer / internal-error closes", re.compile(r"code=(4002|1011|1009)\b")),
]


def scan_log(text: str) -> dict[str, Any]:
    """Counts of worrying lines and a short excerpt of each kind."""
    found: dict[str, Any] = {}
    lines = text.splitlines()
    for label, pattern in _LOG_PATTERNS:
        hits = [i for i, line in enumerate(lines) if pattern.search(line)]
        if label == "worker timeout/exit":
            # One "Booting worker" line is expected.
            boots = [i for i in hits if "Booting worker" in lines[i]]
            hits = [i for i in hits if i not in boots[:1]]
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
                 "samples", "sender_done", "failure")

    def __init__(self, sender, receiver, sender_id, receiver_id, sdp) -> None:
        self.sender, self.receiver = sender, receiver
        self.sender_id, self.receiver_id = sender_id, receiver_id
        self.prefix, self.suffix = offer_parts(receiver_id, sdp)
        self.sent = self.received = self.in_window = 0
        self.errors = self.unexpected = self.bad_from = 0
        self.event = asyncio.Event()
        self.samples: list[int] = []
        self.sender_done = False
        self.failure: str | None = None


async def _connect(url: str, opts: dict[str, Any]):
    from websockets.asyncio.client import connect

    return await connect(url, compression="deflate" if opts["deflate"] else None, proxy=None,
                         max_size=None, open_timeout=10, close_timeout=2, ping_interval=None)


async def _open_registered(url: str, user_id: str, opts: dict[str, Any], sem: asyncio.Semaphore):
    async with sem:
        ws = await _connect(url, opts)
        try:
            await ws.send(json.dumps({"type": "register", "userId": user_id,
                                      "publicKey": "AAAA"}))
            async with asyncio.timeout(10):
                reply = _loads(await ws.recv())
            if reply.get("type") != "registered" or reply.get("userId") != user_id:
                raise RuntimeError(f"register {user_id!r}: unexpected reply {reply!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws


async def _open_many(url: str, ids: list[str], opts: dict[str, Any]) -> list:
    sem = asyncio.Semaphore(opts["connect_concurrency"])
    results = await asyncio.gather(*(_open_registered(url, u, opts, sem) for u in ids),
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


def _wait_parent(conn, expect: str, timeout: float):
    """Block (the loop is idle here) until the parent sends ``expect``."""
    if not conn.poll(timeout):
        raise RuntimeError(f"parent sent no {expect!r} within {timeout}s")
    msg = conn.recv()
    if msg[0] != expect:
        raise RuntimeError(f"expected {expect!r} from parent, got {msg[0]!r}")
    return msg


async def _make_pairs(url: str, idx: int, n: int, tag: str, opts: dict[str, Any]) -> list[Pair]:
    sids = [f"{tag}-p{idx}-s{i}" for i in range(n)]
    rids = [f"{tag}-p{idx}-r{i}" for i in range(n)]
    socks = await _open_many(url, sids + rids, opts)
    sdp = make_sdp(opts["sdp_size"])
    return [Pair(socks[i], socks[n + i], sids[i], rids[i], sdp) for i in range(n)]


async def _receiver(p: Pair, t_a: float, t_b: float, t_a_ns: int, t_b_ns: int,
                    record: bool, deadline: float, limit: int) -> None:
    ws = p.receiver
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    expected_from = p.sender_id
    async with asyncio.timeout_at(deadline):
        for _ in range(limit):  # no sender sends more than max_messages
            data = await ws.recv()
            now_ns = monotonic_ns()
            now = monotonic()
            msg = _loads(data)
            kind = msg.get("type")
            if kind == "offer":
                if msg.get("from") != expected_from:
                    p.bad_from += 1
                p.received += 1
                p.event.set()
                if t_a <= now <= t_b:
                    p.in_window += 1
                if record:
                    t = msg["offer"]["t"]
                    if t_a_ns <= t <= t_b_ns:
                        p.samples.append(now_ns - t)
            elif kind == "error":
                p.errors += 1
            else:
                p.unexpected += 1


async def _throughput_sender(p: Pair, t_b: float, window: int, max_count: int) -> None:
    ws, prefix, suffix = p.sender, p.prefix, p.suffix
    monotonic, monotonic_ns = time.monotonic, time.monotonic_ns
    try:
        while p.sent < max_count and monotonic() < t_b:
            if p.sent - p.received >= window:
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


async def _relay_phase(conn, url: str, idx: int, kind: str, n: int, tag: str,
                       opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    pairs = await _make_pairs(url, idx, n, tag, opts)
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
        sampler = asyncio.create_task(_cpu_sampler(t_a, t_b, cpu))
        tasks = receivers + [sampler]
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
                p.received < p.sent and not receivers[i].done() for i, p in enumerate(pairs))):
            await asyncio.sleep(0.01)
        for p, task in zip(pairs, receivers):
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                why = ("nothing more before the deadline" if isinstance(exc, TimeoutError)
                       else repr(exc))
                failures.append(f"receiver {p.receiver_id}: {why}")
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
        "sent": sum(p.sent for p in pairs),
        "received": sum(p.received for p in pairs),
        "in_window": sum(p.in_window for p in pairs),
        "errors": sum(p.errors for p in pairs),
        "unexpected": sum(p.unexpected for p in pairs),
        "bad_from": sum(p.bad_from for p in pairs),
        "connection_failures": failures[:5],
        "connection_failure_count": len(failures),
        "client_cpu": (cpu["b"] - cpu["a"]) if "b" in cpu else float("nan"),
        "samples": samples,
        "lag_p99": lags[int(0.99 * (len(lags) - 1))] if lags else 0.0,
        "lag_max": lags[-1] if lags else 0.0,
    }


async def _memory_phase(conn, url: str, idx: int, k: int, tag: str,
                        opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    socks = await _open_many(url, [f"{tag}-p{idx}-idle{i}" for i in range(k)], opts)
    try:
        conn.send(("ready", time.monotonic() - t0))
        _wait_parent(conn, "close", 120)
    finally:
        t1 = time.monotonic()
        await _close_all(socks)
    return {"opened": len(socks), "close_seconds": time.monotonic() - t1}


async def _warmup_phase(url: str, idx: int, tag: str, opts: dict[str, Any]) -> dict[str, Any]:
    """A few relays through the server, so lazily loaded code is loaded before measuring."""
    pairs = await _make_pairs(url, idx, 2, tag, opts)
    try:
        for p in pairs:
            for _ in range(5):
                await p.sender.send(p.prefix + str(time.monotonic_ns()) + p.suffix)
        async with asyncio.timeout(10):
            for p in pairs:
                for _ in range(5):
                    msg = _loads(await p.receiver.recv())
                    if msg.get("type") != "offer":
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
            name, url, tag = cmd[0], cmd[1], cmd[2]
            if name == "warmup":
                result = asyncio.run(_warmup_phase(url, idx, tag, opts))
            elif name == "memory":
                result = asyncio.run(_memory_phase(conn, url, idx, cmd[3], tag, opts))
            else:
                result = asyncio.run(_relay_phase(conn, url, idx, name, cmd[3], tag, opts))
            conn.send(("result", result))
        except BaseException as exc:  # report, then keep serving (the parent decides)
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------------------
# Orchestration (parent)


class Clients:
    def __init__(self, nprocs: int, opts: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(nprocs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(child, i, opts), daemon=True,
                            name=f"relay-client-{i}")
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def send_all(self, msg) -> None:
        for c in self.conns:
            c.send(msg)

    def gather(self, expect: str, timeout: float) -> list[Any]:
        end = time.monotonic() + timeout
        out = []
        for i, c in enumerate(self.conns):
            if not c.poll(max(0.0, end - time.monotonic())):
                raise RuntimeError(f"client process {i} sent nothing within {timeout:.0f}s")
            msg = c.recv()
            if msg[0] == "failed":
                raise RuntimeError(f"client process {i} failed: {msg[1]}")
            if msg[0] != expect:
                raise RuntimeError(f"client process {i}: expected {expect!r}, got {msg[0]!r}")
            out.append(msg[1])
        return out

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(("quit",))
        for p in self.procs:
            p.join(timeout=5)
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


def run_relay(server: Server, clients: Clients, kind: str, args, tag: str) -> dict[str, Any]:
    nprocs = len(clients.conns)
    per_proc = split(args.pairs, nprocs)
    for c, n in zip(clients.conns, per_proc):
        c.send((kind, server.url, tag, n))
    setup = clients.gather("ready", 120)
    if kind == "throughput":
        warm, dur = args.warmup, args.duration
    else:
        warm, dur = args.warmup, args.latency_duration
    t_start = time.monotonic() + 0.3
    t_a, t_b = t_start + warm, t_start + warm + dur
    clients.send_all(("go", t_start, t_a, t_b))
    ours = {os.getpid(), server.proc.pid, server.worker, *clients.pids()}
    try:
        sleep_until(t_a)
        cpu_a, mach_a, other_a = server.cpu(), machine_cpu(), other_cpu_seconds(ours)
        sleep_until(t_b)
        cpu_b, mach_b, other_b = server.cpu(), machine_cpu(), other_cpu_seconds(ours)
    except OSError:
        server.check_worker()  # raises, naming the change and with the log tail
        raise
    wall = t_b - t_a
    results = clients.gather("result", args.drain_grace + PHASE_SLACK)
    server.check_worker()
    samples = sorted(s for r in results for s in r["samples"])
    out = {
        "setup_seconds": max(setup),
        "window_seconds": wall,
        "sent": sum(r["sent"] for r in results),
        "received": sum(r["received"] for r in results),
        "in_window": sum(r["in_window"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "unexpected": sum(r["unexpected"] for r in results),
        "bad_from": sum(r["bad_from"] for r in results),
        "connection_failures": [f for r in results for f in r["connection_failures"]][:5],
        "connection_failure_count": sum(r["connection_failure_count"] for r in results),
        "server_cpu": cpu_b - cpu_a,
        "client_cpu": [r["client_cpu"] for r in results],
        "machine_busy_cores": (mach_b[0] - mach_a[0]) / wall,
        "machine_cores": (mach_b[1] - mach_a[1]) / wall,
    }
    out["lost"] = out["sent"] - out["received"]
    out["rate"] = out["in_window"] / wall
    out["server_util"] = out["server_cpu"] / wall
    out["client_util"] = [c / wall for c in out["client_cpu"]]
    out["other_busy_cores"] = max(0.0, other_b - other_a) / wall
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
    else:
        out["msgs_per_cpu_s"] = (out["in_window"] / out["server_cpu"]
                                 if out["server_cpu"] > 0 else float("nan"))
    out["bottleneck"] = bottleneck(out) if kind == "throughput" else None
    return out


def bottleneck(r: dict[str, Any]) -> str:
    srv, cli = r["server_util"], r["client_util"]
    busy = r["machine_busy_cores"]
    parts = [f"server worker {srv:.0%} of a core", "clients " +
             "/".join(f"{c:.0%}" for c in cli), f"machine {busy:.2f}/"
             f"{r['machine_cores']:.0f} cores busy (other processes {r['other_busy_cores']:.2f})"]
    used = srv + sum(cli) + r["other_busy_cores"]
    if srv >= 0.9:
        verdict = "server worker (one core) saturated"
    elif cli and max(cli) >= 0.9:
        verdict = "a client process saturated (client-bound)"
    elif max(busy, used) >= 0.85 * r["machine_cores"]:
        verdict = ("machine CPU saturated (server, clients and other processes share the "
                   "cores)")
    else:
        verdict = "nothing CPU-saturated (window/latency-bound)"
    return f"{verdict}: " + ", ".join(parts)


def run_memory(server: Server, clients: Clients, args, tag: str) -> dict[str, Any]:
    per_proc = split(args.idle, len(clients.conns))
    time.sleep(args.settle)
    before = server.rss_kb()
    t0 = time.monotonic()
    for c, k in zip(clients.conns, per_proc):
        c.send(("memory", server.url, tag, k))
    setup = clients.gather("ready", 180)
    open_seconds = time.monotonic() - t0
    time.sleep(args.settle)
    after = server.rss_kb()
    online = server.health().get("online")
    clients.send_all(("close",))
    results = clients.gather("result", 60)
    time.sleep(args.settle)
    after_close = server.rss_kb()
    server.check_worker()
    return {
        "idle": args.idle,
        "opened": sum(r["opened"] for r in results),
        "online_reported": online,
        "open_seconds": open_seconds,
        "client_setup_seconds": max(setup),
        "rss_before_kb": before,
        "rss_after_kb": after,
        "rss_after_close_kb": after_close,
        "kb_per_conn": (after - before) / args.idle,
        "close_seconds": max(r["close_seconds"] for r in results),
    }


def run_server(name: str, clients: Clients, args, log_dir: Path) -> dict[str, Any]:
    """One round against one server: start it, warm up, memory, throughput, latency, stop."""
    server = Server(name, log_dir, args.deflate)
    result: dict[str, Any] = {"command": server.command_line(), "log": str(server.log_path)}
    print(f"[{name}] starting: {server.command_line()}  (port {server.port})", flush=True)
    try:
        server.start()
        result["worker_pid"] = server.worker
        tag = f"{name}{server.port}"
        clients.send_all(("warmup", server.url, tag + "w"))
        clients.gather("result", 30)
        if args.idle > 0:
            result["memory"] = m = run_memory(server, clients, args, tag + "m")
            print(f"[{name}] memory: {m['kb_per_conn']:.1f} kB/conn over {m['opened']} idle "
                  f"(RSS {m['rss_before_kb']/1024:.1f} -> {m['rss_after_kb']/1024:.1f} MB, "
                  f"{m['rss_after_close_kb']/1024:.1f} MB after close; "
                  f"opened in {m['open_seconds']:.1f}s)", flush=True)
        result["throughput"] = t = run_relay(server, clients, "throughput", args, tag + "t")
        print(f"[{name}] throughput: {t['rate']:.0f} msg/s, {t['msgs_per_cpu_s']:.0f} msg per "
              f"server CPU-s, lost={t['lost']} errors={t['errors']}; {t['bottleneck']}",
              flush=True)
        result["latency"] = lat = run_relay(server, clients, "latency", args, tag + "l")
        print(f"[{name}] latency @ {args.rate:g} msg/s: p50 {lat['p50_ms']:.2f} ms, p99 "
              f"{lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms ({lat['samples']} samples, "
              f"achieved {lat['rate']:.0f} msg/s, lost={lat['lost']}; other processes "
              f"{lat['other_busy_cores']:.2f} cores)", flush=True)
        result["rss_end_kb"] = server.rss_kb()
    except Exception as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {result['failure']}", flush=True)
    finally:
        server.stop()
    result["log_findings"] = scan_log(server.log())
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


def table(res: dict[str, list[dict[str, Any]]], args) -> str:
    """Each figure is the median over rounds (one round: the value itself)."""
    def get(name: str, *path: str) -> Any:
        return median([lookup(r, path) for r in res.get(name, [])])

    def total(name: str, key: str) -> int | None:
        rounds = res.get(name, [])
        vals = [lookup(r, (ph, key)) for r in rounds for ph in ("throughput", "latency")]
        return sum(vals) if rounds and all(v is not None for v in vals) else None

    rows = [
        ("relay throughput (msg/s, at receivers)", ("throughput", "rate"), ",.0f"),
        ("server worker CPU used (s, in window)", ("throughput", "server_cpu"), ".2f"),
        ("server worker CPU utilisation (cores)", ("throughput", "server_util"), ".2f"),
        ("msgs relayed per server CPU-second", ("throughput", "msgs_per_cpu_s"), ",.0f"),
        (f"latency p50 (ms) @ {args.rate:g} msg/s", ("latency", "p50_ms"), ".2f"),
        (f"latency p99 (ms) @ {args.rate:g} msg/s", ("latency", "p99_ms"), ".2f"),
        (f"latency max (ms) @ {args.rate:g} msg/s", ("latency", "max_ms"), ".2f"),
        ("latency run: achieved rate (msg/s)", ("latency", "rate"), ",.0f"),
        ("latency run: server CPU utilisation (cores)", ("latency", "server_util"), ".2f"),
        (f"idle memory per registered conn (kB, K={args.idle})", ("memory", "kb_per_conn"),
         ".1f"),
        ("worker RSS with K idle conns (MB)", ("memory", "rss_after_kb"), None),
        ("lost messages (throughput + latency, all rounds)", None, "d"),
        ("error replies received (all rounds)", None, "d"),
    ]
    lines = ["| figure | Volli | baseline | ratio (Volli/baseline) |",
             "|---|---:|---:|---:|"]
    for label, path, spec in rows:
        if path is None:
            key = "lost" if label.startswith("lost") else "errors"
            vals = [total(name, key) for name in ("volli", "baseline")]
            lines.append(f"| {label} | {fmt(vals[0], spec)} | {fmt(vals[1], spec)} | - |")
            continue
        v, b = get("volli", *path), get("baseline", *path)
        if spec is None:  # kB -> MB
            v = v / 1024 if v is not None else None
            b = b / 1024 if b is not None else None
            spec = ".1f"
        lines.append(f"| {label} | {fmt(v, spec)} | {fmt(b, spec)} | {ratio(v, b)} |")
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
    ap.add_argument("--rate", type=float, default=2000.0,
                    help="total offered rate in the latency run (msg/s)")
    ap.add_argument("--max-messages", type=int, default=2_000_000,
                    help="cap on offers per sender (throughput) / per process (latency)")
    ap.add_argument("--idle", type=int, default=1000,
                    help="K: idle registered connections for the memory figure (0 = skip)")
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
    ap.add_argument("--only", choices=["volli", "baseline"], help="run one server only")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH")
    ap.add_argument("--log-dir", metavar="DIR",
                    help="where gunicorn logs go (default: a new directory under $TMPDIR)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 10 pairs, 1 s windows, 500 msg/s, K=100 "
                         "(options given explicitly still win)")
    if ap.parse_known_args(argv)[0].quick:  # new defaults; explicit options still win
        ap.set_defaults(pairs=10, duration=1.0, latency_duration=1.0, warmup=0.3, rate=500.0,
                        idle=100, settle=0.3, drain_grace=2.0)
    args = ap.parse_args(argv)
    for name in ("pairs", "procs", "window", "max_messages", "connect_concurrency", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.procs > args.pairs:
        ap.error("--procs must not exceed --pairs")
    if min(args.duration, args.latency_duration, args.rate) <= 0:
        ap.error("durations and --rate must be positive")

    os.chdir(ROOT)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.pairs + args.idle + 256
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, 65536))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        ap.error(f"open-file limit {soft} is below the {need} this run needs")

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="volli-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    opts = {"deflate": args.deflate, "sdp_size": args.sdp_size, "window": args.window,
            "rate": args.rate, "procs": args.procs, "max_messages": args.max_messages,
            "connect_concurrency": args.connect_concurrency, "drain_grace": args.drain_grace}
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
    names = [n for n in ("volli", "baseline") if not args.only or n == args.only]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    interrupted = False
    try:
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f"--- round {rnd + 1}/{args.rounds}", flush=True)
            for name in (names if rnd % 2 == 0 else names[::-1]):
                results[name].append(run_server(name, clients, args, log_dir))
                if results[name][-1].get("failure"):
                    # A client process may still be in the failed phase: start afresh.
                    clients.stop()
                    clients = Clients(args.procs, opts)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", file=sys.stderr)
    finally:
        clients.stop()
    elapsed = time.monotonic() - started

    print()
    print(table(results, args))
    print()
    problems, noise = [], []
    for name, rounds in results.items():
        for i, r in enumerate(rounds):
            where = f"{name}" + (f" round {i + 1}" if len(rounds) > 1 else "")
            t = r.get("throughput") or {}
            if t.get("bottleneck"):
                print(f"- {where} throughput run: {t['bottleneck']}")
            lat = r.get("latency") or {}
            if lat:
                print(f"- {where} latency run: server worker {lat['server_util']:.0%} of a core, "
                      f"client {'/'.join(f'{c:.0%}' for c in lat['client_util'])}, pacer lag "
                      f"p99 {lat['pacer_lag_p99_ms']:.2f} ms / max {lat['pacer_lag_max_ms']:.2f} "
                      f"ms (how late the client sent; the stamp is taken at the real send)")
            if r.get("failure"):
                problems.append(f"{where}: run failed: {r['failure']}")
            for phase in ("throughput", "latency"):
                p = r.get(phase) or {}
                for key in ("lost", "errors", "unexpected", "bad_from"):
                    if p.get(key):
                        problems.append(f"{where} {phase}: {key}={p[key]}")
                if p.get("connection_failure_count"):
                    problems.append(f"{where} {phase}: {p['connection_failure_count']} client "
                                    f"connections failed, e.g. {p['connection_failures']}")
                if p.get("other_busy_cores", 0) > NOISY_CORES:
                    noise.append(f"{where} {phase}: other processes kept "
                                 f"{p['other_busy_cores']:.2f} cores busy")
            m = r.get("memory") or {}
            if m and m.get("online_reported") not in (None, m["opened"]):
                problems.append(f"{where} memory: server reported {m['online_reported']} "
                                f"online, expected {m['opened']}")
            for label, finding in (r.get("log_findings") or {}).items():
                if label == "close codes (volli log)":
                    unusual = {c: n for c, n in finding.items() if c not in ("1000", "1001")}
                    if unusual:
                        problems.append(f"{where} log: unusual close codes {unusual}")
                    continue
                problems.append(f"{where} log: {label} x{finding['count']}:\n"
                                f"{finding['excerpt']}")
    if noise:
        print("\nNOISE (the machine was shared; compare ratios with care, or re-run):")
        for n in noise:
            print(f"- {n}")
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print(f"- {p}")
    print(f"\ntotal {elapsed:.0f}s; gunicorn logs: {log_dir}")
    if args.json:
        summary = {name: {
            "throughput_msgs_per_s": median([lookup(r, ("throughput", "rate")) for r in rs]),
            "msgs_per_server_cpu_s": median([lookup(r, ("throughput", "msgs_per_cpu_s"))
                                             for r in rs]),
            "latency_p50_ms": median([lookup(r, ("latency", "p50_ms")) for r in rs]),
            "latency_p99_ms": median([lookup(r, ("latency", "p99_ms")) for r in rs]),
            "latency_max_ms": median([lookup(r, ("latency", "max_ms")) for r in rs]),
            "idle_kb_per_conn": median([lookup(r, ("memory", "kb_per_conn")) for r in rs]),
        } for name, rs in results.items()}
        if "volli" in summary and "baseline" in summary:
            summary["ratio_volli_over_baseline"] = {
                k: (v / summary["baseline"][k]) if v and summary["baseline"][k] else None
                for k, v in summary["volli"].items()}
        payload = {"args": vars(args), "elapsed_seconds": elapsed, "cpus": os.cpu_count(),
                   "python": sys.version.split()[0], "summary": summary,
                   "results": results, "problems": problems, "noise": noise}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"results written to {args.json}")
    if interrupted:
        return 130
    return 1 if any(r.get("failure") for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
