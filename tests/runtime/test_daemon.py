"""The in-process daemon: its stop with a stuck worker, what it reports, what it logs."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from edgerunner.bundle.store import Bundle
from edgerunner.errors import ExitCode
from edgerunner.runtime.health import Health
from edgerunner.runtime.protocol import ErrorEvent
from edgerunner.runtime.scheduler import Stats
from edgerunner.runtime.supervise.daemon import seconds_since_exec
from edgerunner.runtime.supervise.logfmt import LogfmtFormatter
from edgerunner.runtime.supervise.metrics import render_metrics
from tests.runtime.conftest import Collector, RunningDaemon, chat, make_config


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
    sink = Collector(on_text=lambda e: (generating.set(), gate.wait(60)))
    scheduler.submit(chat("n", max_tokens=20, stream=True), sink=sink)
    assert generating.wait(30)
    try:
        with caplog.at_level(logging.ERROR, logger="edgerunner"):
            assert running.stop() == ExitCode.ERROR
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


def fake_sys(root: Path, *, temp_mc: int, throttled_hex: str) -> Path:
    """A /proc + /sys tree: plenty of memory, one thermal zone, the Pi firmware's word."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/meminfo").write_text("MemAvailable:   4096000 kB\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{temp_mc}\n")
    firmware = root / "sys/devices/platform/soc/soc:firmware"
    firmware.mkdir(parents=True, exist_ok=True)
    (firmware / "get_throttled").write_text(f"{throttled_hex}\n")
    return root


def test_health_and_metrics_report_temperature_and_throttling(
    bundle: Bundle, short_tmp: Path
) -> None:
    # 0x50005: under-voltage and throttled now, and both since boot
    root = fake_sys(short_tmp / "root", temp_mc=71500, throttled_hex="50005")
    config = make_config(short_tmp / "d.sock", guard_root=root, rss_ceiling_mb=1_000_000)
    running = RunningDaemon(bundle, config).start()
    try:
        with running.client(timeout=30) as client:
            health = client.get("/health").json()
            metrics = client.get("/metrics").text
        assert health["temperature_c"] == 71.5
        flags = health["throttled"]
        assert flags["raw"] == 0x50005
        assert flags["under_voltage"] and flags["throttled"] and flags["throttled_occurred"]
        assert not flags["freq_capped"] and not flags["soft_temp_limit_occurred"]
        # what MQTT info publishes
        assert running.daemon.health().model_dump(mode="json")["throttled"] == flags
        lines = set(metrics.splitlines())
        assert "edgerunner_temperature_celsius 71.5" in lines
        assert "edgerunner_throttled 1" in lines and "edgerunner_under_voltage 1" in lines
        assert 'edgerunner_throttle_flag{flag="throttled_occurred"} 1' in lines
        assert 'edgerunner_throttle_flag{flag="freq_capped"} 0' in lines

        # the supply recovers; only the since-boot bits stay
        fake_sys(root, temp_mc=50000, throttled_hex="50000")
        guard = running.daemon.guard
        assert guard is not None
        guard.check()
        with running.client(timeout=30) as client:
            metrics = client.get("/metrics").text
        lines = set(metrics.splitlines())
        assert "edgerunner_throttled 0" in lines and "edgerunner_under_voltage 0" in lines
        assert 'edgerunner_throttle_flag{flag="under_voltage_occurred"} 1' in lines
    finally:
        running.stop()


def test_without_firmware_flags_there_are_no_throttle_metrics() -> None:
    text = render_metrics(Stats(), Health(temperature_c=40.0, throttled=None))
    assert "edgerunner_temperature_celsius 40" in text
    assert "throttle" not in text and "under_voltage" not in text


