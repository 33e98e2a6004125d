"""The real app with deliberate bugs, for testing how failures are contained:
discovering "explode@fault" raises inside a message handler, the text frame
"crash-connection" raises outside the hub, in the connection's receive loop, and with
FAULT_NO_DUP=1 duplicating a socket fails as it does out of file descriptors."""

import errno
import os

from volli.app import create_app
from volli.protocol import Discover
from volli.transport import websocket

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


class _OsWithoutDup:
    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def dup(fd):
        raise OSError(errno.EMFILE, "Too many open files (injected)")


if os.environ.get("FAULT_NO_DUP"):
    websocket.os = _OsWithoutDup()

