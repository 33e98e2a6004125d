"""permessage-deflate (RFC 7692), when VOLLI_PERMESSAGE_DEFLATE is on.

The handshake is answered by simple-websocket (wsproto), which echoes the parameters of
the offer it is given; ``negotiate`` first narrows the client's header to one offer that
this module then honours, so both sides of the handshake agree by construction.
"""

from __future__ import annotations

import zlib

from .frames import FrameError

_TAIL = b"\x00\x00\xff\xff"


class PerMessageDeflate:
    __slots__ = ("_inflate", "_deflate", "_wbits", "_reset")

    def __init__(self, server_no_context_takeover: bool, server_max_window_bits: int) -> None:
        # zlib cannot make raw deflate streams with an 8-bit window.
        self._wbits = max(9, server_max_window_bits)
        self._reset = server_no_context_takeover
        self._inflate = zlib.decompressobj(-15)
        self._deflate = zlib.compressobj(wbits=-self._wbits)

    def decompress(self, data: bytes, limit: int) -> bytes:
        try:
            out = self._inflate.decompress(data + _TAIL, limit + 1)
        except zlib.error:
            raise FrameError(1007, "bad deflate data") from None
        if len(out) > limit:
            raise FrameError(1009, "message too big")
        return out

    def compress(self, data: bytes) -> bytes:
        if self._reset:
            self._deflate = zlib.compressobj(wbits=-self._wbits)
        out = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(_TAIL) else out


def negotiate(environ: dict) -> PerMessageDeflate | None:
    """Keep only the client's first permessage-deflate offer in ``environ`` (or none) and
    return the compressor that matches it."""
    header = environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", "")
    for offer in header.split(","):
        params = [p.strip() for p in offer.split(";")]
        if params[0] != "permessage-deflate":
            continue
        no_takeover, bits = False, 15
        for param in params[1:]:
            name, _, value = param.partition("=")
            name, value = name.strip(), value.strip().strip('"')
            if name == "server_no_context_takeover":
                no_takeover = True
            elif name == "server_max_window_bits":
                if not value.isdigit() or not 9 <= int(value) <= 15:
                    break
                bits = int(value)
            elif name == "client_max_window_bits":
                if value and (not value.isdigit() or not 8 <= int(value) <= 15):
                    break
            elif name != "client_no_context_takeover":
                break
        else:
            environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] = offer.strip()
            return PerMessageDeflate(no_takeover, bits)
    return None
