"""The clients around the fuzzed server: two honest ones relaying to each other, a probe
that looks up presence, and the fuzzing connection that runs each case."""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from wsproto.events import BytesMessage, TextMessage

from conftest import RECV_TIMEOUT, Client
from rawclient import RawClient

from .oracle import Expect, Oracle, json_equal
from .spec import ALICE, BOB, DOCUMENTED_CODES, FUZZ_IDS, HONEST_KEYS, MAX_SIZE, PROBE
from .strategies import RAW_CASES

HONEST_CHECK_EVERY = 10  # cases between checks that every honest message arrived


def short(value: Any, limit: int = 300) -> str:
    try:
        text = value if isinstance(value, str) else repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to print>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class Honest:
    """A registered client relaying numbered messages to its peer, checking its own
    inbox: every message of the peer, intact and in order, and the fuzzer's relays that
    the oracle said would reach it, in order."""

    KINDS = [("offer", "offer"), ("answer", "answer"), ("ice-candidate", "candidate")]

    def __init__(self, url: str, me: str, peer: str) -> None:
        self.me, self.peer = me, peer
        self.client = Client(url)
        self.client.register(me, HONEST_KEYS[me])
        self.outbox: list[dict[str, Any]] = []
        self.received = 0
        self.from_fuzzer: collections.deque[dict[str, Any]] = collections.deque()
        self.fuzzer_received = 0

    def send(self) -> None:
        seq = len(self.outbox)
        kind, field = self.KINDS[seq % 3]
        payload = None if kind == "ice-candidate" and seq % 2 else {
            "type": kind, "sdp": f"v=0\r\ns=seq {seq} from {self.me}\r\n"}
        body = {"type": kind, "to": self.peer, field: payload, "seq": seq,
                "requestId": f"{self.me}#{seq}"}
        self.client.ws.send(orjson.dumps(body).decode())
        self.outbox.append(body)

    def check(self, peer: "Honest") -> None:
        while self.received < len(peer.outbox) or self.from_fuzzer:
            try:
                message = orjson.loads(self.client.ws.recv(timeout=RECV_TIMEOUT))
            except TimeoutError:
                pytest.fail(f"{self.me} lost messages: {self.received} of "
                            f"{len(peer.outbox)} from {self.peer} arrived, "
                            f"{len(self.from_fuzzer)} relays from the fuzzer missing")
            if message.get("from") == self.peer:
                expected = {**peer.outbox[self.received], "from": self.peer}
                assert message == expected, \
                    f"{self.me}: honest message #{self.received} arrived as {short(message)}"
                self.received += 1
            elif self.from_fuzzer:
                expected = self.from_fuzzer.popleft()
                assert json_equal(message, expected), (
                    f"{self.me}: fuzzer relay arrived as {short(message)}, "
                    f"expected {short(expected)}")
                self.fuzzer_received += 1
            else:
                pytest.fail(f"{self.me} got an unexpected message: {short(message)}")

    def assert_quiet(self) -> None:
        with pytest.raises(TimeoutError):
            message = self.client.ws.recv(timeout=0.2)
            pytest.fail(f"{self.me} got an unexpected message: {short(message)}")


