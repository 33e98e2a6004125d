"""Attack 3 on the transport with permessage-deflate (VOLLI_PERMESSAGE_DEFLATE=true).

ServerProtocol.send_text compresses a relay *before* deciding whether the queue can take
it. When the relay is refused (BUSY: the sender is told peer-busy; or FULL), its bytes
have already gone through the connection's deflate stream. With context takeover (what
a browser's offer negotiates: no server_no_context_takeover), later messages are
compressed against a window holding bytes the receiver never got: the receiver inflates
them into something else, or fails (1007), although every later relay was "delivered".
"""

from __future__ import annotations

import base64
import json
import os

from conftest import Client, Server
from rawclient import RawClient, masked


def _offer(to: str, sdp: str) -> bytes:
    return masked(1, json.dumps({"type": "offer", "to": to,
                                 "offer": {"type": "offer", "sdp": sdp}}).encode())


def test_a_refused_relay_does_not_corrupt_the_receivers_deflate_stream(tmp_path):
    srv = Server(tmp_path, {"WEB_CONCURRENCY": "1", "VOLLI_PERMESSAGE_DEFLATE": "true",
                            "VOLLI_SEND_QUEUE_LIMIT": "49152",
                            "VOLLI_MAX_MESSAGE_SIZE": "32768"})
    try:
        srv.wait_ready()
        receiver = Client(srv.url)  # websockets offers permessage-deflate by default
        assert "permessage-deflate" in (receiver.ws.response.headers.get(
            "Sec-WebSocket-Extensions") or "")
        receiver.register("r@x")
        sender = RawClient(srv.port)
        sender.send_json({"type": "register", "userId": "s@x", "publicKey": "cHVibGljLWtleQ=="})
        assert json.loads(sender.next_message())["type"] == "registered"
        sdps = [base64.b64encode(os.urandom(18000)).decode() for _ in range(4)]
        # One read's worth: the queue takes the first ones, refuses the rest (peer-busy).
        sender.send_raw(b"".join(_offer("r@x", sdp) for sdp in sdps))
        delivered = []
        # Collect what the receiver got of the burst, and the sender's refusals.
        while True:
            try:
                message = receiver.recv(timeout=2)
            except TimeoutError:
                break
            delivered.append(message["offer"]["sdp"])
        replies = []
        try:
            while True:
                replies.append(json.loads(sender.next_message(deadline=1)))
        except TimeoutError:
            pass
        busy = sum(1 for r in replies if r and r.get("code") == "peer-busy")
        assert busy >= 1, (replies, len(delivered))
        assert delivered == sdps[:len(delivered)]
        refused = sdps[len(delivered)]
        # The sender retries the refused relay later, as peer-busy asks it to.
        sender.send_raw(_offer("r@x", refused))
        message = receiver.recv(timeout=5)
        got = message["offer"]["sdp"]
        same = next((i for i, (a, b) in enumerate(zip(got, refused)) if a != b), None)
        assert got == refused, (
            f"{len(delivered)} relays of the burst delivered, {busy} refused peer-busy; the "
            f"retried relay arrived corrupted: {len(got)} chars vs {len(refused)}, first "
            f"difference at {same}")
    finally:
        srv.stop()
