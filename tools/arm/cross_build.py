"""Cross-build llama.cpp for aarch64 from llama-cpp-python's sdist, with runtime CPU variants.

The sdist (`pip download --no-binary :all:`) carries llama.cpp's sources under vendor/llama.cpp;
it is not a git checkout, so only the `llama` and `ggml` targets are built (the others want
git metadata). `ggml` depends on every CPU variant module, so they come along. The result,
libllama/libggml/libggml-base and libggml-cpu-<variant>.so, is what the pure-Python llama_cpp
package loads through LLAMA_CPP_LIB_PATH inside the arm64 rootfs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import lane_cache

TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


def sdist() -> Path:
    """llama-cpp-python's unpacked sdist, downloaded once into the lane's cache."""
    dest = lane_cache.root() / f"llama_cpp_python-{lane_cache.LLAMA_VERSION}"
    if dest.is_dir():
        return dest
    work = Path(tempfile.mkdtemp(prefix=".sdist-", dir=dest.parent))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(work),
                        f"llama-cpp-python=={lane_cache.LLAMA_VERSION}"], check=True)
        (archive,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        os.replace(work / dest.name, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _keep_variants(cmakelists: Path) -> None:
    """Drop the ARM variants not in lane_cache.ARM_VARIANTS from ggml's list (in the copy)."""
    text = cmakelists.read_text()
    pattern = re.compile(r"^\s*ggml_add_cpu_backend_variant\((armv[0-9._]+)\b.*\n", re.M)
    found = pattern.findall(text)
    missing = set(lane_cache.ARM_VARIANTS) - set(found)
    if missing:
        raise SystemExit(f"{cmakelists} has no ARM variant {sorted(missing)}: update ARM_VARIANTS")
    text = pattern.sub(lambda m: m.group(0) if m.group(1) in lane_cache.ARM_VARIANTS else "", text)
    cmakelists.write_text(text)


def libs() -> Path:
    """The cross-built aarch64 libraries, built when missing (~11-16 min on 2 cores)."""
    return _build(lane_cache.root() / "llama-lib", lane_cache.CMAKE_FLAGS,
                  f"variants {', '.join(lane_cache.ARM_VARIANTS)} (~11-16 min on 2 cores)")


def pi5_libs() -> Path:
    """A monolithic build for the Pi 5's CPU only (what a Pi 5 builds natively), ~4 min.

    The lane runs it on the Pi 4's CPU to see the daemon's preflight refuse it."""
    flags = lane_cache.PI5_CMAKE_FLAGS
    return _build(lane_cache.root() / f"llama-lib-pi5-{lane_cache.flags_hash(flags)}", flags,
                  "for the Pi 5's CPU only (~4 min on 2 cores)")


def _quiet(cmd: list[str], log: Path) -> None:
    """Run a build step into log (the sdist's git warnings are noise); its tail if it fails."""
    with log.open("a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{' '.join(cmd[:2])} failed (exit {done.returncode}):\n{tail}")


def _build(dest: Path, flags: tuple[str, ...], what: str) -> Path:
    if dest.is_dir():
        return dest
    src = sdist() / "vendor" / "llama.cpp"
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        tree = work / "llama.cpp"
        shutil.copytree(src, tree)
        _keep_variants(tree / "ggml" / "src" / "CMakeLists.txt")
        (work / "aarch64.cmake").write_text(TOOLCHAIN)
        build = work / "build"
        print(f"cross-building llama.cpp {lane_cache.LLAMA_VERSION} for aarch64, {what}",
              flush=True)
        _quiet(["cmake", "-S", str(tree), "-B", str(build),
                f"-DCMAKE_TOOLCHAIN_FILE={work / 'aarch64.cmake'}", *flags], work / "cmake.log")
        _quiet(["cmake", "--build", str(build), "--target", "llama", "ggml",
                "-j", str(os.cpu_count() or 2)], work / "cmake.log")
        out = work / "lib"
        out.mkdir()
        for lib in build.rglob("*.so*"):
            if lib.is_file() and not lib.is_symlink():
                shutil.copy2(lib, out / lib.name)
        for lib in build.rglob("*.so*"):
            if lib.is_symlink():
                (out / lib.name).symlink_to(os.readlink(lib))
        (out / "CMAKE_FLAGS").write_text("\n".join(flags) + "\n")
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


if __name__ == "__main__":
    print(libs())
    print(pi5_libs())
