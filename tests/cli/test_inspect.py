"""`edgerunner inspect` on the real model and on bad files."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgerunner.cli import main


def test_inspect_text(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(default_model)])
    assert result.exit_code == 0, result.output
    for line in ("architecture", "llama", "134.5M", "heads / KV heads", "9 / 3",
                 "key / value length", "64 / 64", "49,152", "8,192", "Q4_1 210",
                 "chat template", "yes", "sliding window", "none"):
        assert line in result.output, line


def test_inspect_json(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(default_model), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"] == "llama"
    assert data["file_type"] == "Q4_1"
    assert data["layers"] == 30
    assert (data["heads"], data["kv_heads"]) == (9, 3)
    assert (data["key_length"], data["value_length"]) == (64, 64)
    assert data["vocab"] == 49152
    assert data["training_context"] == 8192
    assert data["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert data["tensor_count"] == 272
    assert data["chat_template"] is True
    assert data["parameters"] == 134_515_008


def test_inspect_not_a_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"PK\x03\x04 zip, not gguf")
    result = CliRunner().invoke(main, ["inspect", str(fake)])
    assert result.exit_code == 1
    assert "is not a GGUF file" in result.output
    assert "hint:" in result.output


def test_inspect_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "none.gguf")])
    assert result.exit_code == 1
    assert "does not exist" in result.output
