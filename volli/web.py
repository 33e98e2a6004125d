"""Browser-facing files: the JavaScript client and the demo page (static, no build step)."""

from __future__ import annotations

from flask import Blueprint, send_from_directory

bp = Blueprint("web", __name__, static_folder="static", static_url_path="/static")


@bp.get("/demo")
def demo():
    return send_from_directory(bp.static_folder, "demo.html")


@bp.get("/demo-sw.js")
def demo_service_worker():
    """The demo's service worker, at the top level: its scope (/) covers /demo."""
    return send_from_directory(bp.static_folder, "demo-sw.js", mimetype="text/javascript")


@bp.get("/volli-signaling.js")
def client_module():
    """The ES module, also at a stable top-level path for <script type="module">."""
    return send_from_directory(bp.static_folder, "volli-signaling.js",
                               mimetype="text/javascript")
