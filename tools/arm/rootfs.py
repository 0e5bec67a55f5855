"""The ARM lane's arm64 Debian rootfs: debootstrap once, then a tarball that restores in seconds.

`debootstrap --arch=arm64 --variant=minbase` runs its second stage under qemu-user (binfmt_misc),
which takes 7-17 minutes on 2 cores; the result is kept as `rootfs.tar` in the lane's cache.
The mirror is the host's own Debian mirror, read from its apt sources.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import lane_cache
import qemu


def host_mirror() -> str:
    """The first Debian archive URI in the host's apt sources."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    texts += [p.read_text() for p in [Path("/etc/apt/sources.list")] if p.exists()]
    for text in texts:
        for uri in re.findall(r"(?:URIs:|deb)\s+(\S+/debian)/?\s", text):
            return uri
    raise SystemExit("no Debian mirror in /etc/apt/sources*: pass one with EDGERUNNER_ARM_MIRROR")


def tarball() -> Path:
    """The cached rootfs tarball, debootstrapped when missing."""
    tar = lane_cache.root() / "rootfs.tar"
    if tar.exists():
        return tar
    qemu.ensure_binfmt()
    mirror = os.environ.get("EDGERUNNER_ARM_MIRROR") or host_mirror()
    work = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=tar.parent))
    print(f"debootstrap arm64 {lane_cache.SUITE} into {work} (7-17 min under qemu-user)",
          flush=True)
    try:
        subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase",
                        "--include=" + ",".join(lane_cache.ROOTFS_PACKAGES),
                        lane_cache.SUITE, str(work / "root"), mirror], check=True,
                       stdout=subprocess.DEVNULL)
        for deb in (work / "root" / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()  # debootstrap's downloads: a third of the tarball, never used again
        subprocess.run(["tar", "-C", str(work / "root"), "--numeric-owner", "-cf",
                        str(work / "rootfs.tar"), "."], check=True)
        os.replace(work / "rootfs.tar", tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tar


def restore(dest: Path) -> Path:
    """Unpack a fresh copy of the rootfs into dest (a few seconds)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "--numeric-owner", "-xf", str(tarball())], check=True)
    return dest
