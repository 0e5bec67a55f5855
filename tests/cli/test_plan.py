"""`edgerunner plan` through click's CliRunner, on the real default model and a real shape."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgerunner.cli import main
from tests.shapes import QWEN2_5_0_5B, cached_source


def test_plan_prints_the_candidate_table_and_the_choice(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(default_model), "--profile", "rpi5"])
    assert result.exit_code == 0, result.output
    assert "chosen" in result.output
    assert "Q4_1" in result.output and "Q2_K" in result.output
    assert "lower quality" in result.output  # rejection reasons are shown
    assert "requantization" in result.output  # the Q4_1 source is not upgraded


def test_plan_json_carries_the_same_data(default_model: Path) -> None:
    result = CliRunner().invoke(
        main, ["plan", str(default_model), "--profile", "rpi5", "--json", "--max-ctx", "4096"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["profile"] == "rpi5-8gb" and data["max_ctx"] == 4096
    assert data["chosen"]["quant"] == data["runtime"]["quant"]
    assert data["chosen"]["n_ctx"] <= 4096
    quants = {c["quant"] for c in data["candidates"]}
    assert "Q8_0" not in quants  # never above the source's precision
    rejected = [c for c in data["candidates"] if c != data["chosen"]]
    assert rejected and all(c["rejected"] for c in rejected)
    assert data["prediction"]["memory"]["weights_mb"] > 0


def test_plan_without_model_uses_the_default_model(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["plan", "--profile", "rpi5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"].startswith("Smollm2")


def test_unknown_profile_is_named_with_suggestions(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(default_model), "--profile", "rpi55"])
    assert result.exit_code != 0
    assert "unknown device profile 'rpi55'" in result.output
    assert "did you mean" in result.output


def test_model_too_big_for_the_device_fails_with_the_memory_it_needs(
    default_model: Path,
) -> None:
    args = ["plan", str(default_model), "--profile", "rpi-zero2w", "--min-ctx", "8192",
            "--reserve-mb", "300"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "does not fit rpi-zero2w" in result.output
    assert "needs" in result.output and "MiB" in result.output
    assert "would do" in result.output


def test_forcing_a_quant_above_the_source_is_refused(default_model: Path) -> None:
    args = ["plan", str(default_model), "--profile", "rpi5", "--quant", "Q8_0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "would not improve" in result.output


def test_plan_shows_why_the_choice_won(default_model: Path) -> None:
    # Qwen2.5-0.5B's shape on a Pi 5 2 GB: Q8_0 over F16 (equal quality, faster), flash
    # attention. The 49152-token variant (issue 9's) reads in a third of the real one's time.
    source = cached_source(QWEN2_5_0_5B, default_model, reused_vocab=True)
    result = CliRunner().invoke(main, ["plan", str(source), "--profile", "rpi5-2gb"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "chosen: Q8_0" in out and "flash attention" in out
    assert "why: Q8_0: F16 and Q8_0 are within the near-lossless band (ΔKLD 0.0014" in out
    assert "faster than F16" in out
    assert "why: flash attention: same context and predicted speed as without" in out
    assert "equal quality to Q8_0" in out  # the F16 rows say why they lost
    assert "KLD" in out  # the quality scale is a column of the table

    data = json.loads(CliRunner().invoke(
        main, ["plan", str(source), "--profile", "rpi5-2gb", "--json"]).output)
    assert data["runtime"]["quant"] == "Q8_0" and data["runtime"]["flash_attn"] is True
    assert data["reasons"][0].startswith("Q8_0: F16 and Q8_0")
