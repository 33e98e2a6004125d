"""Error codes sent in ``error`` messages, WebSocket close codes, and the one exception.

    ProtocolError      the client's fault: answered with an ``error`` message,
                       the connection stays open.
    (anything else)    ours: logged; answered ``internal-error`` inside a message
                       handler, or the connection is closed with 1011 outside one.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    INVALID_JSON = "invalid-json"
    INVALID_MESSAGE = "invalid-message"
    INVALID_USER_ID = "invalid-user-id"
    BINARY_FRAME = "binary-frame"
    UNKNOWN_TYPE = "unknown-type"
    NOT_REGISTERED = "not-registered"
    ALREADY_REGISTERED = "already-registered"
    USER_ID_TAKEN = "user-id-taken"
    FORBIDDEN_SENDER = "forbidden-sender"
    BAD_SIGNATURE = "bad-signature"
    IDENTITY_BOUND = "identity-bound"
    BINDINGS_FULL = "bindings-full"
    SIGNATURE_REQUIRED = "signature-required"
    RATE_LIMITED = "rate-limited"
    PEER_OFFLINE = "peer-offline"
    PEER_BUSY = "peer-busy"
    UNAVAILABLE = "unavailable"
    PUSH_DISABLED = "push-disabled"
    SEALED_REQUIRED = "sealed-required"
    INTERNAL_ERROR = "internal-error"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    ABNORMAL = 1006  # recorded when the peer vanished; never sent
    POLICY_VIOLATION = 1008  # ping timeout (sent by simple-websocket)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # The userId is now held by another connection (after a shared-store outage, or a
    # takeover by a signed registration).
    SESSION_REPLACED = 4000
    REGISTER_TIMEOUT = 4001
    SLOW_CONSUMER = 4002
    RATE_LIMIT_ABUSE = 4029  # kept sending after many rate-limited errors


class ProtocolError(Exception):
    """A client's request broke a rule; ``code`` says which."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
