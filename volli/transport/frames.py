"""RFC 6455 frames on the server side, sans-I/O: bytes in, events out; payloads in, bytes out.

Why not wsproto (what simple-websocket uses, and still does our handshake): profiling a
saturated worker put about a quarter of its time in wsproto's per-frame generators and
event objects. This parser takes a whole read in one loop and hands out plain tuples.
It knows exactly what Volli negotiates: no subprotocol, and permessage-deflate only when
the server enabled it (``volli.transport.deflate``).
"""

from __future__ import annotations

from typing import Any, Protocol

try:  # websockets' C helper: unmasking is per byte, the one loop not to run in Python
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a platform without its wheel
    from websockets.utils import apply_mask

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

# Close codes a peer may send (RFC 6455 7.4 and the IANA registry); 1005, 1006 and 1015
# are local-only, the rest of 1000-2999 is reserved.
_PEER_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                               1013))
NO_STATUS = 1005
_UTF8_BYTES_PER_CHAR = 4


class FrameError(Exception):
    """The peer broke the protocol; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.events: list[tuple[int, Any]] = []  # the valid events before the violation


class Compressor(Protocol):
    def decompress(self, data: bytes, limit: int) -> bytes: ...

    def compress(self, data: bytes) -> bytes: ...


def unmask(mask: bytes, data: bytes) -> bytes:
    return apply_mask(data, mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _PEER_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(1002, f"close code {code} may not be sent")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not UTF-8") from None


class FrameParser:
    """Turns client bytes into events: ``(OP_TEXT, str)``, ``(OP_BINARY, bytes)``,
    ``(OP_PING, bytes)``, ``(OP_PONG, bytes)`` and ``(OP_CLOSE, (code, reason))``.
    ``feed`` raises FrameError on the first violation; the events before it were valid."""

    __slots__ = ("_buf", "_need", "_max_text_bytes", "_max_size", "_parts", "_size", "_opcode",
                 "_compressed", "_deflate", "frames")

    def __init__(self, max_message_size: int, deflate: Compressor | None = None) -> None:
        # Input not yet consumed (a bytearray once there is some): appended to and trimmed
        # once per feed, never rebuilt, so a frame arriving in many small reads costs linear
        # time. Bounded: at most one frame (the header caps it) plus one read.
        self._buf: bytes | bytearray = b""
        self._need = 2  # bytes _buf must hold before parsing it again can make progress
        self._max_size = max_message_size  # characters of text, bytes of binary
        self._max_text_bytes = max_message_size * _UTF8_BYTES_PER_CHAR
        # Payloads of an unfinished fragmented message, joined as they come: its memory is
        # their bytes (capped by the size rule), however many (empty) frames carry them.
        self._parts = bytearray()
        self._size = 0
        self.frames = 0  # frames of any kind parsed so far (for the caller's frame rate)
        self._opcode: int | None = None  # of the unfinished message
        self._compressed = False
        self._deflate = deflate

    def feed(self, data: bytes) -> list[tuple[int, Any]]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
        else:  # the usual case: whole frames, parsed where they lie
            buf = data
        end = len(buf)
        pos = 0
        need = 2
        events: list[tuple[int, Any]] = []
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                opcode = b0 & 0x0F
                fin = b0 & 0x80
                rsv1 = b0 & 0x40
                if b0 & 0x30 or (rsv1 and (self._deflate is None or opcode != OP_TEXT
                                           and opcode != OP_BINARY)):
                    raise FrameError(1002, "reserved bits set")
                if not b1 & 0x80:
                    raise FrameError(1002, "client frames must be masked")
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if end - head < 2:
                        need = 4
                        break
                    length = int.from_bytes(buf[head:head + 2], "big")
                    head += 2
                    if length < 126:
                        raise FrameError(1002, "frame length not minimally encoded")
                elif length == 127:
                    if end - head < 8:
                        need = 10
                        break
                    length = int.from_bytes(buf[head:head + 8], "big")
                    head += 8
                    if length >> 63:
                        raise FrameError(1002, "frame length has its top bit set")
                    if length < 65536:
                        raise FrameError(1002, "frame length not minimally encoded")
                size = self._check_header(opcode, fin, rsv1, length)
                stop = head + 4 + length
                if stop > end:
                    need = stop - pos
                    break
                payload = unmask(buf[head:head + 4], buf[head + 4:stop])
                pos = stop
                self._size = size  # counted once the frame is whole, never per re-read
                self.frames += 1
                if opcode >= OP_CLOSE:
                    events.append((opcode, parse_close(payload) if opcode == OP_CLOSE
                                   else payload))
                    if opcode == OP_CLOSE:
                        break  # nothing after a close frame counts
                    continue
                if opcode:  # first frame of a message
                    self._opcode = opcode
                    self._compressed = bool(rsv1)
                if not fin:
                    self._parts += payload
                    continue
                if self._parts:
                    self._parts += payload
                    payload = bytes(self._parts)
                    self._parts = bytearray()
                events.append(self._message(payload))
        except FrameError as exc:
            exc.events = events
            raise
        finally:
            if pos >= end:
                self._buf = b""
            elif buf is self._buf:
                del buf[:pos]
            else:
                self._buf = bytearray(memoryview(data)[pos:])
            self._need = need
        return events

    def _check_header(self, opcode: int, fin: int, rsv1: int, length: int) -> int:
        """The message size once this frame is added; raises FrameError. Pure: a header
        read again while its frame is incomplete is not counted twice."""
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise FrameError(1002, f"reserved opcode {opcode:#x}")
            if not fin:
                raise FrameError(1002, "fragmented control frame")
            if length > 125:
                raise FrameError(1002, "control frame longer than 125 bytes")
            return self._size
        if opcode == OP_CONT:
            if self._opcode is None:
                raise FrameError(1002, "continuation frame outside a message")
            if rsv1:
                raise FrameError(1002, "reserved bits set")
        elif opcode <= OP_BINARY:
            if self._opcode is not None:
                raise FrameError(1002, "new message inside a fragmented message")
        else:
            raise FrameError(1002, f"reserved opcode {opcode:#x}")
        size = (self._size if opcode == OP_CONT else 0) + length
        text = (opcode or self._opcode) == OP_TEXT
        # Compressed sizes are checked again once inflated.
        if size > (self._max_text_bytes if text else self._max_size):
            raise FrameError(1009, "Message is too big")
        return size

    def _message(self, payload: bytes) -> tuple[int, Any]:
        opcode, self._opcode = self._opcode, None
        if self._compressed:
            limit = self._max_text_bytes if opcode == OP_TEXT else self._max_size
            payload = self._deflate.decompress(payload, limit)
        if opcode == OP_BINARY:
            if len(payload) > self._max_size:
                raise FrameError(1009, "Message is too big")
            return OP_BINARY, payload
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise FrameError(1007, "text message is not UTF-8") from None
        if len(text) > self._max_size:
            raise FrameError(1009, "Message is too big")
        return OP_TEXT, text


def frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """One unmasked, final server frame."""
    n = len(payload)
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; 1005 (no status) is sent as an empty one."""
    if code == NO_STATUS:
        return frame(OP_CLOSE, b"")
    return frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])
