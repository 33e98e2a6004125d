"""Web Push wake-up of a callee an offer is held for (docs/protocol.md section 5d).

Each push is an RFC 8030 message with its payload encrypted for the subscription
(RFC 8291, aes128gcm) and signed by this server's VAPID key (RFC 8292), both done by
pywebpush (with http-ece and py-vapid). The payload names the caller and when the held
offer expires, never SDP or candidates. Pushes go from a bounded greenlet pool with a
timeout each; a subscription the push service answers 404 or 410 is removed.

    python -m volli.push generate-keys   # a new VAPID key pair, for VOLLI_VAPID_PRIVATE_KEY
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from typing import Callable

log = logging.getLogger("volli.push")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _vapid(private_key: str):
    from py_vapid import Vapid

    return Vapid.from_raw(private_key.encode())


def public_key(private_key: str) -> str:
    """The VAPID public key clients pass to ``pushManager.subscribe`` (base64url of the
    uncompressed P-256 point)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    point = _vapid(private_key).public_key.public_bytes(Encoding.X962,
                                                         PublicFormat.UncompressedPoint)
    return _b64url(point)


def generate_keys() -> tuple[str, str]:
    """A new VAPID key pair: (private key, for VOLLI_VAPID_PRIVATE_KEY; public key)."""
    from py_vapid import Vapid

    vapid = Vapid()
    vapid.generate_keys()
    private = _b64url(vapid.private_key.private_numbers().private_value.to_bytes(32, "big"))
    return private, public_key(private)


def key_problem(private_key: str) -> str | None:
    """Why ``private_key`` is not a usable VAPID key, or None."""
    try:
        raw = base64.urlsafe_b64decode(private_key + "=" * (-len(private_key) % 4))
        if len(raw) != 32:
            return f"not a P-256 private key: {len(raw)} bytes, not 32"
        public_key(private_key)
    except Exception as exc:  # binascii, py-vapid and cryptography raise several kinds
        return f"not a base64url P-256 private key ({exc.__class__.__name__})"
    return None


class PushSender:
    """Sends incoming-call pushes for one worker. ``remove(userId, endpoint)`` forgets a
    subscription the push service says is gone; ``count(outcome)`` counts each push:
    sent, gone (404/410: removed), failed, or overflow (the pool was full: not sent)."""

    def __init__(self, settings, remove: Callable[[str, str], None],
                 count: Callable[[str], None]) -> None:
        self.enabled = bool(settings.vapid_private_key)
        self._vapid = _vapid(settings.vapid_private_key) if self.enabled else None
        self.public_key = public_key(settings.vapid_private_key) if self.enabled else None
        self._subject = settings.vapid_subject
        self._timeout = settings.push_timeout
        self._size = settings.push_concurrency
        self._remove, self._count = remove, count
        self._pool = None

    def start(self) -> None:
        """In the worker, after gevent patched (pywebpush's requests is then cooperative)."""
        import gevent.pool

        self._pool = gevent.pool.Pool(self._size)

    def incoming_call(self, callee: str, caller: str, expires_in: int,
                      subscriptions: list[dict]) -> None:
        """Push to each of ``callee``'s subscriptions that ``caller`` calls, held for
        ``expires_in`` seconds. Never blocks: a push the pool has no room for is counted
        as overflow and not sent."""
        payload = json.dumps({"type": "incoming-call", "from": caller, "to": callee,
                              "expiresAt": int((time.time() + expires_in) * 1000)})
        for subscription in subscriptions:
            if self._pool is None:  # not started (no greenlets): send right here
                self._send(callee, subscription, payload, expires_in)
            elif self._pool.full():
                self._count("overflow")
            else:
                self._pool.spawn(self._send, callee, subscription, payload, expires_in)

    def _send(self, callee: str, subscription: dict, payload: str, ttl: int) -> None:
        from pywebpush import WebPushException, webpush

        try:  # webpush fills in aud and exp: a fresh claims dict each time
            webpush(subscription, payload, vapid_private_key=self._vapid,
                    vapid_claims={"sub": self._subject}, timeout=self._timeout, ttl=ttl)
        except WebPushException as exc:
            status = getattr(exc.response, "status_code", None)
            if status in (404, 410):
                self._count("gone")
                self._remove(callee, subscription["endpoint"])
                return
            self._count("failed")
            log.warning("push to %s for %s failed: %s", _origin(subscription), callee,
                        status or exc)
        except Exception as exc:  # a timeout, a refused connection, DNS
            self._count("failed")
            log.warning("push to %s for %s failed: %r", _origin(subscription), callee, exc)
        else:
            self._count("sent")


def origin_allowed(endpoint: str, services: str) -> bool:
    """Whether ``endpoint`` is at one of ``services`` (VOLLI_PUSH_SERVICES: origins, a
    ``*.`` host matching its subdomains): only there does the server send requests."""
    from urllib.parse import urlsplit

    from urllib3.util import parse_url

    try:
        parts, sent = urlsplit(endpoint), parse_url(endpoint)  # ours, and the sender's
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if (parts.username is not None or sent.auth is not None or (sent.host or "") != host
            or sent.port != port or sent.scheme != parts.scheme):
        return False  # the two parsers disagree on where it goes: refused
    for service in (s.strip().lower() for s in services.split(",") if s.strip()):
        scheme, _, rest = service.partition("://")
        want_host, _, want_port = rest.partition(":")
        if scheme != parts.scheme or (str(port or "") != want_port):
            continue
        if host == want_host or (want_host.startswith("*.") and host.endswith(want_host[1:])):
            return True
    return False


def _origin(subscription: dict) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(subscription.get("endpoint", ""))
    return f"{parts.scheme}://{parts.netloc}"


def main(argv: list[str]) -> int:
    if argv != ["generate-keys"]:
        print("usage: python -m volli.push generate-keys", file=sys.stderr)
        return 2
    private, public = generate_keys()
    print(f"VOLLI_VAPID_PRIVATE_KEY={private}")
    print(f"# public key (served at /push/vapid-public-key): {public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
