"""Presence and routing backends behind one interface (``base.Backend``)."""

from .base import (
    Backend, BackendEvents, BackendUnavailable, Claim, EncryptionKey, Presence, Session,
)
from .memory import MemoryBackend


def create_backend(settings, events: BackendEvents) -> Backend:
    """The backend the settings ask for, reporting to ``events``."""
    if settings.backend == "redis":
        from .redis import RedisBackend  # imports redis-py only when configured

        return RedisBackend(settings, events)
    return MemoryBackend(settings.max_bindings, settings.binding_retention, events=events)


__all__ = ["Backend", "BackendEvents", "BackendUnavailable", "Claim", "EncryptionKey",
           "MemoryBackend", "Presence", "Session", "create_backend"]
