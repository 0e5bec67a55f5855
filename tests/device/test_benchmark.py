"""`bench` on the real packed bundle: real measurements, the CLI output, the calibration file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.bundle.store import load_bundle
from edgerunner.cli import main
from edgerunner.device.bench import (
    BenchResult,
    calibrated_profile,
    proc_status_mb,
    reset_peak_rss,
    run_bench,
    write_calibration,
)
from edgerunner.errors import EdgerunnerError
from edgerunner.host.cpu import cpu_budget, decode_threads
from edgerunner.profiles import resolve_profile

KEYS = {
    "bundle", "profile", "quant", "n_ctx", "n_threads", "load_s", "ttft_s", "prompt_tokens",
    "prompt_tps", "decode_tokens", "decode_tps", "filled_tokens", "baseline_rss_mb",
    "peak_rss_mb", "peak_rss_source", "predicted_for_this_run_mb", "predicted_full_context_mb",
    "predicted_decode_tps", "rss_over_predicted", "decode_over_predicted",
}


@pytest.fixture(scope="module")
def measured(rpi5_bundle: Path) -> BenchResult:
    return run_bench(load_bundle(rpi5_bundle), prompt_tokens=32, decode_tokens=16)


def test_bench_measures_the_real_model(measured: BenchResult, rpi5_bundle: Path) -> None:
    manifest = load_bundle(rpi5_bundle).manifest
    assert measured.bundle == manifest.name
    assert measured.prompt_tokens == 32
    assert measured.decode_tokens == 16
    assert measured.load_s > 0 and measured.ttft_s > 0
    assert measured.prompt_tps > 0 and measured.decode_tps > 0
    assert measured.filled_tokens == 32 + 16  # the prompt, then each decoded token fed back
    # The mapped weights (~100 MB, pre-faulted) are part of the kernel's peak.
    weights_mb = (rpi5_bundle / "model.gguf").stat().st_size / 2**20
    assert measured.peak_rss_mb - measured.baseline_rss_mb > 0.9 * weights_mb
    assert measured.predicted_full_context_mb == round(manifest.prediction.memory.total_mb, 1)
    # the plan's threads, capped at the CPUs this process may use (4 planned for rpi5)
    assert measured.n_threads == decode_threads(manifest.plan.n_threads, cpu_budget())


def test_bench_holds_the_peak_against_a_prediction_for_the_same_run(
    measured: BenchResult, rpi5_bundle: Path
) -> None:
    from edgerunner.host.cpu import host_cpu_features
    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.memory import estimate_memory

    plan = load_bundle(rpi5_bundle).manifest.plan
    same_run = estimate_memory(
        read_model_info(rpi5_bundle / "model.gguf"), plan.quant, plan.n_ctx, plan.kv_type,
        plan.n_batch, min(plan.n_ubatch, plan.n_batch), plan.flash_attn, plan.swa_full,
        filled=48, cpu_features=host_cpu_features(), mmap=plan.mmap,
    )
    assert measured.predicted_for_this_run_mb == round(same_run.total_mb, 1)
    # 48 tokens use far less compute than a full context: the two predictions differ.
    assert measured.predicted_for_this_run_mb < measured.predicted_full_context_mb
    assert measured.rss_over_predicted == pytest.approx(
        measured.peak_rss_mb / measured.predicted_for_this_run_mb)


def test_peak_rss_is_the_kernels_high_water_mark() -> None:
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = proc_status_mb("VmHWM")
    block = bytearray(64 * 2**20)  # touched (zeroed) pages: the high-water mark must rise
    assert proc_status_mb("VmHWM") >= before + 60
    del block
    assert proc_status_mb("VmHWM") >= before + 60  # it stays after the memory is freed
    assert reset_peak_rss()
    assert proc_status_mb("VmHWM") < before + 30


def test_peak_rss_without_proc_says_so(tmp_path: Path) -> None:
    assert not reset_peak_rss(tmp_path / "missing")
    (tmp_path / "status").write_text("Name:\tpython3\nVmRSS:\t   2048 kB\n")
    assert proc_status_mb("VmRSS", tmp_path) == 2.0
    with pytest.raises(EdgerunnerError, match="has no VmHWM line"):
        proc_status_mb("VmHWM", tmp_path)


def test_calibration_scales_efficiency_by_measured_over_predicted(
    measured: BenchResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    profile = resolve_profile(measured.profile)
    result = measured.model_copy(update={"decode_tps": 30.0, "predicted_decode_tps": 20.0})
    calibrated = calibrated_profile(profile, result)
    assert calibrated.decode_efficiency == pytest.approx(profile.decode_efficiency * 1.5)
    path = write_calibration(calibrated)
    assert path == tmp_path / "edgerunner" / "profiles" / f"{profile.name}.toml"
    # The user's copy now overrides the shipped profile, aliases included.
    assert resolve_profile(profile.name).decode_efficiency == calibrated.decode_efficiency
    for alias in profile.aliases:
        assert resolve_profile(alias).decode_efficiency == calibrated.decode_efficiency


def test_cli_bench_json_and_calibrate(rpi5_bundle: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["bench", str(rpi5_bundle), "--json", "--calibrate",
                                       "--prompt-tokens", "16", "--decode-tokens", "8"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert set(data) >= KEYS
    for key in ("load_s", "ttft_s", "prompt_tps", "decode_tps", "peak_rss_mb",
                "predicted_for_this_run_mb", "predicted_full_context_mb"):
        assert data[key] > 0, key
    assert data["filled_tokens"] == 16 + 8
    written = Path(data["calibrated_profile"])
    assert written.is_file()
    if data["decode_over_predicted"] is not None:
        shipped = load_bundle(rpi5_bundle).manifest.profile.decode_efficiency
        # from the unrounded speeds: the printed ratio has 3 decimals, too few on a slow host
        ratio = data["decode_tps"] / data["predicted_decode_tps"]
        assert data["decode_over_predicted"] == pytest.approx(ratio, abs=0.0005)
        expected = min(4.0, max(0.01, shipped * ratio))
        assert resolve_profile(data["profile"]).decode_efficiency == pytest.approx(
            expected, rel=0.01)


def test_later_plans_predict_the_calibrated_speed(
    measured: BenchResult, rpi5_bundle: Path, default_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.planner import PlanOptions, make_plan

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    manifest = load_bundle(rpi5_bundle).manifest
    # A ratio inside the field's bounds, so nothing is clamped.
    result = measured.model_copy(update={"decode_tps": manifest.prediction.decode_tps * 0.6})
    write_calibration(calibrated_profile(manifest.profile, result))
    plan = manifest.plan
    again = make_plan(read_model_info(default_model), resolve_profile(manifest.profile.name),
                      PlanOptions(quant=plan.quant, min_ctx=plan.n_ctx, max_ctx=plan.n_ctx,
                                  min_tps=0))
    assert again.runtime.n_ctx == plan.n_ctx
    assert again.prediction.decode_tps == pytest.approx(result.decode_tps, rel=0.01)


def test_cli_bench_table(rpi5_bundle: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(rpi5_bundle), "--prompt-tokens", "8",
                                       "--decode-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "decode" in result.output
    assert "peak RSS (VmHWM), 12 tokens in context" in result.output
    assert "peak RSS, full context" in result.output


def test_bench_refuses_a_missing_bundle(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "does not exist" in result.output
