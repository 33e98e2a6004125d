"""The signaling protocol, free of I/O (see README.md in this folder)."""

from .errors import CloseCode, ErrorCode, ProtocolError
from .messages import (
    Discover, Message, Ping, Register, Relay, discover_response_message, encode, error_message,
    parse, pong_message, registered_message, relayed_message, undelivered_message,
)

__all__ = [
    "CloseCode", "ErrorCode", "ProtocolError", "Discover", "Message", "Ping", "Register", "Relay",
    "discover_response_message", "encode", "error_message", "parse", "pong_message",
    "registered_message", "relayed_message", "undelivered_message",
]
