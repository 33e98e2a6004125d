"""permessage-deflate (volli/transport/deflate.py): the negotiated offer, and messages
from wsproto, a reference client, inflated under the size cap."""

from __future__ import annotations

import zlib

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
from wsproto.extensions import PerMessageDeflate

from volli.transport import deflate
from volli.transport.frames import OP_TEXT, FrameError, FrameParser


def test_negotiation_keeps_one_offer_and_honours_its_parameters():
    environ = {"HTTP_SEC_WEBSOCKET_EXTENSIONS":
               "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=8, "
               "permessage-deflate; client_max_window_bits; server_no_context_takeover"}
    compressor = deflate.negotiate(environ)
    assert environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] == \
        "permessage-deflate; client_max_window_bits; server_no_context_takeover"
    text = b'{"type":"offer","sdp":"' + b"v=0 " * 200 + b'"}'
    # No context takeover: each message inflates on its own.
    for _ in range(2):
        assert zlib.decompressobj(-15).decompress(compressor.compress(text)
                                                  + b"\x00\x00\xff\xff") == text
    assert deflate.negotiate({"HTTP_SEC_WEBSOCKET_EXTENSIONS": "foo"}) is None


def test_deflated_messages_from_a_reference_client_and_the_inflated_cap():
    offer = "permessage-deflate; client_max_window_bits"
    def deflating_client():
        ext = PerMessageDeflate()
        ext.finalize(ext.accept(offer) or "")
        return Connection(ConnectionType.CLIENT, extensions=[ext])

    conn = deflating_client()
    big = "z" * 5000
    data = conn.send(TextMessage(big)) + conn.send(TextMessage("small"))
    parser = FrameParser(5000, deflate.negotiate({"HTTP_SEC_WEBSOCKET_EXTENSIONS": offer}))
    assert parser.feed(data) == [(OP_TEXT, big), (OP_TEXT, "small")]
    with pytest.raises(FrameError) as caught:  # a small frame that inflates past the cap
        FrameParser(4999, deflate.negotiate({"HTTP_SEC_WEBSOCKET_EXTENSIONS": offer})).feed(
            deflating_client().send(TextMessage(big)))
    assert caught.value.code == 1009
