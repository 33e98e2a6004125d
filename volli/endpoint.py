"""The ``/signaling`` WebSocket endpoint (Flask, flask-sock): admission (a valid
handshake, draining, capacity, Origin, per-IP limits), then the socket is handed to a
``Connection`` registered with the hub. The transport below it (``volli.transport``)
knows nothing of Flask or the runtime."""

from __future__ import annotations

import logging
import ssl
import time

from flask import Blueprint, current_app, g, jsonify, request
from flask_sock import Sock

from .runtime import Runtime, get_runtime
from .transport import deflate, handshake
from .transport.client_ip import client_ip
from .transport.connection import Connection

log = logging.getLogger("volli.ws")

bp = Blueprint("signaling", __name__)
sock = Sock()


@bp.before_request
def admit():
    """Refuse before the upgrade (so gunicorn keeps slots for /health): a malformed
    handshake (400, 426), draining or full (503), a foreign Origin (403), too many
    connections or attempts from one IP (429)."""
    runtime = get_runtime()
    settings = runtime.settings
    environ = request.environ
    problem = handshake.problem(environ)
    if problem:
        status, message = problem
        log.warning("bad handshake from %s: %s", request.remote_addr, message)
        return _refuse(runtime, status, "bad-handshake", message)
    handshake.normalise_upgrade(environ)
    if runtime.draining:
        return _refuse(runtime, 503, "draining", "server is shutting down")
    if runtime.connections >= runtime.max_connections:
        return _refuse(runtime, 503, "max-connections", "server is at its connection limit")
    origin = environ.get("HTTP_ORIGIN")
    if settings.origins and origin is not None \
            and origin.rstrip("/").lower() not in settings.origins:
        log.warning("refused origin %r from %s", origin, request.remote_addr)
        return _refuse(runtime, 403, "origin", "this Origin may not open WebSockets here")
    if "gunicorn.socket" not in environ:
        return jsonify(error="the WebSocket endpoint needs gunicorn's gevent worker"), 500
    address = client_ip(environ, settings.proxies)
    refusal = runtime.addresses.admit(address, time.monotonic())
    if refusal:
        return _refuse(runtime, 429, refusal, _IP_REFUSALS[refusal])
    g.volli_address = address
    # simple-websocket (the handshake) accepts any deflate offer it sees: it sees none, or
    # the one offer the connection will honour.
    g.volli_deflate = None
    if settings.permessage_deflate:
        g.volli_deflate = deflate.negotiate(environ)
    else:
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
    handshake.keep_handshake_headers(environ)
    runtime.connections += 1
    runtime.metrics.connection(+1)
    return None


@bp.errorhandler(ConnectionError)
@bp.errorhandler(ssl.SSLError)  # over TLS, the same hang-up (SSLEOFError)
def client_left(exc: OSError):
    """The client hung up (say, a reset) while the handshake was being answered: nothing
    to answer and nothing of ours broke, so one line and no traceback."""
    log.info("client %s left during the WebSocket handshake (%s)",
             g.get("volli_address", request.remote_addr), exc)
    return "", 400


@bp.teardown_request
def release(_exc):
    # Set only when the request ended before a Connection took the slot over.
    address = g.pop("volli_address", None)
    if address is not None:
        _release_slot(get_runtime(), address)


def _release_slot(runtime: Runtime, address: str) -> None:
    runtime.connections -= 1
    runtime.metrics.connection(-1)
    runtime.addresses.release(address)


_ERRORS = {503: "unavailable", 403: "forbidden-origin", 429: "too-many-connections",
           400: "bad-handshake", 426: "bad-handshake"}
_IP_REFUSALS = {"ip-rate": "too many connection attempts from this address",
                "ip-connections": "too many open connections from this address"}


def _refuse(runtime: Runtime, status: int, reason: str, message: str):
    """An HTTP refusal before the upgrade; ``reason`` labels the refusal metric."""
    runtime.metrics.refused(reason)
    response = jsonify(error=_ERRORS[status], message=message)
    response.status_code = status
    if status in (429, 503):
        response.headers["Retry-After"] = "5"
    elif status == 426:
        response.headers["Sec-WebSocket-Version"] = "13"
    return response


@sock.route("/signaling", bp=bp)
def signaling(ws):
    # flask-sock closes ws after this returns: closed already, it writes nothing (a TLS
    # socket may still be open while its writer stops).
    ws.connected = False
    runtime = get_runtime()
    settings = runtime.settings
    sock = request.environ["gunicorn.socket"]
    address = g.pop("volli_address")
    opened = time.monotonic()
    try:
        raw = handshake.detach(sock)
    except OSError as exc:
        log.warning("could not detach a WebSocket (%s); serving it in place", exc)
        raw = None
    conn = Connection(sock if raw is None else raw, detached=raw is not None, events=runtime.hub,
                      max_message_size=settings.max_message_size,
                      queue_limit=settings.send_queue_limit,
                      send_timeout=settings.send_timeout, remote_addr=address,
                      deflate=g.pop("volli_deflate"),
                      on_finished=lambda c: _finished(runtime, c, address, opened))
    runtime.hub.connect(conn)
    # DEBUG: the `registered` and `connection closed` lines carry the same, and each log
    # line is a few % of a connection's CPU in a reconnect storm (bench/storm.py).
    log.debug("connection open id=%s ip=%s", conn.id, address)
    conn.start(settings.register_timeout)
    if raw is None:
        conn.serve()  # TLS, or not detached: read here until the end


@bp.route("/signaling")
def signaling_http():
    """werkzeug routes to the WebSocket rule only an Upgrade header that is exactly
    "websocket": the rest comes here through ``admit``, which refused it unless it is a
    valid token list (``Upgrade: websocket, h2c``): then it is a WebSocket after all."""
    return current_app.view_functions["signaling.signaling"]()


def _finished(runtime: Runtime, conn: Connection, address: str, opened: float) -> None:
    _release_slot(runtime, address)
    log.info("connection closed id=%s ip=%s user=%s code=%s seconds=%.1f", conn.id, address,
             conn.user_id, conn.close_code, time.monotonic() - opened)
