"""wss served directly by gunicorn from VOLLI_TLS_CERTFILE / VOLLI_TLS_KEYFILE."""

from __future__ import annotations

import datetime
import json
import ssl
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Client, Server


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_wss_with_a_self_signed_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    srv = Server(tmp_path, {"VOLLI_TLS_CERTFILE": str(cert), "VOLLI_TLS_KEYFILE": str(key)})
    context = ssl.create_default_context(cafile=str(cert))
    try:
        srv.wait_log("Listening at: https://", 20)
        assert "volli ready" in srv.wait_log("volli ready")
        with urllib.request.urlopen(f"https://localhost:{srv.port}/health", context=context,
                                    timeout=5) as response:
            assert json.loads(response.read())["status"] == "ok"
        url = f"wss://localhost:{srv.port}/signaling"
        alice, bob = Client(url, ssl=context), Client(url, ssl=context)
        alice.register("alice@volli.app")
        bob.register("bob@volli.app")
        alice.send({"type": "offer", "to": "bob@volli.app", "offer": {"sdp": "over tls"}})
        assert bob.recv()["offer"] == {"sdp": "over tls"}
        alice.close()
        bob.close()
    finally:
        srv.stop()


def test_half_a_tls_configuration_refuses_to_start(tmp_path):
    cert, _ = self_signed(tmp_path)
    srv = Server(tmp_path, {"VOLLI_TLS_CERTFILE": str(cert)})
    code = srv.wait_exit(30)
    srv.stop()
    assert code != 0
    assert "VOLLI_TLS_CERTFILE and VOLLI_TLS_KEYFILE must be set together" in srv.log()
