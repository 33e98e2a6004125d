"""wss served directly by gunicorn from VOLLI_TLS_CERTFILE / VOLLI_TLS_KEYFILE."""

from __future__ import annotations

import json
import ssl
import urllib.request

from certs import self_signed
from conftest import Client, Server


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
