"""The seam between flask-sock and Volli's transport, kept as small as it can be.

flask-sock builds a ``simple_websocket.Server`` for ``/signaling``; its constructor answers
the opening handshake (through wsproto) on ``environ["gunicorn.socket"]`` and then starts
its reader "thread". Volli lets it do only the first: the thread class it is given never
starts, and the socket then belongs to ``Connection`` (its own frame layer). Each
assumption this makes about flask-sock, simple-websocket, wsproto and gunicorn has a test
in ``tests/test_transport_handshake.py``.

Also here, before any of that runs: what RFC 6455 4.2.1 (and wsproto) require of the
request, and the one Upgrade token wsproto accepts.
"""

from __future__ import annotations

import _socket
import base64
import binascii
import ssl


class HandshakeOnly:
    """simple-websocket's reader "thread", never started."""

    name = "volli-handshake"

    def __init__(self, target=None) -> None:
        pass

    def start(self) -> None:
        pass


def problem(environ: dict) -> tuple[int, str] | None:
    """What RFC 6455 4.2.1 (and wsproto, which answers the handshake) requires, checked
    before any slot is taken: (status, message), or None for a valid handshake."""
    if environ["REQUEST_METHOD"] != "GET":
        return 400, "a WebSocket handshake must be a GET"
    if "websocket" not in _tokens(environ, "HTTP_UPGRADE") \
            or "upgrade" not in _tokens(environ, "HTTP_CONNECTION"):
        return 400, "a WebSocket upgrade needs 'Upgrade: websocket' and 'Connection: Upgrade'"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return 426, "only Sec-WebSocket-Version 13 is supported"
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 16:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    if not environ.get("HTTP_HOST"):
        return 400, "a WebSocket handshake needs a Host header"
    return None


def normalise_upgrade(environ: dict) -> None:
    """A valid token list (``Upgrade: WebSocket, h2c``) becomes the one token wsproto
    accepts."""
    environ["HTTP_UPGRADE"] = "websocket"


# What the handshake's answer depends on (RFC 6455 4.2.1, and the deflate offer when on).
HANDSHAKE_HEADERS = frozenset({"HTTP_HOST", "HTTP_UPGRADE", "HTTP_CONNECTION",
                               "HTTP_SEC_WEBSOCKET_KEY", "HTTP_SEC_WEBSOCKET_VERSION",
                               "HTTP_SEC_WEBSOCKET_EXTENSIONS"})


def keep_handshake_headers(environ: dict) -> None:
    """Drop the request's other headers, once admission has read them: simple-websocket
    rebuilds the request from every ``HTTP_*`` key and wsproto parses it again with h11,
    which made a browser's upgrade through nginx (some 15 headers) cost about 100 µs
    more than a bare one (5)."""
    for key in [key for key in environ if key.startswith("HTTP_")]:
        if key not in HANDSHAKE_HEADERS:
            del environ[key]


def _tokens(environ: dict, name: str) -> set[str]:
    return {token.strip().lower() for token in environ.get(name, "").split(",")}


def detach(sock) -> _socket.socket | None:
    """Take the connection away from gunicorn's socket object: a non-blocking socket on the
    same descriptor, and gunicorn's object left detached, so that its close (or shutdown)
    once the handler returns acts on nothing. None for TLS, which cannot be detached (its
    state lives in the SSL object): it is served in place. Raises OSError, with nothing
    changed, if the new socket cannot be made."""
    if isinstance(sock, ssl.SSLSocket):
        return None
    raw = _socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
    try:
        raw.setblocking(False)
    except OSError:
        raw.detach()  # the descriptor stays gunicorn's
        raise
    sock.detach()  # cannot fail: it only forgets the descriptor
    return raw
