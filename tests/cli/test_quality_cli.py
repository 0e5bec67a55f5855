"""Measured quality and importance matrices through the CLI: pack, inspect, verify, plan
--measure, on the default model's real weights dequantized to F16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgerunner.cli import main


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def q2k_pack(default_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`pack --quant Q2_K --quality-chunks 1 --json` from the F16 source, parsed."""
    out = tmp_path_factory.mktemp("cli-quality")
    result = run("pack", str(default_f16), "--profile", "rpi5", "-o", str(out), "--quant",
                 "Q2_K", "--quality-chunks", "1", "--min-ctx", "512", "--max-ctx", "1024",
                 "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_pack_measures_quality_and_computes_an_imatrix_below_q4(q2k_pack: dict) -> None:
    quality, imatrix = q2k_pack["quality"], q2k_pack["imatrix"]
    assert quality["measured"] and quality["n_chunks"] == 1 and quality["n_scored"] == 255
    assert quality["mean_kld"] > 0 and 0 < quality["top1_agreement"] <= 1
    assert quality["ppl_ratio"] > 1  # two bits per weight cost perplexity
    assert imatrix["used"] == "computed" and imatrix["entries"] == 210
    assert imatrix["sha256"] == quality["text_sha256"]  # computed on the same text
    assert {"imatrix", "quality"} <= set(q2k_pack["timings"])
    assert q2k_pack["manifest"]["quality"] == quality


def test_inspect_and_verify_show_the_measured_quality(q2k_pack: dict) -> None:
    bundle = q2k_pack["path"]
    shown = run("inspect", bundle)
    assert shown.exit_code == 0, shown.output
    flat = "".join(shown.output.split())  # the table folds long rows
    assert "qualityvssource:meanKLD" in flat and "imatrixcomputed" in flat
    # which CPU the memory figure is for, and the weights on the others
    assert "onrpi5-8gb'sCPU(neon+dotprod)" in flat and "avx2" in flat
    as_json = json.loads(run("inspect", bundle, "--json").stdout)
    assert as_json["quality"]["mean_kld"] == q2k_pack["quality"]["mean_kld"]
    assert as_json["prediction"]["cpu"] == "neon+dotprod"
    assert set(as_json["prediction"]["weights_mb_by_cpu"]) >= {"avx2", "neon", "neon+dotprod"}
    verified = run("verify", bundle)
    assert verified.exit_code == 0, verified.output
    assert "top-1agreement" in "".join(verified.output.split())
    report = json.loads(run("verify", bundle, "--json").stdout)
    assert report["ok"] and report["quality"]["mean_kld"] == q2k_pack["quality"]["mean_kld"]


def test_imatrix_and_no_imatrix_exclude_each_other(default_f16: Path, tmp_path: Path) -> None:
    result = run("pack", str(default_f16), "--profile", "rpi5", "-o", str(tmp_path),
                 "--imatrix", str(tmp_path / "x.gguf"), "--no-imatrix")
    assert result.exit_code == 2
    assert "--imatrix and --no-imatrix" in result.output


def test_plan_measure_ranks_the_short_list_by_what_it_measured(default_f16: Path) -> None:
    result = run("plan", str(default_f16), "--profile", "rpi5", "--measure",
                 "--quality-chunks", "1", "--min-ctx", "512", "--max-ctx", "1024", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    measured = data["measured"]
    assert 1 <= len(measured) <= 3
    plan = data["plan"]
    assert plan["chosen"]["quant"] in measured and plan["chosen"]["kld_measured"]
    for candidate in plan["candidates"]:  # only the measured presets, with their figures
        assert candidate["kl_divergence"] == measured[candidate["quant"]]["mean_kld"]
    assert any("quality measured on this model" in r for r in plan["reasons"])


def test_plan_measure_on_a_quantized_source_says_it_cannot(default_model: Path) -> None:
    result = run("plan", str(default_model), "--profile", "rpi5", "--measure", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["measured"] == {}
    assert any("already quantized (Q4_1)" in w for w in data["plan"]["warnings"])
