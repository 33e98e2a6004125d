"""Client processes: the parent's handle on them (Clients), and what the parent and both
load generators (aioclient, leanclient) share: the parent's messages, the placement of
cross-worker pairs, a phase's totals."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from typing import Any, Callable

CROSS_STEPS = 10  # rounds of "open more connections" when placing cross-worker pairs
CROSS_EXTRA = 5  # at most this many times 2 x pairs extra connections for that placement


class Clients:
    """``nprocs`` client processes running ``main(conn, index, opts)``, each with a pipe to
    the parent."""

    def __init__(self, nprocs: int, opts: dict[str, Any], main: Callable[..., None],
                 name: str = "relay-client") -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(nprocs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=main, args=(child, i, opts), daemon=True,
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


def wait_parent(conn, expect: str | tuple[str, ...], timeout: float):
    """Block (the loop is idle here) until the parent sends ``expect`` (or one of them)."""
    if not conn.poll(timeout):
        raise RuntimeError(f"parent sent no {expect!r} within {timeout}s")
    msg = conn.recv()
    if msg[0] not in ((expect,) if isinstance(expect, str) else expect):
        raise RuntimeError(f"expected {expect!r} from parent, got {msg[0]!r}")
    return msg


def pair_totals(pairs: list, failures: list[str], cpu: dict[str, float]) -> dict[str, Any]:
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
