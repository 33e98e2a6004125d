"""Presence and routing backends behind one interface (``base.Backend``)."""

from .base import Backend, BackendUnavailable, Claim, Presence, Session
from .memory import MemoryBackend


def create_backend(settings) -> Backend:
    """The backend the settings ask for."""
    if settings.backend == "redis":
        from .redis import RedisBackend  # imports redis-py only when configured

        return RedisBackend(settings)
    return MemoryBackend(settings.max_bindings, settings.binding_retention)


__all__ = ["Backend", "BackendUnavailable", "Claim", "MemoryBackend", "Presence", "Session",
           "create_backend"]
