"""The client's address: the socket peer, or X-Forwarded-For when a proxy is trusted."""

from __future__ import annotations

import ipaddress
from typing import Mapping, Sequence, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def client_ip(environ: Mapping[str, str], trusted: int | Sequence[Network]) -> str:
    """``trusted`` is a hop count (like werkzeug's ProxyFix x_for), or proxy networks:
    X-Forwarded-For is read from the right while each hop is a trusted proxy."""
    peer = environ.get("REMOTE_ADDR", "")
    forwarded = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")
                 if h.strip()]
    if not trusted or not forwarded:
        return peer
    if isinstance(trusted, int):
        return forwarded[-trusted] if len(forwarded) >= trusted else peer
    address = peer
    for hop in reversed(forwarded):
        if not _within(address, trusted):
            break
        address = hop
    return address


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
