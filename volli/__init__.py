"""Volli: a WebRTC signaling server.

This module stays import-light on purpose: gunicorn's master imports
``volli.config`` before the gevent worker monkey-patches, so nothing here may
create locks, sockets or threads. The app factory lives in ``volli.app``.
"""

__version__ = "0.1.0"
