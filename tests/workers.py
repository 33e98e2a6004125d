"""Which gunicorn worker holds which user, read from the servers' logs."""

from __future__ import annotations

import re
import time

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
