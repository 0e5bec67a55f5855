"""`edgerunner plan` shows the streams, the prefix cache and per-stream/aggregate speed."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgerunner.cli import main


def test_plan_table_shows_the_streams(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(default_model), "--profile", "rpi5"])
    assert result.exit_code == 0, result.output
    assert "streams" in result.output
    assert "n_parallel 4, prefix cache 4096 cells" in result.output
    assert "per stream and" in result.output and "in all with 4" in result.output


def test_plan_json_and_parallel_flag(default_model: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(default_model), "--profile", "rpi5",
                                       "--parallel", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["runtime"]["n_parallel"] == 2
    assert data["runtime"]["prefix_cache_cells"] == 4096
    pred = data["prediction"]
    assert abs(pred["aggregate_tps"] - 2 * pred["stream_tps"]) < 0.02


def test_parallel_out_of_range_is_a_usage_error(default_model: Path) -> None:
    for bad in ("0", "17"):
        result = CliRunner().invoke(main, ["plan", str(default_model), "--profile", "rpi5",
                                           "--parallel", bad])
        assert result.exit_code == 2, result.output
        assert "--parallel" in result.output
