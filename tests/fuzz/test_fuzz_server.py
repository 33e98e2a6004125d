"""The fuzz test of a live server, once per backend, and the case it found (see
tests/fuzz/__init__.py)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from conftest import Client

from .rig import Rig
from .spec import ALICE, BOB, FUZZ_IDS, MAX_SIZE
from .strategies import CASES

MAX_EXAMPLES = 300  # per backend

SUMMARIES: list[str] = []


class _FuzzReport:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if SUMMARIES:
            terminalreporter.write_sep("-", "volli fuzz")
            for line in SUMMARIES:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _fuzz_report(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("volli-fuzz-report"):
        manager.register(_FuzzReport(), "volli-fuzz-report")
    yield


@pytest.fixture
def reproducible_hypothesis(monkeypatch):
    """derandomize=True fixes the seed, but hypothesis also mixes in constants it finds in
    every local module imported so far: the cases would change with the tests selected
    and with any edit in volli/. Without those, they depend on this package and the pinned
    hypothesis only, so a CI failure replays with ``pytest tests/fuzz``. (Internal
    API of hypothesis 6.170; if it moves, this does nothing.)"""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # pragma: no cover
        yield
        return
    cache = getattr(getattr(providers, "CONSTANTS_CACHE", None), "cache", None)
    if not hasattr(providers, "_get_local_constants") or cache is None:  # pragma: no cover
        yield
        return
    empty = Constants()
    monkeypatch.setattr(providers, "_get_local_constants", lambda: empty)
    cache.clear()
    yield
    cache.clear()


# -- tests ----------------------------------------------------------------------------

TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*?(\S.*)$",
                       re.MULTILINE)


def padded_ping(length: int, char: str) -> str:
    """A ping of exactly ``length`` characters."""
    head, tail = '{"type":"ping","pad":"', '"}'
    return head + char * (length - len(head) - len(tail)) + tail


def fuzz_server(make_server):
    return make_server({"VOLLI_MAX_MESSAGE_SIZE": str(MAX_SIZE),
                        # the fuzzer's connection may stay unregistered for the whole run
                        "VOLLI_REGISTER_TIMEOUT": "600"})


def test_fuzz_live_server(make_server, backend_env, record_property, reproducible_hypothesis):
    backend = "redis" if backend_env.get("VOLLI_REDIS_URL") else "memory"
    srv = fuzz_server(make_server)
    started = time.monotonic()
    rig = Rig(srv)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], print_blob=False,
              report_multiple_bugs=False,  # after one failure the rest is mostly fallout
              suppress_health_check=list(HealthCheck))
    @given(case=CASES)
    @example(case=("binary", b"", None))
    @example(case=("sized", padded_ping(MAX_SIZE, "\U0001f600"), None))  # 4 bytes a char
    @example(case=("sized", padded_ping(MAX_SIZE + 1, "x"), [4000]))
    @example(case=("deep", "[" * 1025 + "]" * 1025, None))
    @example(case=("protocol", '{"type":"register","userId":"%s","publicKey":"a2V5"}'
                   % FUZZ_IDS[0], None))
    @example(case=("protocol", '{"type":"offer","to":"%s","offer":{},"requestId":1}'
                   % ALICE, None))
    @example(case=("deep", '{"type":"offer","to":"%s","offer":{"deep":%s}}'
                   % (BOB, "[" * 300 + "]" * 300), None))  # too deep to write back
    def fuzz(case):
        rig.run(case)

    passed = False
    try:
        fuzz()
        rig.finish()
        status, health = srv.http("/health")
        assert status == 200 and health["status"] == "ok", (status, health)
        assert health["online"] == len(rig.oracle.online), (health, rig.oracle.online)
        rig.close()

        log = srv.log()
        assert srv.proc.poll() is None, f"gunicorn exited:\n{log[-3000:]}"
        assert log.count("Booting worker") == 1, f"the worker was restarted:\n{log[-3000:]}"
        assert "WORKER TIMEOUT" not in log and "[CRITICAL]" not in log, log[-3000:]
        assert "Traceback" not in log, \
            f"tracebacks in the server log: {TRACEBACK.findall(log)}\n{log[-5000:]}"
        errors = [line for line in log.splitlines() if "[ERROR]" in line]
        assert not errors, errors
        assert rig.cases >= MAX_EXAMPLES  # hypothesis ran them all, and the explicit examples
        passed = True
    finally:
        rig.close()
        line = rig.summary(backend, time.monotonic() - started, passed)
        SUMMARIES.append(line)
        record_property("fuzz_cases", rig.cases)
        record_property("fuzz_summary", line)


def test_a_relay_too_deep_to_write_back_is_refused(make_server):
    srv = fuzz_server(make_server)
    a, b = Client(srv.url), Client(srv.url)
    try:
        a.register(FUZZ_IDS[0])
        b.register(FUZZ_IDS[1])
        nest = "[" * 300 + "]" * 300
        a.send('{"type":"offer","to":"%s","offer":{"deep":%s},"requestId":"d"}'
               % (FUZZ_IDS[1], nest))
        reply = a.recv()
        assert reply["code"] == "invalid-message" and reply["requestId"] == "d", reply
        assert a.request({"type": "ping", "requestId": "after"}) == {
            "type": "pong", "requestId": "after"}
    finally:
        a.close()
        b.close()
    assert "Traceback" not in srv.log()