class Rig:
    def __init__(self, srv) -> None:
        self.srv = srv
        self.oracle = Oracle()
        self.stats: collections.Counter[str] = collections.Counter()
        self.probe = Client(srv.url)  # looks up presence, never relays
        self.probe.register(PROBE, HONEST_KEYS[PROBE])
        self.alice = Honest(srv.url, ALICE, BOB)
        self.bob = Honest(srv.url, BOB, ALICE)
        self.fuzzer = Client(srv.url)
        self.cases = 0

    # One case -------------------------------------------------------------------------

    def run(self, case: tuple) -> None:
        category, data, extra = case
        self.cases += 1
        self.stats["case:" + category] += 1
        self.alice.send()
        self.bob.send()
        if category in RAW_CASES:
            self._raw(data, extra)
        elif category == "binary":
            self._binary(data)
        else:
            self._text(data, extra)
        if self.cases % HONEST_CHECK_EVERY == 0:
            self.check_honest()

    def _text(self, text: str, cuts: list[int] | None) -> None:
        expect = self.oracle.predict(text)
        self._send(text, cuts)
        if expect.kind == "close":
            self._expect_close(expect.close_code)
            return
        replies = self._replies()
        if expect.too_deep and replies and replies[0].get("code") == "invalid-json":
            # "Too deep" has no documented depth: refusing what cannot be echoed is fine.
            self._check_error(replies, {"invalid-json"}, None)
            self.stats["deep refused as invalid-json"] += 1
            return
        if expect.kind == "reply":
            assert replies == [expect.reply], f"expected {expect.reply}, got {short(replies)}"
            self.stats["reply:" + expect.reply["type"]] += 1
            if expect.register:
                user_id, key = expect.register
                self.oracle.own = user_id
                self.oracle.online.add(user_id)
                self.oracle.keys[user_id] = key
        elif expect.kind == "error":
            self._check_error(replies, expect.codes, expect.request_id)
        else:
            self._relayed(expect, replies)

    def _relayed(self, expect: Expect, replies: list[dict[str, Any]]) -> None:
        if expect.target == self.oracle.own:
            assert len(replies) == 1 and json_equal(replies[0], expect.body), (
                f"relay to itself came back as {short(replies)}, expected {short(expect.body)}")
            self.stats["relayed to itself"] += 1
            return
        assert replies == [], f"a successful relay got a reply: {short(replies)}"
        honest = {ALICE: self.alice, BOB: self.bob}.get(expect.target)
        if honest is not None:
            honest.from_fuzzer.append(expect.body)
            self.stats["relayed to an honest client"] += 1
        else:  # the probe, by a random userId that happened to be its own
            self.stats["relayed to the probe"] += 1

    def _check_error(self, replies: list[dict[str, Any]], codes: frozenset[str] | set[str],
                     request_id: Any) -> None:
        assert len(replies) == 1, f"expected one error {set(codes)}, got {short(replies)}"
        reply = replies[0]
        assert reply.get("type") == "error" and reply.get("code") in codes, \
            f"expected an error {sorted(codes)}, got {short(reply)}"
        assert reply["code"] in DOCUMENTED_CODES, reply
        assert isinstance(reply.get("message"), str) and reply["message"], reply
        keys = {"type", "code", "message"} | ({"requestId"} if request_id is not None else set())
        assert set(reply) == keys, f"error fields {sorted(reply)}, expected {sorted(keys)}"
        if request_id is not None:
            echoed = reply["requestId"]
            assert echoed == request_id and type(echoed) is type(request_id), \
                f"requestId {request_id!r} echoed as {echoed!r}"
        self.stats["error:" + reply["code"]] += 1

    def _binary(self, data: bytes) -> None:
        self._send(data, None)
        if len(data) > MAX_SIZE:
            self._expect_close(1009)
        else:
            self._check_error(self._replies(), {"binary-frame"}, None)

    def _raw(self, data: bytes, expect: int | dict[str, Any]) -> None:
        raw = RawClient(self.srv.port)
        try:
            raw.send_raw(data)
            if isinstance(expect, dict):
                reply = orjson.loads(raw.next_message())
                assert reply == expect, f"expected {expect}, got {short(reply)}"
                self.stats["reply:" + reply["type"]] += 1
                return
            code = raw.wait_close()
            messages = [e for e in raw.events if isinstance(e, (TextMessage, BytesMessage))]
            assert code == expect and not messages, \
                f"expected close {expect} and no message, got close {code} after {messages}"
            self.stats[f"close:{code}"] += 1
        finally:
            raw.close()

    # The fuzzing connection -------------------------------------------------------------

    def _send(self, data: str | bytes, cuts: list[int] | None) -> None:
        if cuts and data:
            points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
            pieces = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
            if len(pieces) > 1:
                self.stats["fragmented"] += 1
                data = pieces
        try:
            self.fuzzer.ws.send(data)
        except ConnectionClosed:
            pass  # closed while sending (too big): _expect_close reads the code

    def _replies(self) -> list[dict[str, Any]]:
        """Everything the server sends before the pong to a ping sent right after the case:
        replies to one connection come in the order of its requests."""
        sentinel = f"sentinel-{self.cases}"
        self.fuzzer.ws.send(json.dumps({"type": "ping", "requestId": sentinel}))
        replies = []
        while True:
            reply = orjson.loads(self.fuzzer.ws.recv(timeout=RECV_TIMEOUT))
            if reply == {"type": "pong", "requestId": sentinel}:
                return replies
            replies.append(reply)
            assert len(replies) < 5, f"too many replies: {short(replies)}"

    def _expect_close(self, code: int) -> None:
        try:
            message = self.fuzzer.ws.recv(timeout=RECV_TIMEOUT)
        except ConnectionClosed as exc:
            got = exc.rcvd.code if exc.rcvd is not None else None
            assert got == code, f"expected close {code}, got {got} ({exc})"
        else:
            pytest.fail(f"expected close {code}, got a message: {short(message)}")
        self.stats[f"close:{code}"] += 1
        self.fuzzer.close()
        if self.oracle.own is not None:
            self._await_offline(self.oracle.own)
            self.oracle.online.discard(self.oracle.own)
            self.oracle.own = None
        self.fuzzer = Client(self.srv.url)
        self.stats["reconnects"] += 1
        if self.stats["reconnects"] % 4:
            # Mostly carry on registered (relays, discover, already-registered need it),
            # sometimes as a user whose key the server remembers from an earlier connection.
            user_id = FUZZ_IDS[self.stats["reconnects"] % len(FUZZ_IDS)]
            self._text(json.dumps({"type": "register", "userId": user_id,
                                   "publicKey": f"a2V5{self.stats['reconnects']}"}), None)
            assert self.oracle.own == user_id

    def _await_offline(self, user_id: str) -> None:
        """Presence ends as soon as the server starts closing; the close frame can reach
        the client a moment before that."""
        end = time.monotonic() + 5
        while self.probe.call({"type": "discover", "userId": user_id})["online"]:
            assert time.monotonic() < end, f"{user_id!r} still online after its close"
            time.sleep(0.01)

    # The end ----------------------------------------------------------------------------

    def check_honest(self) -> None:
        self.alice.check(self.bob)
        self.bob.check(self.alice)

    def finish(self) -> None:
        self.check_honest()
        self.alice.assert_quiet()
        self.bob.assert_quiet()
        assert self.fuzzer.request({"type": "ping", "requestId": "last"}) == {
            "type": "pong", "requestId": "last"}

    def close(self) -> None:
        for client in (self.fuzzer, self.alice.client, self.bob.client, self.probe):
            client.close()

    def summary(self, backend: str, seconds: float, passed: bool) -> str:
        stats = self.stats
        cases = ", ".join(f"{k[5:]} {v}" for k, v in sorted(stats.items())
                          if k.startswith("case:"))
        errors = {k[6:]: v for k, v in sorted(stats.items()) if k.startswith("error:")}
        replies = {k[6:]: v for k, v in sorted(stats.items()) if k.startswith("reply:")}
        closes = ", ".join(f"{v} closes {k[6:]}" for k, v in sorted(stats.items())
                           if k.startswith("close:"))
        honest = len(self.alice.outbox) + len(self.bob.outbox)
        relayed = stats["relayed to an honest client"] + stats["relayed to itself"]
        verdict = ("honest messages all delivered in order, server log clean"
                   if passed else "FAILED (see above)")
        return (f"fuzz [{backend}]: {self.cases} cases in {seconds:.1f}s ({cases}); "
                f"{sum(errors.values())} errors by code {errors}; replies {replies}; "
                f"{closes}; {relayed} fuzzer relays delivered, {stats['fragmented']} sent "
                f"fragmented, {stats['reconnects']} reconnects; {honest} honest messages; "
                f"{verdict}")
