"""The background ticker the memory guard and the systemd watchdog run on."""

from __future__ import annotations

import threading
import time

import pytest

from edgerunner.runtime.supervise.ticker import Ticker


def test_a_failing_tick_does_not_end_the_thread(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    third = threading.Event()

    def tick() -> None:
        calls.append(1)
        if len(calls) >= 3:
            third.set()
        if len(calls) == 1:
            raise OSError("a /proc read failed")

    ticker = Ticker("test-ticker", 0.01, tick)
    ticker.start()
    ticker.start()  # a second start is a no-op, not a second thread
    try:
        assert third.wait(10)
    finally:
        ticker.stop()
    assert not ticker.running
    assert "test-ticker: tick failed" in caplog.text
    stopped_at = len(calls)
    time.sleep(0.05)  # five intervals: a thread still running would tick
    assert len(calls) == stopped_at
    assert [t.name for t in threading.enumerate()].count("test-ticker") == 0