def _logged_lines(caplog: pytest.LogCaptureFixture) -> str:
    # as the daemon writes them: message plus every extra field (logfmt)
    formatter = LogfmtFormatter("%(levelname)s %(name)s: %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def _ask(running: RunningDaemon, prompt: str) -> None:
    with running.client(timeout=60) as client:
        reply = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text


def test_prompts_are_not_logged_by_default(
    served: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"plover-{uuid.uuid4().hex}"
    with caplog.at_level(logging.DEBUG):
        _ask(served, f"Tell nobody {secret}.")
    logged = _logged_lines(caplog)
    assert "queued" in logged and "done" in logged  # the request itself was logged
    assert secret not in logged


def test_log_prompts_logs_prompt_and_output(
    bundle: Bundle, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(short_tmp / "d.sock", log_prompts=True, rss_ceiling_mb=1_000_000)
    running = RunningDaemon(bundle, config).start()
    try:
        secret = f"plover-{uuid.uuid4().hex}"
        with caplog.at_level(logging.INFO):
            _ask(running, f"Tell nobody {secret}.")
        logged = _logged_lines(caplog)
        assert secret in logged
        assert "output chatcmpl-" in logged
    finally:
        running.stop()


def test_health_json_keeps_the_keys_clients_read() -> None:
    doc = Health().model_dump(mode="json")
    assert set(doc) == {"state", "model", "version", "pid", "uptime_s", "loaded", "plan",
                        "plan_shrunk", "memory", "queue", "prefix_cache", "temperature_c",
                        "throttled", "thermal", "cpu"}
    assert set(doc["memory"]) == {
        "predicted_mb", "rss_mb", "polled_rss_mb", "peak_rss_mb", "measured_over_predicted",
        "rss_ceiling_mb", "headroom_mb", "headroom_source", "reserve_mb", "psi_full_avg10",
        "guard", "guard_reason"}
    assert set(doc["queue"]) == {"depth", "max", "running", "slots"}
    assert set(doc["prefix_cache"]) == {"cells", "hits", "misses", "tokens_reused"}
    assert set(doc["cpu"]) == {"threads", "threads_planned", "cpus", "cpu_limits", "llama_path",
                               "preflight_cached", "preflight_s", "preflight_failures",
                               "llama_cpu_features"}


def test_ready_logs_where_start_up_time_went(
    bundle: Bundle, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(short_tmp / "d.sock", rss_ceiling_mb=1_000_000)
    caplog.set_level(logging.INFO)
    running = RunningDaemon(bundle, config).start()
    try:
        startup = [r for r in caplog.records if getattr(r, "event", None) == "startup"]
        assert len(startup) == 1
        phases = vars(startup[0])
        parts = ("preflight_s", "fit_s", "load_total_s", "warm_up_s", "serve_s")
        inside = ("load_s", "restore_s")
        assert all(phases[k] >= 0 for k in (*parts, *inside, "imports_s"))
        # the engine's parts and the serving imports beside them lie within the load; the whole sums
        # its phases
        assert sum(phases[k] for k in inside) <= phases["load_total_s"] + 0.002
        assert phases["imports_s"] <= phases["load_total_s"] + 0.002
        assert phases["total_s"] == pytest.approx(
            sum(phases[k] for k in parts) + phases["exec_s"], abs=0.005)
        # the chat template was compiled with the load, not left to the first request
        assert running.daemon.engine is not None and running.daemon.engine._formatter is not None
        # the warm-up decode is the worker's first act, on the thread that decodes, before READY
        warm = [r for r in caplog.records if getattr(r, "event", None) == "warm_up"]
        assert len(warm) == 1 and warm[0].threadName == "edgerunner-worker"
        assert caplog.records.index(warm[0]) < caplog.records.index(startup[0])
    finally:
        running.stop()


def test_seconds_since_exec_reads_proc(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "self").mkdir()
    # the command name may hold spaces and parentheses; starttime is field 22
    fields = ["S", *["0"] * 18, str(100 * ticks)]
    (tmp_path / "self/stat").write_text(f"42 (python (x) y) {' '.join(fields)} 0 0\n")
    (tmp_path / "uptime").write_text("102.50 7.00\n")
    assert seconds_since_exec(tmp_path) == pytest.approx(2.5)
    assert seconds_since_exec(tmp_path / "none") is None
    real = seconds_since_exec()
    assert real is not None and 0 <= real < time.monotonic() + 1
