"""Fixtures shared by every test layer: the real default model, short socket paths."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerunner.pack.default_model import ensure_default_model

# The daemon keeps verification stamps and saved prefix caches in its state directory
# ($XDG_STATE_HOME/edgerunner outside systemd). A run gets its own, so one run's saved prefixes
# never warm another's daemons and nothing is left in the user's home.
if "STATE_DIRECTORY" not in os.environ:
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="edgerunner-test-state-")
    atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real SmolLM2-135M GGUF, fetched through edgerunner's own code path (cached)."""
    return ensure_default_model()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp directory: unix socket paths must stay under ~100 bytes."""
    with tempfile.TemporaryDirectory(prefix="er-", dir="/tmp") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def rpi5_bundle(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Path:
    """The default model packed for rpi5 by edgerunner's own pack(); the bundle directory."""
    from edgerunner.pack.packer import pack
    from edgerunner.profiles import resolve_profile

    out = tmp_path_factory.mktemp("rpi5-bundle")
    return pack(default_model, resolve_profile("rpi5"), out).path
