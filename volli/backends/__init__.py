"""Presence and routing backends behind one interface (``base.Backend``)."""

from .base import Backend, Presence, Session
from .memory import MemoryBackend


def create_backend(settings) -> Backend:
    """The backend the settings ask for."""
    if settings.backend == "memory":
        return MemoryBackend()
    raise ValueError(f"unknown backend {settings.backend!r}")


__all__ = ["Backend", "MemoryBackend", "Presence", "Session", "create_backend"]
