"""One test per assumption the handshake seam (volli/transport/handshake.py) makes about
flask-sock, simple-websocket, wsproto and gunicorn, run against the installed versions
(no server process, except the last): an upgrade that breaks one fails here, by name."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time

import gevent.socket
import pytest
from flask import Flask
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from werkzeug.test import EnvironBuilder
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

from rawclient import masked
from volli.transport import deflate, handshake
from volli.transport.frames import OP_CLOSE, OP_TEXT

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"0123456789abcdef").decode()
REQUEST = (f"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def environ_for(sock, **headers: str) -> dict:
    base = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY,
            "Sec-WebSocket-Version": "13"}
    environ = EnvironBuilder(path="/ws", headers={**base, **headers}).get_environ()
    environ["gunicorn.socket"] = sock
    return environ


def read_available(sock, wait: float = 0.2) -> bytes:
    """Everything the peer has sent within ``wait`` (b"" if nothing)."""
    sock.settimeout(wait)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, BlockingIOError):
        pass
    return data


def response_headers(data: bytes) -> dict[str, str]:
    """The headers of the 101 that is all of ``data``."""
    head, _, rest = data.partition(b"\r\n\r\n")
    assert rest == b"", rest
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 101"), lines[0]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}


def app_with_route(route) -> Flask:
    """Volli's flask-sock set-up, with ``route`` as the WebSocket route /ws."""
    app = Flask(__name__)
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": handshake.HandshakeOnly}
    Sock(app).route("/ws")(route)
    return app


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_simple_websocket_answers_the_handshake_in_its_constructor_and_reads_nothing(pair):
    """The 101 is on the wire when Server() returns, and client bytes behind the request
    are still in the socket for our frame layer; the reader thread was built, not run."""
    ours, theirs = pair
    theirs.sendall(masked(OP_TEXT, b"first frame"))
    ws = Server(environ_for(ours), thread_class=handshake.HandshakeOnly)
    assert ws.mode == "gunicorn" and ws.sock is ours and ws.connected
    assert isinstance(ws.thread, handshake.HandshakeOnly)
    headers = response_headers(read_available(theirs))
    assert headers["sec-websocket-accept"] == accept_for(KEY)
    assert "sec-websocket-extensions" not in headers  # no offer, none accepted
    assert read_available(ours) == masked(OP_TEXT, b"first frame")


BROWSER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
    "Origin": "https://app.example", "Pragma": "no-cache", "Cache-Control": "no-cache",
    "Accept-Encoding": "gzip, deflate, br", "Accept-Language": "en-US,en;q=0.9",
    "Cookie": "a=b", "Sec-WebSocket-Protocol": "chat", "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Proto": "https"}


def test_simple_websocket_answers_from_the_handshake_headers_alone(pair):
    """keep_handshake_headers leaves simple-websocket (which rebuilds the request from
    every HTTP_* key) only what its answer depends on, and the answer is the same."""
    ours, theirs = pair
    environ = environ_for(ours, **BROWSER_HEADERS)
    handshake.keep_handshake_headers(environ)
    assert {k for k in environ if k.startswith("HTTP_")} == \
        {"HTTP_HOST", "HTTP_UPGRADE", "HTTP_CONNECTION", "HTTP_SEC_WEBSOCKET_KEY",
         "HTTP_SEC_WEBSOCKET_VERSION"}
    assert environ["REQUEST_METHOD"] == "GET" and "gunicorn.socket" in environ
    Server(environ, thread_class=handshake.HandshakeOnly)
    headers = response_headers(read_available(theirs))
    assert headers["sec-websocket-accept"] == accept_for(KEY)
    assert "sec-websocket-protocol" not in headers  # none was chosen either way


def test_a_closed_simple_websocket_writes_nothing_when_closed_again(pair):
    """``ws.connected = False`` is what keeps flask-sock's ``ws.close()`` off our socket
    (a TLS one may still be open while its writer stops)."""
    ours, theirs = pair
    ws = Server(environ_for(ours), thread_class=handshake.HandshakeOnly)
    read_available(theirs)
    ws.connected = False
    with pytest.raises(ConnectionClosed):
        ws.close()
    with pytest.raises(ConnectionClosed):
        ws.close(CloseReason.GOING_AWAY, "bye")
    assert read_available(theirs) == b""


def test_flask_sock_builds_the_server_from_our_options_and_gunicorns_socket(pair):
    """flask-sock passes SOCK_SERVER_OPTIONS (our thread class) and environ["gunicorn.socket"]
    to simple-websocket, calls the route with it, swallows what its own close raises, and
    in gunicorn mode ends the response by raising StopIteration (gunicorn then writes no
    response: next test)."""
    ours, theirs = pair
    seen = []

    def route(ws):
        seen.append(ws)
        ws.connected = False

    app = app_with_route(route)
    with pytest.raises(StopIteration):
        app.wsgi_app(environ_for(ours), lambda *args: None)
    [ws] = seen
    assert ws.sock is ours and isinstance(ws.thread, handshake.HandshakeOnly)
    response_headers(read_available(theirs))  # a 101, then nothing
    assert ours.fileno() != -1


