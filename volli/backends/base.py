"""The seam between the hub and where presence lives.

A backend answers "who is online, with which key" and delivers frames to a user's
connection, wherever that connection lives. The in-memory backend serves one process;
a shared backend (Redis) implements the same methods across workers and hosts.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Protocol


class Session(Protocol):
    """One client connection as the hub and backends see it (implemented by the transport)."""

    id: str
    user_id: str | None
    public_key: str | None

    def send(self, text: str, origin: str | None = None) -> bool:
        """Queue a text frame; False if the connection is closed or could not take it.

        ``origin`` is the userId a relayed frame comes from: if the frame is still queued
        when the connection closes, that sender is told."""

    def close(self, code: int, reason: str = "") -> None:
        """Start closing; returns at once."""


@dataclasses.dataclass(frozen=True, slots=True)
class Presence:
    user_id: str
    online: bool
    public_key: str | None


class Backend(abc.ABC):
    """Presence and routing.

    Guarantees: ``claim`` is atomic per userId; ``release`` only removes a userId that is
    still held by that very session (compare-and-delete), so a late close of an old
    connection never removes a newer registration. ``deliver`` returning True means the
    frame was accepted into the target connection's send queue; it is not an end-to-end
    acknowledgement.
    """

    @abc.abstractmethod
    def attach(self, session: Session) -> None:
        """A connection opened in this process."""

    @abc.abstractmethod
    def detach(self, session: Session) -> None:
        """A connection closed: release its userId (if still its own) and forget it."""

    @abc.abstractmethod
    def claim(self, session: Session, user_id: str, public_key: str) -> bool:
        """Bind user_id to session; False if another live session holds it."""

    @abc.abstractmethod
    def lookup(self, user_id: str) -> Presence:
        """Whether user_id is online, and its public key when known."""

    @abc.abstractmethod
    def deliver(self, user_id: str, text: str, origin: str | None = None) -> bool:
        """Queue text for user_id's connection; False if it is offline or cannot take it."""

    @abc.abstractmethod
    def local_sessions(self) -> list[Session]:
        """Connections held by this process (a copy: safe to iterate while closing)."""

    @abc.abstractmethod
    def online_count(self) -> int:
        """Registered users this backend can see."""
