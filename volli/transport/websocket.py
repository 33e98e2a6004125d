"""The ``/signaling`` WebSocket endpoint: admission, then a receive loop into the hub."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, g, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from ..protocol import CloseCode
from ..runtime import Runtime, get_runtime
from .client_ip import client_ip
from .connection import Connection
from .socket_guard import GuardedSocket

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
    if runtime.connections >= settings.max_connections:
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
    if not settings.permessage_deflate:
        # simple-websocket accepts any offered deflate; hiding the offer turns it off.
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
    environ["gunicorn.socket"] = GuardedSocket(environ["gunicorn.socket"], settings.send_timeout)
    runtime.connections += 1
    runtime.hub.metrics.connection(+1)
    return None


@bp.teardown_request
def release(_exc):
    address = g.pop("volli_address", None)
    if address is not None:
        runtime = get_runtime()
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


@sock.route("/signaling", bp=bp)
def signaling(ws):
    runtime = get_runtime()
    conn = Connection(ws, request.environ["gunicorn.socket"],
                      runtime.settings.send_queue_limit, runtime.settings.send_timeout,
                      g.volli_address, on_close=runtime.hub.disconnect,
                      on_dropped=runtime.hub.report_undelivered)
    opened = time.monotonic()
    runtime.hub.connect(conn)
    log.info("connection open id=%s ip=%s", conn.id, conn.remote_addr)
    try:
        _serve(ws, conn, runtime)
    except ConnectionClosed:
        pass
    except Exception:
        log.exception("connection %s failed", conn.id)
        conn.close(CloseCode.INTERNAL_ERROR, "internal server error")
    finally:
        conn.finish()
        log.info("connection closed id=%s ip=%s user=%s code=%s seconds=%.1f", conn.id,
                 conn.remote_addr, conn.user_id, conn.close_code, time.monotonic() - opened)


def _serve(ws, conn: Connection, runtime: Runtime) -> None:
    hub = runtime.hub
    deadline = time.monotonic() + runtime.settings.register_timeout
    while not conn.closed:
        if conn.user_id is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                conn.close(CloseCode.REGISTER_TIMEOUT, "register timeout")
                return
            data = ws.receive(timeout=remaining)
            if data is None:
                continue
        else:
            data = ws.receive()
        if conn.closed:
            return
        if isinstance(data, str):
            hub.receive_text(conn, data)
        else:
            hub.receive_binary(conn)
