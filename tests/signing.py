"""A client's Ed25519 identity for tests: key pair and the signatures the protocol asks for."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import Client
from volli.protocol import identity


def signed_client(url: str, user_id: str, seed: bytes) -> Client:
    """A raw client registered as ``user_id`` with the Ed25519 key of ``seed``."""
    client = Client(url)
    reply = Identity(seed).register(client, user_id)
    assert reply["type"] == "registered", reply
    return client


class Identity:
    """A client's Ed25519 key pair and the signatures the protocol asks for."""

    def __init__(self, seed: bytes | None = None) -> None:
        self.key = (Ed25519PrivateKey.from_private_bytes(seed) if seed
                    else Ed25519PrivateKey.generate())
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
        self.public = base64.b64encode(raw).decode()

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self.key.sign(payload)).decode()

    def register(self, client: Client, user_id: str, nonce: str | None = None,
                 spelling: str | None = None) -> dict:
        """``spelling``: the public key written another way (URL-safe, unpadded)."""
        nonce = nonce or client.nonce
        reply = client.call({"type": "register", "userId": user_id,
                             "publicKey": spelling or self.public,
                             "signature": self.sign(identity.register_payload(nonce, user_id))})
        if reply["type"] == "registered":
            client.nonce = reply["nonce"]
        return reply
