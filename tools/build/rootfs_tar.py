"""A debootstrapped rootfs kept as one tarball, restored in seconds: what the ARM lane
(tools/arm/rootfs.py) and the systemd lane (tools/systemd/cache.py) both cache.

`cached(tar, build)` builds the rootfs into a temp directory beside the tarball and renames the
finished tarball into place, so it appears whole or not at all; `restore(tar, dest)` unpacks a
fresh copy. The compression follows the name (`.tar.zst`: zstd, `.tar`: none). Owners are
kept numeric: the ids are the rootfs's, not the host's. Stdlib only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def host_mirror(default: str | None = None) -> str:
    """The first Debian archive URI in the host's apt sources (else `default`, if given)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    texts += [p.read_text() for p in [Path("/etc/apt/sources.list")] if p.exists()]
    for text in texts:
        for uri in re.findall(r"(?:URIs:|deb)\s+(\S+/debian)/?\s", text):
            return uri
    if default is None:
        raise SystemExit("no Debian mirror in /etc/apt/sources*: pass one in the lane's "
                         "mirror variable")
    return default


def _compression(tar: Path) -> list[str]:
    return ["--zstd"] if tar.name.endswith(".zst") else []


def cached(tar: Path, build: Callable[[Path], None]) -> Path:
    """The tarball; when missing, `build(root)` fills an empty directory, which is then packed."""
    if tar.exists():
        return tar
    work = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=tar.parent))
    try:
        root = work / "root"
        build(root)
        partial = work / tar.name
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", *_compression(tar), "-cf",
                        str(partial), "."], check=True)
        os.replace(partial, tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tar


def restore(tar: Path, dest: Path) -> Path:
    """Unpack a fresh copy of the tarball into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "--numeric-owner", *_compression(tar), "-xf",
                    str(tar)], check=True, stdout=subprocess.DEVNULL)
    return dest
