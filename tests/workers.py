"""Which gunicorn worker holds which user (read from the servers' logs) or which connection
(from /proc)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from conftest import Client, Server

REGISTERED = re.compile(r"\[(\d+)\] \[INFO\] volli\.hub: registered user=(\S+) id=")


def worker_of(servers: list[Server]) -> dict[str, int]:
    """userId -> pid of the worker that registered it, from the servers' logs."""
    return {user: int(pid) for srv in servers for pid, user in REGISTERED.findall(srv.log())}


def spread_users(servers, open_client, workers_total: int, limit: int = 80):
    """Register users alternately on the servers until every worker holds one.
    Returns {userId: client} with one user per worker, and the full userId->pid map."""
    clients: dict[str, Client] = {}
    for i in range(limit):
        user = f"u{i}@volli.app"
        clients[user] = open_client(servers[i % len(servers)])
        clients[user].register(user, public_key=f"key{i}")
        if i % 4 == 3 or i == limit - 1:
            deadline = time.monotonic() + 5
            while len(worker_of(servers)) < len(clients) and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = worker_of(servers)
            if len(set(pids.values())) == workers_total:
                break
    pids = worker_of(servers)
    assert len(set(pids.values())) == workers_total, f"users landed on {set(pids.values())}"
    one_per_worker = {}
    for user, pid in pids.items():
        one_per_worker.setdefault(pid, user)
    return {user: clients[user] for user in one_per_worker.values()}, pids


def worker_pids(srv: Server) -> list[int]:
    """The gunicorn workers of ``srv`` (children of its master), from /proc."""
    return sorted(int(pid) for task in Path(f"/proc/{srv.proc.pid}/task").iterdir()
                  for pid in (task / "children").read_text().split())


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def worker_of_connections(srv: Server, client_ports: list[int]) -> dict[int, int]:
    """client port -> pid of the worker of ``srv`` that holds that (loopback) connection,
    from /proc/net/tcp (the server side's socket inode) and the workers' open fds."""
    wanted = {f"0100007F:{port:04X}": port for port in client_ports}
    server_end = f"0100007F:{srv.port:04X}"
    inode_of: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == server_end and fields[2] in wanted:
            inode_of[fields[9]] = wanted[fields[2]]
    found: dict[int, int] = {}
    for pid in worker_pids(srv):
        for inode in _socket_inodes(pid) & inode_of.keys():
            found[inode_of[inode]] = pid
    return found


def client_port(client: Client) -> int:
    return client.ws.socket.getsockname()[1]
