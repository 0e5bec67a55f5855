"""The small public API: every exported name resolves, and importing edgerunner stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgerunner


@pytest.mark.parametrize("name", [n for n in edgerunner.__all__ if n != "__version__"])
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(edgerunner, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = edgerunner.nope  # type: ignore[attr-defined]


def test_import_does_not_load_llama_cpp() -> None:
    code = "import sys, edgerunner, edgerunner.cli; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
