"""Plain HTTP routes."""

from __future__ import annotations

from flask import Blueprint, jsonify

from . import __version__
from .runtime import get_runtime

bp = Blueprint("http", __name__)


@bp.get("/health")
def health():
    """Liveness of this worker; figures are this worker's own."""
    runtime = get_runtime()
    return jsonify(
        status="draining" if runtime.draining else "ok",
        connections=runtime.connections,
        online=runtime.backend.online_count(),
        uptime=round(runtime.uptime(), 3),
        version=__version__,
    )
