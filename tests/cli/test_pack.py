"""`edgerunner pack` and `edgerunner verify` through click's CliRunner, on the real model."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgerunner.bundle.store import read_manifest, verify_bundle
from edgerunner.cli import main


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def packed_json(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real `pack --json` with an explicit quant, parsed."""
    out = tmp_path_factory.mktemp("cli-pack")
    result = run("pack", str(default_model), "--profile", "rpi5", "-o", str(out),
                 "--quant", "Q4_0", "--min-ctx", "512", "--max-ctx", "1024", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_pack_json_reports_the_bundle(packed_json: dict) -> None:
    bundle = Path(packed_json["path"])
    assert bundle.name == "SmolLM2-135M-Instruct-rpi5-8gb-Q4_0"
    assert packed_json["plan"]["quant"] == "Q4_0"
    assert packed_json["plan"]["n_ctx"] <= 1024
    assert packed_json["model_size"] == (bundle / "model.gguf").stat().st_size
    assert packed_json["predicted_size"] > 0
    assert any("requantizing" in w for w in packed_json["warnings"])
    assert set(packed_json["timings"]) >= {"read_header", "plan", "quantize", "write", "total"}
    assert read_manifest(bundle).plan.quant == "Q4_0"


def test_pack_text_output_and_default_output_dir(
    default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no -o: the bundle lands in the current directory
    # --no-imatrix: the importance matrix below Q4_K is test_quality_cli's (30 s of it here)
    result = run("pack", str(default_model), "--profile", "rpi5", "--quant", "Q3_K_M",
                 "--no-imatrix")
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "SmolLM2-135M-Instruct-rpi5-8gb-Q3_K_M"
    assert f"wrote {bundle.name}" in result.output or f"wrote {bundle}" in result.output
    assert "plan for rpi5-8gb: Q3_K_M" in result.output
    assert "predicted peak memory" in result.output
    assert "warning: requantizing a quantized model" in result.output
    assert verify_bundle(bundle).ok


def test_pack_archive(default_model: Path, tmp_path: Path) -> None:
    result = run("pack", str(default_model), "--profile", "rpi4-4gb", "-o", str(tmp_path),
                 "--quant", "Q4_0", "--archive")
    assert result.exit_code == 0, result.output
    names = [p.name for p in tmp_path.iterdir()]
    assert names == ["SmolLM2-135M-Instruct-rpi4-4gb-Q4_0.tar"]  # no directory, no partials
    archive = tmp_path / names[0]
    with tarfile.open(archive) as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
    top = "SmolLM2-135M-Instruct-rpi4-4gb-Q4_0"
    assert members == [f"{top}/{f}" for f in
                       ("config.toml", "edgerunner.service", "manifest.json", "model.gguf")]
    verified = run("verify", str(archive))
    assert verified.exit_code == 0, verified.output
    assert "sha256 model.gguf: matches" in verified.output


def test_verify_text(rpi5_bundle: Path) -> None:
    result = run("verify", str(rpi5_bundle))
    assert result.exit_code == 0, result.output
    assert "ok   sha256 model.gguf: matches" in result.output
    assert f"bundle {rpi5_bundle} verified" in result.output


def test_verify_here_json(rpi5_bundle: Path) -> None:
    result = run("verify", str(rpi5_bundle), "--here", "--json")
    data = json.loads(result.stdout)
    memory = next(c for c in data["checks"] if c["name"] == "memory here")
    assert "plan needs" in memory["detail"]
    # This machine has far more than the small model needs, unless it is nearly out of memory.
    assert result.exit_code == (0 if data["ok"] else 1)
    assert data["ok"] == all(c["ok"] for c in data["checks"])


def test_verify_missing_bundle(tmp_path: Path) -> None:
    result = run("verify", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_pack_help() -> None:
    result = run("pack", "--help")
    assert result.exit_code == 0
    for flag in ("--profile", "--archive", "--min-ctx", "--max-ctx", "--min-tps", "--quant",
                 "--reserve-mb", "--json", "-o"):
        assert flag in result.output
