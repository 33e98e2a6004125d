"""CPU and memory of processes and of the machine, from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
