"""The ARM lane's arm64 Debian rootfs: debootstrap once, then a tarball that restores in seconds.

`debootstrap --arch=arm64 --variant=minbase` runs its second stage under qemu-user (binfmt_misc),
which takes 7-17 minutes on 2 cores; the result is kept as `rootfs.tar` in the lane's cache
(tools/build/rootfs_tar.py, shared with the systemd lane). The mirror is the host's own Debian
mirror, read from its apt sources.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lane_cache
import qemu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build"))
import rootfs_tar  # tools/build/: the rootfs tarball both lanes keep


def _debootstrap(root: Path) -> None:
    qemu.ensure_binfmt()
    mirror = os.environ.get("EDGERUNNER_ARM_MIRROR") or rootfs_tar.host_mirror()
    print(f"debootstrap arm64 {lane_cache.SUITE} into {root} (7-17 min under qemu-user)",
          flush=True)
    subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase",
                    "--include=" + ",".join(lane_cache.ROOTFS_PACKAGES),
                    lane_cache.SUITE, str(root), mirror], check=True,
                   stdout=subprocess.DEVNULL)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()  # debootstrap's downloads: a third of the tarball, never used again


def tarball() -> Path:
    """The cached rootfs tarball, debootstrapped when missing."""
    return rootfs_tar.cached(lane_cache.root() / "rootfs.tar", _debootstrap)


def restore(dest: Path) -> Path:
    """Unpack a fresh copy of the rootfs into dest (a few seconds)."""
    return rootfs_tar.restore(tarball(), dest)
