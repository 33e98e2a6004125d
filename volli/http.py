"""Plain HTTP routes."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, jsonify, request

from . import __version__, metrics
from .runtime import get_runtime

bp = Blueprint("http", __name__)


@bp.get("/health")
def health():
    """Liveness of this worker; figures are this worker's own. 503 (degraded) while one
    of its background loops is down."""
    runtime = get_runtime()
    failing = runtime.loops.failing()
    response = jsonify(
        status="degraded" if failing else "draining" if runtime.draining else "ok",
        backend=runtime.backend.name,
        connections=runtime.connections,
        online=runtime.backend.online_count(),
        bindings=runtime.backend.binding_count(),
        loops=runtime.loops.states,
        uptime=round(runtime.uptime(), 3),
        version=__version__,
    )
    if failing:  # a background loop raised and waits to run again
        response.status_code = 503
    return response


@bp.get("/ready")
def ready():
    """Readiness of this worker: false while draining or while a configured shared
    store is unreachable (local users are still served)."""
    runtime = get_runtime()
    ok, reason = runtime.backend.readiness()
    if runtime.draining:
        ok, reason = False, "draining"
    response = jsonify(ready=ok, reason=reason, backend=runtime.backend.name)
    response.status_code = 200 if ok else 503
    return response


@bp.get("/push/vapid-public-key")
def vapid_public_key():
    """The key browsers pass to pushManager.subscribe (applicationServerKey); 404 when
    this server sends no pushes."""
    key = get_runtime().hub.push.public_key
    if key is None:
        response = jsonify(error="push-disabled", message="no VAPID key configured")
        response.status_code = 404
        return response
    return jsonify(publicKey=key)


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format, summed over every worker of this server."""
    refusal = bearer_refusal(get_runtime().settings.metrics_token)
    if refusal is not None:
        return refusal
    get_runtime().metrics.flush()
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


def bearer_refusal(token: str):
    """None if the request carries ``Authorization: Bearer <token>`` (or no token is
    set), else the 401 response to return."""
    if not token:
        return None
    supplied = request.headers.get("Authorization", "")
    if hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
        return None
    response = jsonify(error="unauthorized", message="a bearer token is required")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = "Bearer"
    return response
