"""The supervisor of background loops, in-process with gevent (no server): a loop that
raises is logged, counted and restarted; its state is what /health reports."""

import logging

import gevent
import pytest

from volli import supervise


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch):
    monkeypatch.setattr(supervise, "RESTART_FIRST", 0.05)


class Lines(logging.Handler):
    """The supervisor's log lines (other tests may stop volli's loggers propagating, so
    pytest's caplog cannot be relied on here)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.text = ""

    def emit(self, record):
        self.text += self.format(record) + "\n"


def test_a_loop_that_raises_is_logged_counted_and_restarted():
    failures, runs = [], []

    def flaky():
        runs.append(1)
        if len(runs) <= 2:
            raise RuntimeError("boom")
        gevent.sleep(10)  # then it runs for good

    loops = supervise.Loops(on_failure=failures.append)
    caplog = Lines()
    supervise.log.addHandler(caplog)
    try:
        greenlet = loops.start("flaky", flaky)
        gevent.sleep(0.01)  # first failure; waiting to restart
        assert loops.failing() == ["flaky"]
        gevent.sleep(0.5)
    finally:
        supervise.log.removeHandler(caplog)
    try:
        assert len(runs) == 3
        assert failures == ["flaky", "flaky"]
        assert loops.states == {"flaky": "running"} and loops.failing() == []
        assert caplog.text.count("background loop flaky failed") == 2
        assert "RuntimeError: boom" in caplog.text
    finally:
        greenlet.kill()


def test_a_loop_that_keeps_failing_is_reported_with_a_growing_backoff():
    runs = []

    def broken():
        runs.append(gevent.get_hub().loop.now())
        raise ValueError("always")

    loops = supervise.Loops()
    greenlet = loops.start("broken", broken)
    gevent.sleep(0.5)
    try:
        assert loops.failing() == ["broken"]
        gaps = [b - a for a, b in zip(runs, runs[1:])]
        assert len(runs) >= 3 and gaps == sorted(gaps), gaps  # 0.05, 0.1, 0.2, ...
    finally:
        greenlet.kill()


def test_a_loop_that_returns_is_finished_not_failing():
    loops = supervise.Loops()
    loops.start("once", lambda: None).join()
    assert loops.states == {"once": "finished"} and loops.failing() == []
