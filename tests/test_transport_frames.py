"""The sans-I/O frame codec (volli/transport/frames.py), checked against wsproto, a
reference implementation, as the client on the other side."""

from __future__ import annotations

import os

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import FrameDecoder

from rawclient import masked
from volli.transport.frames import (
    OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameError, FrameParser, close_frame, frame,
    unmask,
)


def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def client_bytes(*events) -> bytes:
    conn = client()
    return b"".join(conn.send(event) for event in events)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 1500, 65535, 65536, 70001])
def test_unmask_matches_the_bytewise_definition(size):
    data, mask = os.urandom(size), os.urandom(4)
    assert unmask(mask, data) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_messages_from_a_reference_client_in_any_split():
    text = '{"type":"offer","sdp":"' + "é" * 700 + "x" * 70000 + '"}'
    data = client_bytes(TextMessage(text), BytesMessage(b"\x00\xff"), Ping(b"hi"),
                        Message(data="a", message_finished=False), Message(data="b"),
                        TextMessage("last"))
    expected = [(OP_TEXT, text), (OP_BINARY, b"\x00\xff"), (OP_PING, b"hi"), (OP_TEXT, "ab"),
                (OP_TEXT, "last")]
    for step in (len(data), 1, 7, 4096):
        parser = FrameParser(100_000)
        events = []
        for i in range(0, len(data), step):
            events += parser.feed(data[i:i + step])
        assert events == expected, step


def test_a_character_split_across_fragments_is_one_message():
    raw = "€".encode()
    data = masked(OP_TEXT, raw[:1], fin=False) + masked(0, raw[1:2], fin=False) \
        + masked(OP_PING, b"") + masked(0, raw[2:])
    assert FrameParser(10).feed(data) == [(OP_PING, b""), (OP_TEXT, "€")]


@pytest.mark.parametrize("payload,expected", [
    (b"", (1005, "")), ((1000).to_bytes(2, "big") + b"bye", (1000, "bye")),
    ((4999).to_bytes(2, "big"), (4999, "")), ((1013).to_bytes(2, "big"), (1013, "")),
])
def test_close_frames(payload, expected):
    events = FrameParser(10).feed(masked(OP_CLOSE, payload) + masked(OP_TEXT, b"ignored"))
    assert events == [(OP_CLOSE, expected)]


VIOLATIONS = {
    "rsv1 without deflate": masked(OP_TEXT, b"{}", rsv=4),
    "rsv2": masked(OP_TEXT, b"{}", rsv=2),
    "reserved opcode": masked(0x3, b""),
    "reserved control opcode": masked(0xB, b""),
    "unmasked": bytes([0x81, 2]) + b"{}",
    "continuation first": masked(0, b"x"),
    "text inside a message": masked(OP_TEXT, b"a", fin=False) + masked(OP_TEXT, b"b"),
    "long ping": masked(OP_PING, b"x" * 126),
    "fragmented ping": masked(OP_PING, b"", fin=False),
    "1-byte close": masked(OP_CLOSE, b"\x03"),
    "close 1005": masked(OP_CLOSE, (1005).to_bytes(2, "big")),
    "close 1004": masked(OP_CLOSE, (1004).to_bytes(2, "big")),
    "close 2999": masked(OP_CLOSE, (2999).to_bytes(2, "big")),
    "close 5000": masked(OP_CLOSE, (5000).to_bytes(2, "big")),
    "non-minimal 16-bit length": bytes([0x81, 0xFE, 0, 2]) + b"\0\0\0\0{}",
    "non-minimal 64-bit length": bytes([0x81, 0xFF]) + (2).to_bytes(8, "big") + b"\0\0\0\0{}",
    "top length bit": bytes([0x81, 0xFF]) + (2 ** 63).to_bytes(8, "big"),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_violations_close_with_1002(name):
    with pytest.raises(FrameError) as caught:
        FrameParser(100).feed(masked(OP_PING, b"before") + VIOLATIONS[name])
    assert caught.value.code == 1002
    assert caught.value.events == [(OP_PING, b"before")]


@pytest.mark.parametrize("data", [
    masked(OP_TEXT, b"\xff"), masked(OP_TEXT, b"\xe2\x82"),
    masked(OP_TEXT, b"\xc3", fin=False) + masked(0, b"x"),
    masked(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"),
])
def test_invalid_utf8_closes_with_1007(data):
    with pytest.raises(FrameError) as caught:
        FrameParser(100).feed(data)
    assert caught.value.code == 1007


def test_size_cap_counts_characters_of_text_and_bytes_of_binary():
    parser = FrameParser(10)
    assert parser.feed(masked(OP_TEXT, "é".encode() * 10)) == [(OP_TEXT, "é" * 10)]
    assert parser.feed(masked(OP_BINARY, b"x" * 10)) == [(OP_BINARY, b"x" * 10)]
    for data in (masked(OP_TEXT, b"x" * 11), masked(OP_BINARY, b"x" * 11),
                 masked(OP_TEXT, b"x" * 6, fin=False) + masked(0, b"x" * 5)):
        with pytest.raises(FrameError) as caught:
            FrameParser(10).feed(data)
        assert caught.value.code == 1009


def test_an_oversized_header_is_refused_before_its_payload_arrives():
    with pytest.raises(FrameError) as caught:
        FrameParser(1000).feed(bytes([0x81, 0xFF]) + (10 ** 9).to_bytes(8, "big"))
    assert caught.value.code == 1009


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_decode_in_a_reference_parser(size):
    decoder = FrameDecoder(client=True)
    payload = os.urandom(size)
    decoder.receive_bytes(frame(OP_BINARY, payload) + frame(OP_PONG, b"p")
                          + close_frame(1001, "bye") + close_frame(1005))
    frames = []
    while (f := decoder.process_buffer()) is not None:
        frames.append((f.opcode.value, f.payload))
    assert frames == [(OP_BINARY, payload), (OP_PONG, b"p"),
                      (OP_CLOSE, b"\x03\xe9bye"), (OP_CLOSE, b"")]


def test_close_connection_event_is_a_reference_close():
    data = client_bytes(CloseConnection(code=1000, reason="done"))
    assert FrameParser(10).feed(data) == [(OP_CLOSE, (1000, "done"))]


def test_a_continuation_read_in_pieces_counts_its_size_once():
    # 61,020 characters (122,040 bytes) under a 65,536 cap, the second half in many reads:
    # each re-read of the incomplete continuation once added its length again (1009).
    text = "é" * 61020
    raw = text.encode()
    cont = masked(0, raw[len(raw) // 2:])
    parser = FrameParser(65536)
    events = parser.feed(masked(OP_TEXT, raw[:len(raw) // 2], fin=False))
    for i in range(0, len(cont), 4096):
        events += parser.feed(cont[i:i + 4096])
    assert events == [(OP_TEXT, text)]


def test_a_frame_in_one_byte_reads_is_not_parsed_again_per_read(monkeypatch):
    calls = []
    check = FrameParser._check_header
    monkeypatch.setattr(FrameParser, "_check_header",
                        lambda self, *args: calls.append(args) or check(self, *args))
    payload = os.urandom(256 * 1024)
    data = masked(OP_BINARY, payload) + masked(OP_PING, b"after")
    parser = FrameParser(len(payload))
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i:i + 1])
    assert events == [(OP_BINARY, payload), (OP_PING, b"after")]
    # A header is checked when it is complete and once more with its payload, not per
    # read (the old parser rebuilt its buffer and parsed it again 262,000 times).
    assert len(calls) <= 4, len(calls)
