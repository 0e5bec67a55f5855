"""A stamp of a fully verified bundle, so that a restart does not hash the model again.

Hashing a 4 GB model on an SD card takes a minute or more, and the daemon starts on every boot
and every systemd restart. After a full check passes, `write_stamp` records what the file system
says about model.gguf and manifest.json (device, inode, size, mtime_ns and ctime_ns) and the
manifest's own sha256. At the next start a stamp that still matches stands for the model's hash;
anything that differs (the file replaced, rewritten, touched, copied elsewhere, the manifest
changed) means a full check, which refuses a changed model as before. ctime cannot be set from
user space, so putting an old mtime back on an altered file does not pass for unchanged.
`edgerunner verify` never reads stamps: it hashes everything.

Where stamps live: the daemon's state directory, $STATE_DIRECTORY under systemd (the unit's
StateDirectory=), else $XDG_STATE_HOME/edgerunner (~/.local/state/edgerunner), one small JSON
file per bundle path under `stamps/`. Never inside the bundle: verify would flag it as an
unlisted file. When that directory cannot be written, no stamp is kept and every start hashes
the model, as without stamps; a log line says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner._fs import atomic_write_text

logger = logging.getLogger(__name__)

STAMP_VERSION = 1


def state_dir() -> Path:
    """The daemon's state directory: systemd's StateDirectory, else $XDG_STATE_HOME/edgerunner."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgerunner"


class FileStat(BaseModel):
    """What the file system says about a file, without reading it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dev: int = Field(default=0, description="st_dev")
    ino: int = Field(default=0, description="st_ino")
    size: int = Field(default=0, description="st_size in bytes")
    mtime_ns: int = Field(default=0, description="st_mtime_ns")
    ctime_ns: int = Field(default=0, description="st_ctime_ns (not settable from user space)")

    @classmethod
    def of(cls, path: Path) -> FileStat:
        st = path.stat()
        return cls(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
                   ctime_ns=st.st_ctime_ns)


class Stamp(BaseModel):
    """A bundle as it was when its model last hashed to the manifest's sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = Field(default=STAMP_VERSION, description="Layout of this file")
    bundle: str = Field(default="", description="The bundle directory, resolved")
    model: FileStat = Field(default_factory=FileStat, description="model.gguf")
    manifest: FileStat = Field(default_factory=FileStat, description="manifest.json")
    manifest_sha256: str = Field(default="", description="sha256 of manifest.json")
    model_sha256: str = Field(default="", description="The model's sha256 the manifest lists")


def current_stamp(bundle: Path, model: Path, manifest: Path, model_sha256: str) -> Stamp:
    """The stamp these files would get now (stats, and the small manifest hashed)."""
    return Stamp(bundle=str(bundle.resolve()), model=FileStat.of(model),
                 manifest=FileStat.of(manifest),
                 manifest_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest(),
                 model_sha256=model_sha256)


def stamp_path(bundle: Path, store: Path | None = None) -> Path:
    """Where the stamp of this bundle directory is kept."""
    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:24]
    return (store or state_dir()) / "stamps" / f"{key}.json"


def read_stamp(bundle: Path, store: Path | None = None) -> Stamp | None:
    """The stamp kept for this bundle, or None (none kept, unreadable, another layout)."""
    path = stamp_path(bundle, store)
    try:
        stamp = Stamp.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as exc:
        logger.warning("ignoring the stamp %s (%s); the model will be hashed", path, exc)
        return None
    return stamp if stamp.version == STAMP_VERSION else None


def write_stamp(stamp: Stamp, store: Path | None = None) -> Path | None:
    """Keep a stamp after a full check passed; None (and a log line) if it cannot be written."""
    path = stamp_path(Path(stamp.bundle), store)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, stamp.model_dump_json(indent=2) + "\n")
    except OSError as exc:
        logger.warning("cannot keep a verification stamp in %s (%s); every start will hash "
                       "the model", path.parent, exc.strerror or exc)
        return None
    return path


def forget_stamp(bundle: Path, store: Path | None = None) -> None:
    """Drop the stamp of a bundle that failed its check."""
    with contextlib.suppress(OSError):
        stamp_path(bundle, store).unlink(missing_ok=True)
