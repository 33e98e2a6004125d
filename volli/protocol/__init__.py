"""The signaling protocol, free of I/O (see README.md in this folder)."""

from .errors import CloseCode, ErrorCode, ProtocolError
from .messages import (
    Discover, IceServers, Message, Ping, Register, Relay, RotateKey, Unwatch, Watch,
    discover_response_message, encode, encode_relay, ice_servers_message,
    error_message, hello_message, key_rotated_message, parse, pong_message,
    presence_message, rate_limited_message, registered_message, session_replaced_message,
    undelivered_message, unwatched_message, watch_limit_message, watching_message,
    held_message, delivered_message, expired_message, with_held_for, hold_limit_message,
    PushSubscribe, PushUnsubscribe, push_subscribed_message, push_unsubscribed_message,
)

__all__ = [
    "CloseCode", "ErrorCode", "ProtocolError", "Discover", "IceServers", "ice_servers_message",
    "Message", "Ping", "Register", "Relay",
    "RotateKey", "discover_response_message", "encode", "encode_relay", "error_message", "hello_message",
    "key_rotated_message", "parse", "pong_message", "rate_limited_message",
    "registered_message", "session_replaced_message", "undelivered_message",
    "Watch", "Unwatch", "watching_message", "unwatched_message", "presence_message",
    "watch_limit_message", "held_message", "delivered_message", "expired_message",
    "with_held_for", "hold_limit_message", "PushSubscribe", "PushUnsubscribe",
    "push_subscribed_message", "push_unsubscribed_message",
]
