"""The Python side of the ARM lane: aarch64 wheels of edgerunner's dependencies, unpacked.

The host's pip fetches them for the rootfs' interpreter (`--platform ... --only-binary :all:
--target`), so nothing is compiled or pip-installed inside the emulated system. llama_cpp's
Python package is the pure-Python part of the sdist; its libraries are the cross-built ones
(cross_build.py), found through LLAMA_CPP_LIB_PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cross_build
import lane_cache

# Debian 12's glibc is 2.36: every manylinux tag up to it runs. pip 23 does not widen the tag it
# is given, so name the ones PyPI's aarch64 wheels carry (numpy 2.3+ is manylinux_2_28 only).
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64",
             "manylinux_2_34_aarch64")


def site() -> Path:
    """A PYTHONPATH directory with every runtime dependency for aarch64, made when missing."""
    dest = lane_cache.root() / "site-packages"
    if dest.is_dir():
        return dest
    work = Path(tempfile.mkdtemp(prefix=".site-", dir=dest.parent))
    try:
        platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "--no-cache-dir", "--no-warn-conflicts",
                        "--root-user-action=ignore", *platforms,
                        "--only-binary", ":all:", "--python-version", "3.11",
                        "--implementation", "cp", "--target", str(work / "site"),
                        *lane_cache.PY_DEPS], check=True)
        shutil.copytree(cross_build.sdist() / "llama_cpp", work / "site" / "llama_cpp")
        os.replace(work / "site", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


if __name__ == "__main__":
    print(site())
