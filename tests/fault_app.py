"""The real app with deliberate bugs, for testing how failures are contained:
discovering "explode@fault" raises inside a message handler, the text frame
"crash-connection" raises outside the hub, in the connection's receive loop, and with
FAULT_NO_DETACH=1 taking a socket over from gunicorn fails."""

import errno
import os

from volli.app import create_app
from volli.protocol import Discover
from volli.transport import handshake

app = create_app()
_hub = app.extensions["volli"].hub
_discover = _hub._handlers[Discover]
_receive_text = _hub.receive_text


def _faulty_discover(session, message, received_at):
    if message.user_id == "explode@fault":
        raise RuntimeError("injected fault in a handler")
    return _discover(session, message, received_at)


def _faulty_receive_text(session, text):
    if text == "crash-connection":
        raise RuntimeError("injected fault outside the hub")
    return _receive_text(session, text)


_hub._handlers[Discover] = _faulty_discover
_hub.receive_text = _faulty_receive_text


def _failing_detach(sock):
    raise OSError(errno.EBADF, "cannot take the socket over (injected)")


if os.environ.get("FAULT_NO_DETACH"):
    handshake.detach = _failing_detach
