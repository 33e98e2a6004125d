"""Machine, version and repo facts stored with every bench result (bench/results/*.json),
and the report and results file every bench ends with."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("gevent", "greenlet", "gunicorn", "flask", "flask-sock", "simple-websocket",
            "wsproto", "orjson", "websockets", "redis")


def _run(cmd: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def machine_info() -> dict[str, Any]:
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping", "cpu MHz") \
                    and key not in cpu:
                cpu[key] = value.strip()
            if not line.strip() and cpu:
                break
    cpu_model = cpu.get("model name")
    mem_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    sysctl = {}
    for name in ("net/ipv4/ip_local_port_range", "net/core/somaxconn", "fs/nr_open",
                 "net/ipv4/tcp_max_syn_backlog"):
        with contextlib.suppress(OSError):
            sysctl[name.replace("/", ".")] = Path(f"/proc/sys/{name}").read_text().split()
    return {
        "cpu_model": cpu_model,
        "cpu": cpu,
        "hypervisor": "hypervisor" in Path("/proc/cpuinfo").read_text(),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "sysctl": sysctl,
        "load_average": list(os.getloadavg()),
    }


def versions(peerjs_pkg: Path | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["volli"] = None
    for dist in ("volli-signaling", "volli"):
        try:
            out["volli"] = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    node = shutil.which("node")
    out["node"] = _run([node, "--version"]) if node else None
    if peerjs_pkg is not None:
        with contextlib.suppress(OSError, ValueError):
            out["peer"] = json.loads((peerjs_pkg / "package.json").read_text()).get("version")
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    line = _run([redis, "--version"]) if os.path.exists(redis) else None
    out["redis-server"] = next((w[2:] for w in (line or "").split() if w.startswith("v=")),
                               line)
    return out


def repo_info() -> dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty_paths": status.splitlines() if status else []}


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def describe(peerjs_pkg: Path | None = None) -> dict[str, Any]:
    return {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": versions(peerjs_pkg), "repo": repo_info()}


def default_result_path(kind: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{utc_stamp()}-{kind}.json"


def export_tree(ref: str, dest: Path) -> str:
    """Write the server's files (volli/, wsgi.py, gunicorn.conf.py) as committed at ``ref``
    into ``dest``; returns the commit. Read-only for the repo (git archive)."""
    import io
    import tarfile

    commit = _run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"])
    if not commit:
        raise RuntimeError(f"not a commit: {ref!r}")
    done = subprocess.run(["git", "archive", "--format=tar", commit, "--", "volli", "wsgi.py",
                           "gunicorn.conf.py"], capture_output=True, timeout=60, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"git archive failed: {done.stderr.decode(errors='replace')}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return commit


SERVER_PATHS = ("volli", "wsgi.py", "gunicorn.conf.py")


def add_run_options(ap, kind: str) -> None:
    """The options every Volli bench takes: which code runs, where results and logs go."""
    ap.add_argument("--volli-ref", metavar="REF",
                    help="run Volli as committed at this git ref (exported with git archive "
                         "into the log directory) instead of the working tree")
    ap.add_argument("--json", metavar="PATH",
                    help=f"results file (default bench/results/<UTC>-{kind}.json)")
    ap.add_argument("--no-save", action="store_true", help="write no JSON unless --json")
    ap.add_argument("--log-dir", metavar="DIR",
                    help="where server logs go (default: a new directory under $TMPDIR)")


def interrupt_on_signals() -> None:
    """SIGTERM (and SIGINT unless ignored) raise KeyboardInterrupt, so a run cleans up its
    servers on the way out."""
    import signal

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)


def server_code(ref: str | None, log_dir: Path, notes: list[str]) -> tuple[Path | None,
                                                                       str | None,
                                                                       dict[str, Any] | None]:
    """The Volli code a bench runs: ``ref`` exported into ``log_dir/volli-tree`` (returns
    that tree and its commit), else the working tree (returns its state, and notes
    uncommitted changes, whose figures are not those of any commit)."""
    if ref:
        tree = log_dir / "volli-tree"
        commit = export_tree(ref, tree)
        print(f"Volli server code: {ref} = {commit} (exported to {tree})", flush=True)
        return tree, commit, None
    state = server_tree_state()
    if state["dirty"]:
        notes.append(f"Volli ran from the working tree with uncommitted changes "
                     f"({', '.join(state['dirty'][:5])}): the figures are not those of the "
                     f"recorded commit (use --volli-ref HEAD for that)")
    return None, None, state


def server_tree_state(root: Path = ROOT) -> dict[str, Any]:
    """The server's files in the working tree: uncommitted paths, and a digest of their
    contents, so a run can tell whether they changed while it ran."""
    import hashlib

    h = hashlib.sha256()
    for rel in SERVER_PATHS:
        base = root / rel
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            with contextlib.suppress(OSError):
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    dirty = [p[3:] for p in repo_info()["dirty_paths"]
             if p[3:].startswith("volli/") or p[3:] in SERVER_PATHS]
    return {"digest": h.hexdigest(), "dirty": dirty}


def log_problems(where: str, findings: dict[str, Any] | None) -> list[str]:
    """PROBLEMS lines for what scan_log found in a server's log: unusual close codes,
    tracebacks and warnings."""
    problems = []
    for label, finding in (findings or {}).items():
        if label == "close codes (volli log)":
            unusual = {c: n for c, n in finding.items() if c not in ("1000", "1001")}
            if unusual:
                problems.append(f"{where} log: unusual close codes {unusual}")
            continue
        problems.append(f"{where} log: {label} x{finding['count']}:\n{finding['excerpt']}")
    return problems


def print_report(noise: list[str], problems: list[str], elapsed: float, log_dir) -> None:
    """The NOISE and PROBLEMS lists and the closing line every bench prints."""
    if noise:
        print("\nNOISE (the machine was shared; compare ratios with care, or re-run):")
        for line in noise:
            print(f"- {line}")
    if problems:
        print("\nPROBLEMS:")
        for line in problems:
            print(f"- {line}")
    print(f"\ntotal {elapsed:.0f}s; server logs: {log_dir}")


def save_results(args, kind: str, payload: Callable[[], dict[str, Any]]) -> None:
    """Write ``payload()`` as JSON to --json, or bench/results/ unless --no-save."""
    path = Path(args.json) if args.json else (
        None if args.no_save else default_result_path(kind))
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": kind, **payload()}, indent=2, default=str))
    print(f"results written to {path}")
