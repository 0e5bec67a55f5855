"""`edgerunner serve` as a real process: drain on SIGTERM, exit codes, memory it reports."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from edgerunner.bundle.store import Bundle

LONG = {"type": "json_schema", "json_schema": {"name": "nums", "schema": {
    "type": "array", "items": {"type": "integer"}, "minItems": 1000}}}


@pytest.mark.slow
def test_health_rss_matches_the_prediction_at_a_full_context(spawn: Any, bundle: Bundle) -> None:
    # the bundle's own context, filled, takes minutes of prompt processing on a shared CI
    # core; a smaller served context checks the same memory model, re-predicted for it
    n_ctx = 2048
    assert bundle.manifest.plan.n_ctx >= n_ctx
    serve = spawn("--n-ctx", str(n_ctx))
    serve.wait_ready()
    with serve.client(timeout=600) as http:
        predicted = http.get("/health").json()["memory"]["predicted_mb"]
        # the prediction is the peak: a prompt that fills the whole context window
        probe = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "tell me about the sea " * n_ctx}],
            "max_tokens": 1}).json()["error"]["message"]
        too_many = int(probe.split("prompt is ")[1].split()[0])
        reps = n_ctx * (n_ctx - 64) // too_many
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "tell me about the sea " * reps}],
            "max_tokens": 16})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > n_ctx - 600
        memory = http.get("/health").json()["memory"]
    full = bundle.manifest.prediction.memory.total_mb
    assert predicted < full or n_ctx == bundle.manifest.plan.n_ctx
    # what the memory model predicts vs what this process measures of itself
    assert memory["rss_mb"] == pytest.approx(predicted, rel=0.10), memory

    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0


def sigterm_mid_stream(serve: Any, max_tokens: int,
                       sig: signal.Signals = signal.SIGTERM) -> list[str]:
    """Start a long stream, signal the daemon at its first chunk; the SSE lines it got."""
    lines: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        with serve.client() as http, http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "numbers"}], "max_tokens": max_tokens,
            "stream": True, "response_format": LONG,
        }) as r:
            for line in r.iter_lines():
                lines.append(line)
                first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    serve.proc.send_signal(sig)
    reader.join(120)
    return lines


@pytest.mark.slow
def test_sigterm_drains_in_flight_work_and_cleans_up(spawn: Any) -> None:
    serve = spawn()
    serve.wait_ready()
    lines = sigterm_mid_stream(serve, max_tokens=150)
    assert serve.wait() == 0
    assert not serve.socket.exists()
    # the in-flight stream was finished, not cut
    assert [ln for ln in lines if ln][-1] == "data: [DONE]"
    final = json.loads([ln for ln in lines if ln.startswith("data: {")][-1][6:])
    assert final["choices"][0]["finish_reason"] == "length"
    err = serve.stderr()
    assert "Traceback" not in err and "exit code 0" in err


@pytest.mark.slow
def test_sighup_is_ignored_mid_stream(spawn: Any) -> None:
    serve = spawn()
    serve.wait_ready()
    lines = sigterm_mid_stream(serve, max_tokens=60, sig=signal.SIGHUP)
    assert [ln for ln in lines if ln][-1] == "data: [DONE]"
    assert serve.proc.poll() is None  # still serving
    with serve.client() as http:
        assert http.get("/health").json()["state"] == "ready"
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0
    assert not serve.socket.exists()
    assert "SIGHUP ignored" in serve.stderr()


@pytest.mark.slow
def test_drain_timeout_cancels_what_is_left(spawn: Any) -> None:
    serve = spawn("--drain-timeout", "0.3")
    serve.wait_ready()
    lines = sigterm_mid_stream(serve, max_tokens=1800)
    assert serve.wait() == 0
    assert not serve.socket.exists()
    error = json.loads([ln for ln in lines if ln.startswith('data: {"error"')][-1][6:])
    assert error["error"]["code"] == "cancelled"
    assert "drain timeout" in serve.stderr()


def fake_root(root: Path, available_mb: int) -> Path:
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemAvailable: {available_mb * 1024} kB\n")
    return root


@pytest.mark.slow
def test_plan_that_does_not_fit_exits_3(spawn: Any, short_tmp: Path) -> None:
    root = fake_root(short_tmp / "root", available_mb=150)
    serve = spawn("--strict", env={"EDGERUNNER_GUARD_ROOT": str(root)})
    assert serve.wait() == 3
    err = serve.stderr()
    assert "--strict" in err and "MiB" in err
    assert not serve.socket.exists()
    serve = spawn(env={"EDGERUNNER_GUARD_ROOT": str(root), "EDGERUNNER_MEMORY_RESERVE_MB": "200"})
    assert serve.wait() == 3
    assert "nothing fits" in serve.stderr()


@pytest.mark.slow
def test_start_up_shrinks_the_context_to_fit(spawn: Any, short_tmp: Path, bundle: Bundle) -> None:
    memory = bundle.manifest.prediction.memory
    # room for the plan minus most of its KV cache, plus the reserve; the daemon counts its
    # already-resident interpreter (the estimate's overhead part) as taken, not needed
    room = memory.total_mb - memory.overhead_mb - 0.6 * memory.kv_mb + 20
    root = fake_root(short_tmp / "root", available_mb=int(room))
    serve = spawn("--reserve-mb", "20", env={"EDGERUNNER_GUARD_ROOT": str(root)})
    serve.wait_ready()
    with serve.client() as http:
        health = http.get("/health").json()
    assert health["plan_shrunk"] is True
    assert 256 <= health["plan"]["n_ctx"] < bundle.manifest.plan.n_ctx
    assert health["memory"]["predicted_mb"] < memory.total_mb
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.wait() == 0
    assert "shrank n_ctx" in serve.stderr()


@pytest.mark.slow
def test_rss_over_its_ceiling_drains_and_exits_4(spawn: Any) -> None:
    serve = spawn("--rss-ceiling-mb", "20")
    assert serve.wait() == 4
    err = serve.stderr()
    assert "ceiling" in err and "Traceback" not in err
    assert not serve.socket.exists()
