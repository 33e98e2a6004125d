"""The ``/signaling`` WebSocket endpoint: admission, then a receive loop into the hub."""

from __future__ import annotations

import _socket
import logging
import os
import ssl
import time

from flask import Blueprint, g, jsonify, request
from flask_sock import Sock

from ..runtime import Runtime, get_runtime
from . import deflate
from .client_ip import client_ip
from .connection import Connection

log = logging.getLogger("volli.ws")

bp = Blueprint("signaling", __name__)
sock = Sock()


@bp.before_request
def admit():
    """Refuse before the upgrade (so gunicorn keeps slots for /health): draining or full
    (503), a foreign Origin (403), too many connections or attempts from one IP (429)."""
    runtime = get_runtime()
    settings = runtime.settings
    environ = request.environ
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
    runtime.connections += 1
    runtime.hub.metrics.connection(+1)
    return None


@bp.teardown_request
def release(_exc):
    # Set only when the request ended before a Connection took the slot over.
    address = g.pop("volli_address", None)
    if address is not None:
        _release_slot(get_runtime(), address)


def _release_slot(runtime: Runtime, address: str) -> None:
    runtime.connections -= 1
    runtime.hub.metrics.connection(-1)
    runtime.addresses.release(address)


_ERRORS = {503: "unavailable", 403: "forbidden-origin", 429: "too-many-connections"}
_IP_REFUSALS = {"ip-rate": "too many connection attempts from this address",
                "ip-connections": "too many open connections from this address"}


def _refuse(runtime: Runtime, status: int, reason: str, message: str):
    """An HTTP refusal before the upgrade; ``reason`` labels the refusal metric."""
    runtime.hub.metrics.refused(reason)
    response = jsonify(error=_ERRORS[status], message=message)
    response.status_code = status
    if status in (429, 503):
        response.headers["Retry-After"] = "5"
    return response


class HandshakeOnly:
    """simple-websocket's reader "thread", never started: simple-websocket answers the
    handshake, then the socket belongs to ``Connection`` (its own frame layer)."""

    name = "volli-handshake"

    def __init__(self, target=None) -> None:
        pass

    def start(self) -> None:
        pass


@sock.route("/signaling", bp=bp)
def signaling(ws):
    ws.connected = False  # flask-sock's closing ws afterwards must not write on our socket
    runtime = get_runtime()
    settings = runtime.settings
    sock = request.environ["gunicorn.socket"]
    address = g.pop("volli_address")
    opened = time.monotonic()
    detached = not isinstance(sock, ssl.SSLSocket)
    if detached:
        try:
            # gunicorn closes its socket when this handler returns; the duplicate lives on.
            sock = _socket.socket(fileno=os.dup(sock.fileno()))
            sock.setblocking(False)
        except OSError as exc:  # out of descriptors: serve it in this greenlet instead
            log.warning("could not detach a WebSocket (%s); serving it in place", exc)
            detached = False
    conn = Connection(sock, detached=detached, events=runtime.hub,
                      max_message_size=settings.max_message_size,
                      queue_limit=settings.send_queue_limit,
                      send_timeout=settings.send_timeout, remote_addr=address,
                      deflate=g.pop("volli_deflate"),
                      on_finished=lambda c: _finished(runtime, c, address, opened))
    runtime.hub.connect(conn)
    log.info("connection open id=%s ip=%s", conn.id, address)
    conn.start(settings.register_timeout)
    if not detached:
        conn.serve()  # TLS, or no descriptor to spare: read here until the end


def _finished(runtime: Runtime, conn: Connection, address: str, opened: float) -> None:
    _release_slot(runtime, address)
    log.info("connection closed id=%s ip=%s user=%s code=%s seconds=%.1f", conn.id, address,
             conn.user_id, conn.close_code, time.monotonic() - opened)
