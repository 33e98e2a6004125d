"""A real Web Push service for the tests (RFC 8030), on loopback: it checks each push's
VAPID token (RFC 8292: ES256 by the server's key, ``aud``, ``exp``, ``sub``) and decrypts
its payload (RFC 8291, aes128gcm) with the subscription's private key, as a browser's push
service and browser would. Endpoints are ``<url>/push/<name>``; an endpoint can be told
to answer 404 or 410 (the subscription is gone)."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_ece
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Subscription:
    """A browser's PushSubscription: its keys, and ``toJSON()``."""

    def __init__(self, endpoint: str) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        self.json = {"endpoint": endpoint, "keys": {"p256dh": b64url(point),
                                                    "auth": b64url(self.auth)}}


class PushService:
    def __init__(self, vapid_public_key: str, subject: str) -> None:
        self.vapid_public_key, self.subject = vapid_public_key, subject
        self.subscriptions: dict[str, Subscription] = {}
        self.status: dict[str, int] = {}  # name -> the status its endpoint answers
        self.received: list[dict] = []  # {name, payload (dict), claims, ttl}
        self.refused: list[str] = []  # why a push was refused
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                name = self.path.rsplit("/", 1)[-1]
                try:
                    service._accept(name, self.headers, body)
                    status = service.status.get(name, 201)
                except Exception as exc:  # the push was wrong: say why, answer 400
                    with service._lock:
                        service.refused.append(f"{name}: {exc!r}")
                    status = 400
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def subscription(self, name: str) -> Subscription:
        sub = self.subscriptions[name] = Subscription(f"{self.url}/push/{name}")
        return sub

    def _accept(self, name: str, headers, body: bytes) -> None:
        scheme, _, params = headers["Authorization"].partition(" ")
        assert scheme == "vapid", headers["Authorization"]
        fields = dict(part.strip().split("=", 1) for part in params.split(","))
        assert fields["k"] == self.vapid_public_key, "signed by another key"
        claims = self._verify(fields["t"])
        assert claims["aud"] == self.url, claims
        assert time.time() < claims["exp"] <= time.time() + 24 * 3600, claims
        assert claims["sub"] == self.subject, claims
        assert headers["Content-Encoding"] == "aes128gcm", headers["Content-Encoding"]
        sub = self.subscriptions[name]
        payload = http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth,
                                   version="aes128gcm")
        with self._lock:
            self.received.append({"name": name, "payload": json.loads(payload),
                                  "claims": claims, "ttl": int(headers.get("TTL", 0))})

    def _verify(self, token: str) -> dict:
        """The claims of an ES256 JWT signed by the VAPID key (raises if it is not)."""
        head, claims, signature = token.split(".")
        assert json.loads(unb64url(head)) == {"typ": "JWT", "alg": "ES256"}, unb64url(head)
        raw = unb64url(signature)
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                   int.from_bytes(raw[32:], "big"))
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                           unb64url(self.vapid_public_key))
        key.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
        return json.loads(unb64url(claims))

    def wait(self, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and not self.refused:
            assert time.monotonic() < deadline, f"{len(self.received)} pushes, not {count}"
            time.sleep(0.05)
        assert not self.refused, self.refused
        return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
