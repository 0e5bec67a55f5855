"""Where the ARM lane keeps what it builds: one directory per key of versions and flags.

`$XDG_CACHE_HOME/edgerunner/arm-lane/<key>/` holds the arm64 rootfs tarball, the cross-built
llama.cpp libraries, the aarch64 wheels and the requantized models. The key changes whenever
llama-cpp-python's version, the Debian suite, the rootfs packages, the CMake flags or the pinned
Python dependencies do, so a stale entry is never reused; each item appears whole or not at all
(built in a temp dir, then renamed). Stdlib only: the host side runs before any venv is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

LLAMA_VERSION = "0.3.36"  # keep in step with pyproject.toml's llama-cpp-python pin
SUITE = "bookworm"  # python3 is 3.11 there, the host venv's version: the same cp311 wheels
ROOTFS_PACKAGES = ("python3", "libgomp1")
# ggml's runtime CPU variants: one libggml-cpu-<variant>.so per ARM level, the best one the CPU
# runs is picked at load (what a device build should ship; see README, "On the device").
# GGML_BACKEND_DIR is compiled in: with GGML_BACKEND_DL ggml looks for the variants there.
BACKEND_DIR = "/opt/llama/lib"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    f"-DGGML_BACKEND_DIR={BACKEND_DIR}",
)
# The ARM variants built, of ggml's eight for Linux: Debian 12's GCC (the cross compiler here, and
# a Pi's own) knows no armv9.2-a, and no Pi has SVE or i8mm. armv8.0 serves the Pi Zero 2 W, 3
# and 4 (Cortex-A53/A72), armv8.2 dotprod+fp16 the Pi 5 (Cortex-A76).
ARM_VARIANTS = ("armv8.0_1", "armv8.2_1", "armv8.2_2")
# A Pi 5's own build (GGML_NATIVE there means this -march), for the "built for another CPU"
# check on the Pi 4's CPU. Kept under this key, in a directory named by its own flags' hash.
PI5_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
    "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DGGML_OPENMP=ON", "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)
# The runtime deps of edgerunner (pyproject's, less llama-cpp-python whose libs are cross-built
# and whose Python part comes from the sdist), pinned to what the lane was proven with.
PY_DEPS = (
    "gguf==0.19.0", "numpy==2.4.6", "pydantic==2.14.4", "click==8.5.1", "psutil==7.2.2",
    "paho-mqtt==2.2.0", "uvicorn==0.54.0", "starlette==1.10.0", "rich==15.0.0",
    "httpx==0.28.1", "tomli-w==1.2.0", "diskcache==5.6.3", "jinja2==3.1.6",
    "typing-extensions==4.16.0", "pyyaml==6.0.4", "tqdm==4.70.1",
)
QUANTS = ("Q4_0", "Q4_1", "Q4_K_M", "Q6_K", "Q8_0")


def key() -> str:
    """`<llama version>-<suite>-<hash of packages, flags and deps>`."""
    blob = json.dumps([ROOTFS_PACKAGES, CMAKE_FLAGS, ARM_VARIANTS, PY_DEPS, QUANTS], sort_keys=True)
    return f"{LLAMA_VERSION}-{SUITE}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def flags_hash(flags: tuple[str, ...]) -> str:
    """A short hash of a flag list."""
    return hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]


def root() -> Path:
    """This key's cache directory (created)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "edgerunner" / "arm-lane" / key()
    path.mkdir(parents=True, exist_ok=True)
    return path
