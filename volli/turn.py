"""TURN credentials in the TURN REST API scheme of coturn's ``use-auth-secret``.

username = "<expiry unix time>:<userId>", credential = base64(HMAC-SHA1(secret, username)).
The TURN server recomputes the credential from its copy of the secret and refuses expired
usernames, so Volli never talks to it. Pure functions: the caller passes the time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any


def credential(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def ice_servers(secret: str, uris: list[str], user_id: str, ttl: int,
                now: float) -> list[dict[str, Any]]:
    """RTCIceServer dicts, as RTCPeerConnection({iceServers}) takes them."""
    stun = [uri for uri in uris if uri.startswith("stun")]
    turn = [uri for uri in uris if not uri.startswith("stun")]
    servers: list[dict[str, Any]] = []
    if stun:
        servers.append({"urls": stun})
    if turn:
        username = f"{int(now) + ttl}:{user_id}"
        servers.append({"urls": turn, "username": username,
                        "credential": credential(secret, username)})
    return servers
