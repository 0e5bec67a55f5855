"""Bundle archives: write a .tar atomically, extract one without letting any member escape."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from edgerunner.bundle.store import disk_error
from edgerunner.errors import ArchiveError, BundleError
from edgerunner.paths import cache_dir

logger = logging.getLogger(__name__)

# PEP 706's extraction filters arrived in Python 3.11.4 / 3.12; Debian 12's python3 (3.11.2)
# has none, so there check_members is the only line of defence.
_DATA_FILTER = hasattr(tarfile, "data_filter")
_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ())


def write_archive(bundle_dir: Path, dest: Path, arcname: str | None = None) -> Path:
    """Write bundle_dir as an uncompressed tar at dest, atomically (GGUF barely compresses)."""
    if dest.exists():
        raise BundleError(
            f"output archive {dest} already exists",
            hint="pass a different -o, or remove the old archive first",
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(bundle_dir, arcname=arcname or bundle_dir.name, filter=_normalise)
            handle.flush()
            os.fsync(handle.fileno())
        if dest.exists():
            raise BundleError(f"output archive {dest} already exists",
                              hint="pass a different -o, or remove the old archive first")
        os.rename(tmp, dest)
    except OSError as exc:
        raise disk_error(dest, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote archive %s", dest)
    return dest


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The packing machine's user names mean nothing on the device.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def check_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Refuse absolute paths, `..`, links leaving the archive, devices and FIFOs, by name."""
    members = tar.getmembers()
    for member in members:
        name = PurePosixPath(member.name)
        problem = None
        if name.is_absolute() or member.name.startswith(("/", "\\")):
            problem = "has an absolute path"
        elif ".." in name.parts:
            problem = "climbs out of the archive with '..'"
        elif member.ischr() or member.isblk():
            problem = "is a device file"
        elif member.isfifo():
            problem = "is a FIFO"
        elif member.issym() or member.islnk():
            target = PurePosixPath(member.linkname)
            base = name.parent if member.issym() else PurePosixPath()
            if target.is_absolute() or _escapes(base / target):
                problem = f"is a link to {member.linkname!r}, outside the archive"
        elif not (member.isfile() or member.isdir()):
            problem = "is not a regular file or directory"
        if problem:
            raise ArchiveError(
                f"{archive}: member {member.name!r} {problem}; refusing to extract",
                hint="only extract bundle archives written by `edgerunner pack --archive` "
                "from a source you trust",
            )
    return members


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a bundle .tar into dest and return the bundle directory inside it."""
    if not archive.is_file():
        raise BundleError(f"archive {archive} does not exist", hint="check the path")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = check_members(tar, archive)
            tops = {PurePosixPath(m.name).parts[0] for m in members if m.name not in ("", ".")}
            if len(tops) != 1:
                raise ArchiveError(
                    f"{archive} holds {len(tops)} top-level entries, a bundle archive holds one "
                    "directory",
                    hint="pass an archive written by `edgerunner pack --archive`",
                )
            top = tops.pop()
            target = dest / top
            if target.exists():
                raise BundleError(f"{target} already exists; refusing to extract over it",
                                  hint="remove it or extract elsewhere")
            staging = Path(tempfile.mkdtemp(prefix=f".{top}.partial-", dir=dest))
            try:
                # The data filter is the second line of defence behind check_members.
                if _DATA_FILTER:
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)
                os.rename(staging / top, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except _FILTER_ERRORS as exc:
        raise ArchiveError(f"{archive}: unsafe member refused: {exc}",
                           hint="only extract archives from a source you trust") from exc
    except tarfile.TarError as exc:
        raise BundleError(f"{archive} is not a readable tar archive: {exc}",
                          hint="copy the archive again or re-pack") from exc
    except OSError as exc:
        raise BundleError(f"could not extract {archive}: {exc.strerror or exc}") from exc
    if not target.is_dir():
        raise ArchiveError(f"{archive}: {top!r} is not a directory", hint="re-pack the bundle")
    return target


def extract_cached(archive: Path) -> Path:
    """Extract an archive once into the cache (keyed by path, size and mtime) and reuse it."""
    stat = archive.stat()
    key = hashlib.sha256(
        f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    dest = cache_dir() / "bundles" / key
    if dest.is_dir():
        found = [p for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(found) == 1:
            return found[0]
        shutil.rmtree(dest)
    return extract_archive(archive, dest)
