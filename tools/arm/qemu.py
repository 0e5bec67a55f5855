"""qemu-user for the ARM lane: the Debian packages, and binfmt_misc registered for aarch64."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")
PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap", "g++-aarch64-linux-gnu")


def ensure_packages() -> None:
    """apt-get install the lane's host tools when one is missing."""
    if all(shutil.which(tool) for tool in ("qemu-aarch64-static", "debootstrap",
                                           "aarch64-linux-gnu-g++", "update-binfmts")):
        return
    print("installing " + " ".join(PACKAGES) + " (Debian packages)", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True,
                   env={"DEBIAN_FRONTEND": "noninteractive",
                        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def ensure_binfmt() -> None:
    """aarch64 ELF files run through qemu-aarch64-static (mounting binfmt_misc if it is not)."""
    ensure_packages()
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    entry = (BINFMT / "qemu-aarch64").read_text()
    if not entry.startswith("enabled"):
        raise SystemExit(f"binfmt_misc's qemu-aarch64 entry is not enabled:\n{entry}")