class _Log:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_gunicorns_async_worker_only_closes_an_upgraded_socket_which_detached_survives():
    """gunicorn's gevent worker serves the upgrade request through flask-sock and our
    seam, then writes nothing more and closes its socket object: the detached socket stays
    open and is the only one holding the connection."""
    from gunicorn.config import Config
    from gunicorn.workers.ggevent import GeventWorker

    client, peer = gevent.socket.socketpair()
    taken = []

    def route(ws):
        ws.connected = False
        taken.append(handshake.detach(ws.sock))

    worker = GeventWorker.__new__(GeventWorker)  # the request path only: no process
    worker.cfg, worker.log, worker.wsgi = Config(), _Log(), app_with_route(route)
    worker.alive, worker.nr, worker.max_requests = True, 0, 1000
    listener = socket.socket()
    try:
        peer.sendall(REQUEST)
        worker.handle(listener, client, ("127.0.0.1", 5000))
        [raw] = taken
        assert client.fileno() == -1  # gunicorn closed its object ...
        response_headers(read_available(peer))  # ... after the 101 and nothing else
        raw.send(b"still ours")
        assert read_available(peer) == b"still ours"
        raw.close()
        assert peer.recv(10) == b""  # nothing else held the descriptor open
    finally:
        listener.close()
        peer.close()


@pytest.mark.parametrize("kind", ["socket", "gevent"])
def test_a_detached_socket_survives_close_and_shutdown_of_the_original(kind):
    """gunicorn's async worker close()s its socket after the handler; its sync and gthread
    workers shutdown() it first: neither reaches a detached descriptor."""
    from gunicorn import util

    ours, theirs = (socket if kind == "socket" else gevent.socket).socketpair()
    raw = handshake.detach(ours)
    try:
        assert raw is not None and not raw.getblocking()
        with pytest.raises(OSError):
            ours.shutdown(socket.SHUT_RDWR)
        util.close(ours)
        ours.close()
        raw.sendall(b"ping")
        assert theirs.recv(4) == b"ping"
        theirs.sendall(b"pong")
        assert read_available(raw) == b"pong"
    finally:
        raw.close()
        theirs.close()


def test_a_socket_that_cannot_be_taken_over_is_left_to_its_owner(monkeypatch, pair):
    """Detaching fails before anything changes: the fallback serves the original."""
    ours, theirs = pair

    class Unusable:
        def setblocking(self, flag):
            raise OSError("injected")

        def detach(self):
            pass

    monkeypatch.setattr(handshake._socket, "socket", lambda *args: Unusable())
    with pytest.raises(OSError):
        handshake.detach(ours)
    ours.sendall(b"x")
    assert theirs.recv(1) == b"x"


def test_a_tls_socket_is_not_detached():
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(
        socket.socket(), server_hostname="test", do_handshake_on_connect=False)
    try:
        assert handshake.detach(tls) is None
        assert tls.fileno() != -1
    finally:
        tls.close()


@pytest.mark.parametrize("upgrade", ["websocket", "WebSocket", "websocket, h2c", "h2c, WebSocket"])
def test_wsproto_accepts_the_upgrade_token_we_normalise(pair, upgrade):
    ours, theirs = pair
    environ = environ_for(ours, Upgrade=upgrade)
    assert handshake.problem(environ) is None
    handshake.normalise_upgrade(environ)
    Server(environ, thread_class=handshake.HandshakeOnly)
    assert response_headers(read_available(theirs))["upgrade"].lower() == "websocket"


@pytest.mark.parametrize("offer, expected", [
    ("permessage-deflate; client_max_window_bits", "permessage-deflate"),
    ("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover; "
     "server_max_window_bits=10", "permessage-deflate; server_no_context_takeover; "
     "server_max_window_bits=10"),
])
def test_wsproto_accepts_the_one_deflate_offer_we_keep_with_its_parameters(pair, offer, expected):
    """simple-websocket accepts any permessage-deflate offer through wsproto, which echoes
    its parameters: narrowed to the one offer deflate.py honours, both sides agree on the
    server's (the client's window, which wsproto may state, never exceeds what we inflate)."""
    ours, theirs = pair
    environ = environ_for(ours, **{"Sec-WebSocket-Extensions": offer})
    compressor = deflate.negotiate(environ)
    Server(environ, thread_class=handshake.HandshakeOnly)
    answer = response_headers(read_available(theirs))["sec-websocket-extensions"]
    params = {p.strip() for p in answer.split(";") if not p.strip().startswith("client_")}
    assert params == {p.strip() for p in expected.split(";")}
    assert compressor._reset == ("server_no_context_takeover" in params)


def test_after_the_close_handshake_a_real_gunicorn_sends_nothing_more(server):
    """End to end: after the 101, the client sees our frames and EOF, nothing of HTTP."""
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        conn.sendall(REQUEST.replace(b"/ws", b"/signaling"))
        data = b""
        end = time.monotonic() + 5
        while b"\r\n\r\n" not in data and time.monotonic() < end:
            data += conn.recv(65536)
        conn.sendall(masked(OP_CLOSE, (1000).to_bytes(2, "big")))
        while time.monotonic() < end and (chunk := conn.recv(65536)):
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        parser = FrameProtocol(client=True, extensions=[])
        parser.receive_bytes(rest)
        frames = list(parser.received_frames())
        assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.CLOSE]  # hello, echo
        assert frames[1].payload == (1000, "")
        assert b"HTTP/" not in rest
    finally:
        conn.close()


def test_the_environ_socket_is_gunicorns_client_socket():
    """gunicorn puts the very socket it later closes into the environ."""
    from gunicorn.config import Config
    from gunicorn.http import RequestParser
    from gunicorn.http.wsgi import create

    client, peer = socket.socketpair()
    try:
        peer.sendall(REQUEST)
        req = next(RequestParser(Config(), client, ("127.0.0.1", 5000)))
        _, environ = create(req, client, ("127.0.0.1", 5000), ("127.0.0.1", 8000), Config())
        assert environ["gunicorn.socket"] is client
    finally:
        client.close()
        peer.close()


def test_no_descriptor_is_needed_to_detach(pair):
    ours, _ = pair
    before = len(os.listdir("/proc/self/fd"))
    raw = handshake.detach(ours)
    assert len(os.listdir("/proc/self/fd")) == before
    raw.close()
