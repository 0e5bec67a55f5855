"""Build llama-cpp-python with explicit, portable flags; keep the wheel in edgerunner's own cache.

Why not `pip install llama-cpp-python`: its default build is GGML_NATIVE, which compiles for the
build host's every instruction (AMX on a Sapphire Rapids Xeon, dotprod on a Pi 5). The wheel then
dies with SIGILL on a sibling host that lacks them, or whose kernel will not run them. And pip
keys its wheel cache on the source distribution, not on CMAKE_ARGS, so once a native wheel was
built on a machine, every later install there gets it back whatever flags are passed.

So: the flags are chosen here per platform, the wheel is built with pip's cache off, and it is kept
under `$XDG_CACHE_HOME/edgerunner/llama-wheels/<version>-<machine>-<flags hash>/`, a key that
changes whenever the version or the flags do.

- x86_64: a portable baseline (SSE4.2, AVX, AVX2, FMA, F16C, BMI2: every x86 CPU since 2013-2015),
  never AVX-512 or AMX. `EDGERUNNER_LLAMA_NATIVE=1` opts into a build for this very CPU (faster on
  some hosts, runs on this one only).
- aarch64: a device builds for itself (GGML_NATIVE), as the Pi's CPU is the one it will run on.

Usage: `python3 tools/build/llama_build.py --install .venv/bin/python` (the Makefile's set-up
does it); `--print-key` prints the cache key, `--rebuild` throws the cached wheel away first.
Stdlib only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # keep in step with pyproject.toml's llama-cpp-python pin

_COMMON = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
           "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=ON"]
_X86_PORTABLE = ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
                 "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF",
                 "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
                 "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
                 "-DGGML_AMX_BF16=OFF"]
_NATIVE = ["-DGGML_NATIVE=ON"]


def cmake_args(machine: str | None = None, native: bool | None = None) -> list[str]:
    """The CMake flags for this platform: portable on x86_64 unless native is asked for."""
    machine = machine or platform.machine()
    if native is None:
        native = os.environ.get("EDGERUNNER_LLAMA_NATIVE", "") not in ("", "0")
    if machine in ("x86_64", "AMD64") and not native:
        return _COMMON + _X86_PORTABLE
    return _COMMON + _NATIVE


def cache_key(args: list[str], machine: str | None = None) -> str:
    """`<version>-<machine>-<hash of the flags>`: a new key whenever either changes."""
    digest = hashlib.sha256(" ".join(args).encode()).hexdigest()[:12]
    return f"{VERSION}-{machine or platform.machine()}-{digest}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgerunner" / "llama-wheels"


def build(args: list[str], dest: Path) -> Path:
    """Build the wheel into dest with pip's cache off, so no earlier native wheel comes back."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=dest.parent))
    env = {**os.environ, "CMAKE_ARGS": " ".join(args),
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    print(f"building llama-cpp-python {VERSION} with CMAKE_ARGS={env['CMAKE_ARGS']!r}\n"
          f"(compiles llama.cpp: about 6-9 minutes on 2 cores; kept in {dest})", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                        "--no-binary", "llama-cpp-python", "--disable-pip-version-check",
                        "--quiet", "-w", str(tmp), f"llama-cpp-python=={VERSION}"],
                       env=env, check=True)
        (tmp / "CMAKE_ARGS").write_text(env["CMAKE_ARGS"] + "\n")
        os.replace(tmp, dest)  # the cache entry appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def wheel_for(args: list[str], rebuild: bool = False) -> Path:
    """The cached wheel for these flags, built when missing."""
    entry = cache_root() / cache_key(args)
    if rebuild:
        shutil.rmtree(entry, ignore_errors=True)
    if not entry.is_dir():
        build(args, entry)
    wheels = sorted(entry.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise SystemExit(f"{entry} holds no wheel: remove it and run again")
    return wheels[0]


def install(python: str, wheel: Path) -> None:
    """Install the wheel into python's environment, replacing whatever llama-cpp-python is there."""
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--force-reinstall", "--no-deps", str(wheel)], check=True)
    # its own dependencies are pure-Python or binary wheels: from the index as usual
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(wheel)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", metavar="PYTHON", help="install the wheel for this python")
    parser.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    opts = parser.parse_args()
    args = cmake_args()
    if opts.print_key:
        print(cache_key(args))
        return 0
    wheel = wheel_for(args, rebuild=opts.rebuild)
    print(f"llama-cpp-python wheel: {wheel}")
    if opts.install:
        install(opts.install, wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
