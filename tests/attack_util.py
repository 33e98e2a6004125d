"""Shared helpers for the attack tests (tests/test_attack_*.py); their servers come from
conftest's `nodes`."""

from __future__ import annotations

import time

from websockets.exceptions import ConnectionClosed

from conftest import Client


def try_register(client: Client, user: str, key: str = "QQ==", timeout: float = 20) -> dict:
    return client.call({"type": "register", "userId": user, "publicKey": key},
                       timeout=timeout)


def is_open(client: Client, timeout: float = 0.3) -> bool:
    """True if the connection still answers a ping (skipping other frames)."""
    try:
        client.call({"type": "ping"}, timeout=timeout + 2)
        return True
    except (ConnectionClosed, TimeoutError, OSError):
        return False


def drain_frames(client: Client, seconds: float = 0.2) -> list:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(client.recv(timeout=max(0.01, end - time.monotonic())))
        except TimeoutError:
            break
        except ConnectionClosed as exc:
            out.append(("closed", exc.rcvd.code if exc.rcvd else None))
            break
    return out


def relay(client: Client, to: str, wait: float = 0.3, **extra) -> str:
    """Send an offer; 'sent' if no error came back within ``wait``, else the error code."""
    rid = f"r{time.monotonic_ns()}"
    client.send({"type": "offer", "to": to, "offer": extra or {}, "requestId": rid})
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            msg = client.recv(timeout=max(0.01, end - time.monotonic()))
        except TimeoutError:
            break
        if msg.get("requestId") == rid:
            return msg.get("code", msg.get("type"))
    return "sent"
