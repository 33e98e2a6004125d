"""What one frame sent in tiny writes costs a Volli worker: server CPU seconds.

Starts one gunicorn (the working tree, or the server files of ``--ref`` exported with git
archive) on a free 127.0.0.1 port, opens one WebSocket, sends one masked text frame of
``--size`` bytes (a JSON ping padded to that size) in ``--chunk``-byte writes with
TCP_NODELAY, waits for the pong, and prints the worker's utime + stime (from
/proc/<pid>/stat) spent meanwhile. Each write is usually one read on the server: a parser
that rebuilds its buffer per read is quadratic here (at 238f7aa, about 1.5 s for 256 kB in
1-byte writes). Loopback only; every wait is bounded; the server is stopped on exit.

    .venv/bin/python bench/partial_frames.py                 # the working tree
    .venv/bin/python bench/partial_frames.py --ref 238f7aa   # as committed at a ref
    .venv/bin/python bench/partial_frames.py --ref 238f7aa --parser-only   # the parser alone
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from rawws import OP_TEXT, client_frame  # noqa: E402
from relaybench.procfs import proc_children, proc_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tree: Path, size: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "PYTHONPATH": str(tree),
           "VOLLI_MAX_MESSAGE_SIZE": str(size), "VOLLI_SEND_QUEUE_LIMIT": str(4 * size),
           "VOLLI_IP_MAX_CONNECTIONS": "0", "VOLLI_IP_CONNECT_RATE": "0"}
    env.pop("WEB_CONCURRENCY", None)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                             "wsgi:app"], cwd=tree, env=env, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                if len(proc_children(proc.pid)) == 1:
                    return proc, port
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not answer /health within 30 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def recv_text(sock: socket.socket, buf: bytearray) -> str:
    """The next unmasked text frame from the server (small frames only)."""
    while True:
        if len(buf) >= 2 and buf[1] < 126 and len(buf) >= 2 + buf[1]:
            n = buf[1]
            opcode, payload = buf[0] & 0x0F, bytes(buf[2:2 + n])
            del buf[:2 + n]
            if opcode == OP_TEXT:
                return payload.decode()
            continue
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        buf += data


def run(port: int, worker: int, size: int, chunk: int) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /signaling HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    buf = bytearray(rest)
    assert json.loads(recv_text(sock, buf))["type"] == "hello"
    body = '{"type":"ping","requestId":"pf","pad":"%s"}'
    payload = (body % ("x" * (size - len(body) + 2))).encode()
    data = client_frame(payload)
    cpu0, t0 = proc_cpu_seconds(worker), time.monotonic()
    for i in range(0, len(data), chunk):
        sock.send(data[i:i + chunk])
    sent = time.monotonic()
    reply = json.loads(recv_text(sock, buf))
    cpu1, t1 = proc_cpu_seconds(worker), time.monotonic()
    sock.close()
    return {"frame_bytes": len(data), "chunk": chunk, "writes": -(-len(data) // chunk),
            "reply": reply.get("type") if reply.get("requestId") == "pf" else reply,
            "send_seconds": round(sent - t0, 3), "wall_seconds": round(t1 - t0, 3),
            "worker_cpu_seconds": round(cpu1 - cpu0, 3)}


# --parser-only: the same frame fed to that tree's FrameParser in this many-byte pieces, in
# a process of its own; prints the parser's CPU seconds. The server figure also counts a
# recv and a greenlet switch per read, and its reads coalesce while it is busy, which
# hides most of a quadratic parser; this one does not.
PARSER_ONLY = """
import sys, time
from volli.transport.frames import FrameParser, OP_TEXT
size, chunk = int(sys.argv[1]), int(sys.argv[2])
payload = b'{"type":"ping","pad":"' + b"x" * (size - 26) + b'"}'
data = bytes((0x81, 0xFF)) + len(payload).to_bytes(8, "big") + bytes(4) + payload
parser, events, t0 = FrameParser(size), [], time.process_time()
for i in range(0, len(data), chunk):
    events += parser.feed(data[i:i + chunk])
assert [op for op, _ in events] == [OP_TEXT], events
print(round(time.process_time() - t0, 3))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", help="git ref whose server files to run (default: working tree)")
    ap.add_argument("--size", type=int, default=256 * 1024, help="frame payload bytes")
    ap.add_argument("--chunk", type=int, default=1, help="bytes per write")
    ap.add_argument("--parser-only", action="store_true",
                    help="feed the frame to the parser in-process instead of a server")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="volli-partial-frames-"))
    tree, commit = ROOT, "working tree"
    if args.ref:
        tree = workdir / "tree"
        commit = machine.export_tree(args.ref, tree)
    if args.parser_only:
        done = subprocess.run([sys.executable, "-c", PARSER_ONLY, str(args.size),
                               str(args.chunk)], cwd=tree, env={**os.environ,
                              "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                              timeout=300, check=True)
        print(json.dumps({"server": commit, "frame_bytes": args.size, "chunk": args.chunk,
                          "parser_cpu_seconds": float(done.stdout)}))
        return
    proc, port = start(tree, args.size, workdir / "gunicorn.log")
    try:
        result = run(port, proc_children(proc.pid)[0], args.size, args.chunk)
    finally:
        stop(proc)
    print(json.dumps({"server": commit, **result}))


if __name__ == "__main__":
    main()
