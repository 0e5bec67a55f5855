"""What the systemd lane keeps between runs: a Debian rootfs with edgerunner's dependencies.

`$XDG_CACHE_HOME/edgerunner/systemd-lane/<key>/rootfs.tar.zst` is bookworm (python3 3.11, the
host venv's ABI) debootstrapped with systemd, plus a venv at /opt/edgerunner holding every
runtime dependency of edgerunner from a wheelhouse (llama-cpp-python from edgerunner's own wheel
cache, the rest from PyPI). The key hashes the suite, the packages and pyproject.toml, so a
changed dependency rebuilds it; a run only adds the freshly built edgerunner wheel. Each item
appears whole or not at all (built in a temp dir, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "build"))
import rootfs_tar  # noqa: E402  (the rootfs tarball both lanes keep)

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "util-linux",
            "libgomp1")  # libgomp1: llama.cpp's OpenMP runtime
VENV = "/opt/edgerunner"
MIRROR_ENV = "EDGERUNNER_SYSTEMD_MIRROR"


def key() -> str:
    """`<suite>-<hash of packages and pyproject.toml>`."""
    blob = json.dumps([PACKAGES, (REPO / "pyproject.toml").read_text()], sort_keys=True)
    return f"{SUITE}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def root() -> Path:
    """This key's cache directory (created)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "edgerunner" / "systemd-lane" / key()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tarball_path() -> Path:
    return root() / "rootfs.tar.zst"


def ready() -> bool:
    """Whether a run needs nothing but the edgerunner wheel."""
    return tarball_path().exists()


def llama_wheel_dir() -> Path:
    """edgerunner's cached llama-cpp-python wheel for this machine (tools/build/llama_build.py)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    found = sorted((base / "edgerunner" / "llama-wheels").glob("*/llama_cpp_python-*.whl"))
    if not found:
        raise SystemExit("no cached llama-cpp-python wheel: run `make setup` first")
    return found[-1].parent


def edgerunner_wheel(dest: Path) -> Path:
    """Build this checkout's wheel into dest."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "-w", str(dest), str(REPO)], check=True,
                   stderr=subprocess.DEVNULL)
    return next(dest.glob("edgerunner-*.whl"))


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, stdout=subprocess.DEVNULL)


def _build(rootfs: Path) -> None:
    """debootstrap + the dependency venv into rootfs."""
    mirror = os.environ.get(MIRROR_ENV) or rootfs_tar.host_mirror("http://deb.debian.org/debian")
    print(f"debootstrap {SUITE} into {rootfs} (about a minute)", flush=True)
    _run("debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE,
         str(rootfs), mirror)
    wheels = rootfs / "tmp/wheelhouse"
    wheels.mkdir(parents=True)
    print("wheelhouse: edgerunner's dependencies (pip download)", flush=True)
    wheel = edgerunner_wheel(rootfs.parent / "wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet",
                    "--disable-pip-version-check", "--only-binary=:all:",
                    "--find-links", str(llama_wheel_dir()), "-d", str(wheels), str(wheel)],
                   check=True, stderr=subprocess.DEVNULL)
    for old in wheels.glob("edgerunner-*.whl"):
        old.unlink()
    names = sorted(p.name for p in wheels.glob("*.whl"))
    _run("chroot", str(rootfs), "python3", "-m", "venv", VENV)
    _run("chroot", str(rootfs), f"{VENV}/bin/pip", "install", "--quiet", "--no-index",
         "--disable-pip-version-check", *[f"/tmp/wheelhouse/{n}" for n in names])
    shutil.rmtree(wheels)
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / sub).glob("*"):
            if path.is_file():
                path.unlink()
    (rootfs / "etc/machine-id").write_text("")  # each boot makes its own


def build_tarball() -> Path:
    """debootstrap + the dependency venv, packed as rootfs.tar.zst (about 2 min cold)."""
    return rootfs_tar.cached(tarball_path(), _build)


def restore(dest: Path) -> Path:
    """Unpack a fresh copy of the cached rootfs into dest (a couple of seconds)."""
    return rootfs_tar.restore(build_tarball(), dest)
