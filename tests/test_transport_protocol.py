"""The sans-I/O connection protocol (volli/transport/protocol.py): bytes in, events out,
buffers out, with no socket, greenlet or timer anywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from rawclient import masked
from volli.transport.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, frame
from volli.transport.protocol import (
    BUSY, FRAME_BATCH, FULL, NOT_OPEN, QUEUED, ServerProtocol, State,
)

LIMIT = 10_000


def protocol(limit: int = LIMIT) -> ServerProtocol:
    return ServerProtocol(max_message_size=65536, queue_limit=limit)


def receive(proto: ServerProtocol, data: bytes) -> list:
    proto.receive_data(data)
    return list(proto.events_received())


def written(proto: ServerProtocol, budget: int | None = None) -> bytes:
    """Write as a socket would: all of it, or at most ``budget`` bytes."""
    bufs = proto.data_to_send()
    data = b"".join(bytes(b) for b in bufs)
    if budget is not None:
        data = data[:budget]
    proto.data_sent(len(data))
    return data


def server_frames(data: bytes) -> list[tuple[Opcode, object]]:
    """Frames as wsproto (a reference client) reads them: text as str, close as a tuple."""
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(data)
    return [(f.opcode, f.payload) for f in parser.received_frames()]


def imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_the_protocol_imports_no_io():
    assert not imported_by("volli.transport.protocol") & {
        "gevent", "flask", "flask_sock", "simple_websocket", "gunicorn", "redis"}


def test_the_transport_is_below_flask_and_the_runtime():
    modules = imported_by("volli.transport.connection, volli.transport.handshake")
    assert not modules & {"flask", "flask_sock", "volli.runtime", "volli.hub", "volli.app"}


def test_masked_and_fragmented_frames_in_any_split_are_one_message():
    data = (masked(OP_TEXT, b"hel", fin=False, mask=b"\x09\x08\x07\x06")
            + masked(OP_CONT, b"", fin=False) + masked(OP_CONT, "lo é".encode())
            + masked(OP_BINARY, b"\x00\xff"))
    for split in range(len(data) + 1):
        proto = protocol()
        events = receive(proto, data[:split]) + receive(proto, data[split:])
        assert events == [(OP_TEXT, "hello é"), (OP_BINARY, b"\x00\xff")], split
        assert proto.state is State.OPEN


def test_ping_then_ping_is_answered_once_with_the_latest():
    proto = protocol()
    events = receive(proto, masked(OP_PING, b"one") + masked(OP_PING, b"two"))
    assert events == [(OP_PING, b"one"), (OP_PING, b"two")]  # each: a pong waits
    assert proto.queued == len(frame(OP_PONG, b"two"))
    assert server_frames(written(proto)) == [(Opcode.PONG, b"two")]
    assert not proto.has_output() and proto.queued == 0


def test_a_pong_only_clears_the_keepalive():
    proto = protocol()
    assert proto.send_ping() and proto.awaiting_pong
    assert server_frames(written(proto)) == [(Opcode.PING, b"")]
    assert receive(proto, masked(OP_PONG, b"")) == []
    assert not proto.awaiting_pong and not proto.has_output()


def test_the_peer_closes_first_its_code_is_echoed():
    proto = protocol()
    events = receive(proto, masked(OP_TEXT, b"a") + masked(OP_CLOSE, (4000).to_bytes(2, "big")
                                                           + b"bye") + masked(OP_TEXT, b"b"))
    assert events == [(OP_TEXT, "a"), (OP_CLOSE, (4000, ""))]
    # The driver records the code, then (presence released) queues the echo.
    assert proto.begin_close(4000) and proto.state is State.CLOSING
    proto.send_close(4000, "")
    assert proto.close_expected()
    assert server_frames(written(proto)) == [(Opcode.CLOSE, (4000, ""))]
    assert proto.receive_eof() == {} and proto.state is State.CLOSED


def test_we_close_first_then_input_is_discarded_and_nothing_follows_our_close_frame():
    proto = protocol()
    assert proto.send_text("before") == QUEUED
    assert proto.begin_close(1000) and not proto.begin_close(1011)  # first one wins
    assert proto.close_code == 1000
    # Input after the close decision: discarded, pings unanswered.
    assert receive(proto, masked(OP_PING, b"late") + masked(OP_TEXT, b"late")) == []
    assert proto.send_text("after") == NOT_OPEN and not proto.send_ping()
    proto.send_close(1000, "done")
    assert proto.send_text("after the frame") == NOT_OPEN
    assert server_frames(written(proto)) == [
        (Opcode.TEXT, "before"), (Opcode.CLOSE, (1000, "done"))]
    assert not proto.has_output()


def test_a_close_decided_while_handling_a_read_stops_its_remaining_events():
    proto = protocol()
    proto.receive_data(masked(OP_TEXT, b"first") + masked(OP_PING, b"p")
                       + masked(OP_TEXT, b"second"))
    seen = []
    for event in proto.events_received():
        seen.append(event)
        proto.begin_close(4001)  # the hub closes it while handling the first message
    assert seen == [(OP_TEXT, "first")]
    assert not proto.has_output()  # the ping after the close was not answered


def test_a_violation_closes_after_the_valid_events_before_it():
    proto = protocol()
    bad = bytes([0x81, 0x01]) + b"x"  # unmasked
    assert receive(proto, masked(OP_TEXT, b"ok") + bad) == [
        (OP_TEXT, "ok"), (OP_CLOSE, (1002, "client frames must be masked"))]


def test_every_frame_counts_toward_the_frame_rate_in_batches():
    proto = protocol()
    charged = 0
    for _ in range(FRAME_BATCH - 1):
        charged += proto.receive_data(masked(OP_PING, b""))
        list(proto.events_received())
    assert charged == 0
    data = masked(OP_TEXT, b"a", fin=False) + masked(OP_CONT, b"b")  # continuations too
    assert proto.receive_data(data) == FRAME_BATCH + 1
    assert list(proto.events_received()) == [(OP_TEXT, "ab")]
    assert proto.receive_data(masked(OP_PONG, b"")) == 0


def test_a_relay_past_the_limit_is_busy_and_anything_else_past_it_is_full():
    proto = protocol(limit=1000)
    assert proto.send_text("x" * 600, origin="alice") == QUEUED  # an empty queue takes it
    assert proto.send_text("y" * 600, origin="alice") == BUSY  # the relay waits
    assert proto.send_text("z" * 600) == FULL  # our own message: the peer is too slow
    assert proto.queued == len(frame(OP_TEXT, b"x" * 600))


def test_a_relay_past_an_eighth_waits_while_the_window_is_full():
    proto = protocol(limit=8000)
    assert proto.send_text("a" * 900, origin="alice", window_full=True) == QUEUED
    assert proto.send_text("b" * 200, origin="bob", window_full=True) == BUSY
    assert proto.send_text("b" * 200, origin="bob", window_full=False) == QUEUED


def test_backpressure_thresholds():
    proto = protocol(limit=8000)
    proto.send_text("a" * 4000)
    assert proto.should_pause() and not proto.may_resume()  # over a half
    written(proto, budget=3000)
    assert not proto.should_pause() and not proto.may_resume()
    written(proto, budget=5)  # now under an eighth
    assert proto.may_resume()
    proto.begin_close(1000)
    proto.send_text("b")
    assert not proto.should_pause()


def test_a_pong_waits_for_a_partly_written_frame_and_then_goes_first():
    proto = protocol()
    proto.send_text("a" * 300)
    proto.send_text("b" * 10)
    head = written(proto, budget=100)  # the first frame partly written
    assert proto.offset == 100
    receive(proto, masked(OP_PING, b"p"))
    rest = written(proto, budget=len(frame(OP_TEXT, b"a" * 300)) - 100)
    assert proto.offset == 0
    tail = written(proto)
    assert server_frames(head + rest + tail) == [
        (Opcode.TEXT, "a" * 300), (Opcode.PONG, b"p"), (Opcode.TEXT, "b" * 10)]
    assert proto.queued == 0


def test_a_pong_not_written_at_all_is_still_replaced_by_a_newer_one():
    proto = protocol()
    receive(proto, masked(OP_PING, b"old"))
    proto.data_to_send()
    proto.data_sent(0)  # the socket took nothing
    receive(proto, masked(OP_PING, b"new"))
    assert server_frames(written(proto)) == [(Opcode.PONG, b"new")]
    assert proto.queued == 0


def test_dropping_a_slow_consumer_keeps_the_started_frame_and_counts_the_rest_per_origin():
    proto = protocol(limit=100_000)
    for origin in ["alice", "bob", "alice", None, "alice"]:
        proto.send_text("m" * 1000, origin=origin)
    first = written(proto, budget=500)  # alice's first relay, partly
    receive(proto, masked(OP_PING, b"p"))
    undelivered = proto.drop_queue(keep_started=True)
    assert undelivered == {"alice": 2, "bob": 1}
    rest = written(proto)
    frames = server_frames(first + rest)
    assert frames == [(Opcode.TEXT, "m" * 1000)]  # whole, and no pong after it
    assert proto.queued == 0 and not proto.has_output()


def test_frames_handed_to_a_blocking_write_are_kept_as_started():
    proto = protocol(limit=100_000)
    for origin in ["alice", "bob", "carol"]:
        proto.send_text("m" * 100, origin=origin)
    bufs = proto.data_to_send()  # a TLS sendall of all three is under way
    proto.send_text("later", origin="dave")
    assert proto.drop_queue(keep_started=True) == {"dave": 1}
    proto.data_sent(sum(len(b) for b in bufs))
    assert proto.queued == 0 and not proto.has_output()


def test_the_end_reports_everything_queued_per_origin():
    proto = protocol()
    proto.send_text("a", origin="alice")
    proto.send_text("b", origin="alice")
    proto.send_text("c")
    written(proto, budget=1)
    assert proto.receive_eof() == {"alice": 2}
    assert proto.state is State.CLOSED and proto.queued == 0


@pytest.mark.parametrize("count", [1, 600])
def test_one_write_takes_at_most_max_iov_buffers(count):
    proto = protocol(limit=10_000_000)
    for i in range(count):
        proto.send_text(str(i))
    bufs = proto.data_to_send()
    assert len(bufs) == min(count, 512)
    proto.data_sent(sum(len(b) for b in bufs))
    assert len(proto.data_to_send()) == count - len(bufs)


def test_a_relay_refused_busy_never_enters_the_deflate_stream():
    """The peer inflates every frame against the ones before it: a refused relay must
    leave the compressor as it was, so the next frames still inflate to what was sent."""
    import random
    import zlib

    from volli.transport.deflate import PerMessageDeflate

    proto = ServerProtocol(max_message_size=65536, queue_limit=LIMIT,
                           deflate=PerMessageDeflate(False, 15))
    rng = random.Random(7)
    texts = ["".join(rng.choice("abcdefgh") for _ in range(3000)) for _ in range(3)]
    assert proto.send_text(texts[0], origin="alice") == QUEUED
    assert proto.send_text(texts[1] * 4, origin="bob") == BUSY  # past the limit
    assert proto.send_text(texts[2], origin="carol") == QUEUED
    data, got, inflate = written(proto), [], zlib.decompressobj(-15)
    while data:  # unmasked server frames, RSV1 set (compressed)
        assert data[0] == 0x80 | 0x40 | OP_TEXT
        length, start = data[1], 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        payload, data = data[start:start + length], data[start + length:]
        got.append(inflate.decompress(payload + b"\x00\x00\xff\xff").decode())
    assert got == [texts[0], texts[2]]
