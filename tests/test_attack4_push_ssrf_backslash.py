"""SSRF through the push allow-list: a backslash in the endpoint's authority.

``volli.push.origin_allowed`` decides where pushes may go with ``urllib.parse.urlsplit``,
but the request is sent by pywebpush -> requests -> urllib3, which parse the URL
differently: urllib3 ends the authority at a backslash (WHATWG style), while
``urlsplit`` reads up to the next ``/``, and takes the host after the last ``@``. So an
endpoint such as ``https://ATTACKER\\@fcm.googleapis.com/x`` passes
``origin_allowed`` (its "hostname" is fcm.googleapis.com) and ``_endpoint`` (a backslash
is printable), and pywebpush's VAPID ``aud`` check (``^https?://[^/:]+(:\\d+)?$``, which
allows ``\\`` and ``@``) too, and the server then POSTs the push to ``ATTACKER`` on the
scheme's default port (requests encodes the backslash into the path:
``https://ATTACKER/%5C@fcm.googleapis.com/x``). (An explicit port on the attacker's side
is stopped only by that ``aud`` regex, by luck.)

Impact: any signed user (anyone can sign for a fresh ID) makes the server send
requests to a host and port of its choosing (internal addresses included: 127.0.0.1,
169.254.169.254, ...) whenever an offer is held for it, which any other connection can
trigger at will: exactly what docs/protocol.md section 5d says cannot happen ("no client
can make the server send requests to a host of its choosing").

Fix: validate the endpoint with the same parser that sends (``urllib3.util.parse_url``)
or, simpler, refuse any endpoint with a ``\\``, ``@`` (userinfo) or other character
outside RFC 3986 in it, and compare scheme/host/port on the parsed result; ideally also
re-check the URL right before sending.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from push_service import Subscription
from signing import Identity
from volli.push import generate_keys


class Attacker:
    """Any HTTP server the attacker wants the signaling server to hit."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        attacker = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                attacker.hits.append(self.path)
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        # Port 80 (the scheme's default): the test runs as root here; 127.0.0.7 to stay
        # clear of anything on 127.0.0.1:80.
        self._server = ThreadingHTTPServer(("127.0.0.7", 80), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_backslash_endpoint_cannot_reach_an_unlisted_host(make_server, open_client):
    attacker = Attacker()
    try:
        private, _ = generate_keys()
        # The only allowed push service; it does not even resolve.
        srv = make_server({"VOLLI_VAPID_PRIVATE_KEY": private,
                           "VOLLI_PUSH_SERVICES": "http://push.invalid"})
        bob = open_client(srv)
        assert Identity().register(bob, "bob@volli.app")["type"] == "registered"
        endpoint = "http://127.0.0.7\\@push.invalid/push/phone"
        sub = {**Subscription(endpoint).json, "endpoint": endpoint}
        reply = bob.call({"type": "push-subscribe", "subscription": sub})
        bob.close()
        # Anyone holds an offer for bob: the server wakes bob's "push service".
        alice = open_client(srv)
        alice.register("alice@volli.app")
        alice.send({"type": "offer", "to": "bob@volli.app", "hold": 30,
                    "offer": {"type": "offer", "sdp": "v=0"}})
        assert alice.recv()["type"] == "held"
        deadline = time.monotonic() + 5
        while not attacker.hits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert attacker.hits == [], (
            f"the server POSTed to 127.0.0.7:80, not on VOLLI_PUSH_SERVICES "
            f"(subscribe answered {reply}); paths: {attacker.hits}")
        assert reply["type"] == "error" and reply["code"] == "invalid-message", reply
    finally:
        attacker.close()
