"""A wrapper for gunicorn's client socket that makes simple-websocket's sends safe.

simple-websocket writes frames with ``sock.send()``: under load a large frame is cut
short, and two greenlets sending at once (the writer, and the reader answering pings)
raise ConcurrentObjectUseError. Here every send is a ``sendall`` under a lock, with a
deadline: a peer that stops reading is cut off rather than waited on forever, and since a
cut-off frame would corrupt the stream, the socket is shut down at that point.
"""

from __future__ import annotations

import socket

import gevent
from gevent.lock import Semaphore


LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class GuardedSocket:
    def __init__(self, sock: socket.socket, send_timeout: float) -> None:
        self._sock = sock
        self._lock = Semaphore()
        self._send_timeout = send_timeout
        # The reader calls these per frame: bind them once.
        self.recv = sock.recv
        self.fileno = sock.fileno

    def send(self, data: bytes) -> int:
        timer = gevent.Timeout(self._send_timeout)
        timer.start()
        try:
            with self._lock:
                self._sock.sendall(data)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.abort()
            raise TimeoutError("peer did not take a frame within the send timeout") from None
        finally:
            timer.close()
        return len(data)

    sendall = send

    def close(self) -> None:
        """Close after our last frame reached the peer: closing with unread input (say,
        the rest of a frame over the size cap) would reset the connection and the peer
        could lose the close frame (1009) sent just before. So send FIN, discard what the
        peer still sends for a moment, then close."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(LINGER_SECONDS, False):
                discarded = 0
                while discarded < LINGER_BYTES:
                    chunk = self._sock.recv(65536)
                    if not chunk:
                        break
                    discarded += len(chunk)
        except OSError:
            pass
        self._sock.close()

    def abort(self) -> None:
        """Shut the connection down in both directions; the reader then sees EOF."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self._sock, name)
