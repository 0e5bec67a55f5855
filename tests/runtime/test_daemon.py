"""The in-process daemon: its stop with a stuck worker, what it reports, what it logs."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from edgerunner.bundle import Bundle
from edgerunner.runtime.daemon import EXIT_ERROR
from edgerunner.runtime.protocol import DoneEvent, ErrorEvent, Event, TextEvent, parse_request
from tests.runtime.conftest import RunningDaemon, make_config


class Sink:
    """Records events; `on_text` runs on the worker thread for each streamed piece."""

    def __init__(self, on_text: Any = None) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.on_text = on_text

    def __call__(self, event: Event) -> None:
        self.events.put(event)
        if isinstance(event, TextEvent) and self.on_text is not None:
            self.on_text(event)

    def final(self, timeout: float = 60) -> DoneEvent | ErrorEvent:
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, (DoneEvent, ErrorEvent)):
                return event


def chat(content: str, **extra: Any) -> Any:
    return parse_request("chat", {"messages": [{"role": "user", "content": content}], **extra})


def test_a_worker_that_does_not_stop_keeps_the_model_and_exits_1(
    bundle: Bundle, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(short_tmp / "d.sock", drain_timeout_s=0, rss_ceiling_mb=1_000_000)
    running = RunningDaemon(bundle, config).start()
    daemon = running.daemon
    daemon.worker_stop_s = 0.2
    scheduler, engine = daemon.scheduler, daemon.engine
    assert scheduler is not None and engine is not None
    gate, generating = threading.Event(), threading.Event()
    # a sink stuck on the worker thread stands in for a worker stuck inside llama.cpp
    sink = Sink(on_text=lambda e: (generating.set(), gate.wait(60)))
    scheduler.submit(chat("n", max_tokens=20, stream=True), sink=sink)
    assert generating.wait(30)
    try:
        with caplog.at_level(logging.ERROR, logger="edgerunner"):
            assert running.stop() == EXIT_ERROR
        assert not scheduler.stopped and engine.loaded  # not freed under the worker
        assert "worker is still running" in caplog.text
    finally:
        gate.set()
    final = sink.final()
    assert isinstance(final, ErrorEvent) and final.error.code == "cancelled"
    for _ in range(600):
        if scheduler.stopped:
            break
        gate.wait(0.05)
    assert scheduler.stopped
    engine.close()
