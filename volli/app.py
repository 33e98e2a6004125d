"""The application factory."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from flask import Flask

from . import admin, config, endpoint, http, logs, web
from .probes import ProbePort
from .runtime import Runtime
from .transport import handshake


def create_app(overrides: Mapping[str, Any] | None = None,
               environ: Mapping[str, str] | None = None) -> Flask:
    """Build the app: settings from ``environ`` (default: the process environment), then
    ``overrides`` (typed, by field name, for tests), validated once here."""
    settings = config.load(os.environ if environ is None else environ, overrides)
    app = Flask(__name__)
    app.config["VOLLI_SETTINGS"] = settings
    # simple-websocket only answers the handshake; volli.transport does the rest.
    app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": handshake.HandshakeOnly}
    logs.configure(settings.log_level, settings.log_format)
    runtime = Runtime.init_app(app, settings)
    endpoint.sock.init_app(app)
    app.register_blueprint(endpoint.bp)
    app.register_blueprint(http.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(web.bp)
    app.wsgi_app = ProbePort(app.wsgi_app, settings.health_port)
    log = logging.getLogger("volli")
    log.info("volli ready: backend=%s max_connections=%d max_message_size=%d ping_interval=%gs "
             "require_signature=%s", settings.backend, runtime.max_connections,
             settings.max_message_size, settings.ping_interval, settings.require_signature)
    if not settings.origins:
        log.warning("VOLLI_ALLOWED_ORIGINS is empty: WebSockets from every Origin are allowed")
    return app
