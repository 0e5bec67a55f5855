"""Fixtures of the pack tests: a real-weight F16 source made from the default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shapes import f16_from_default


@pytest.fixture(scope="session")
def default_f16(default_model: Path) -> Path:
    return f16_from_default(default_model)
