"""Bundles on disk: atomic write (stage + rename), verification, and loading for the daemon."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner._fs import sha256_file
from edgerunner.bundle.manifest import SCHEMA_VERSION, SIGNATURE_FILE, BundleManifest, FileEntry
from edgerunner.errors import BundleError
from edgerunner.host.memory import MemoryProbe

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.gguf"
CONFIG_FILE = "config.toml"
UNIT_FILE = "edgerunner.service"


def package_version(dist: str) -> str:
    """Installed version of a distribution, or "unknown"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    """ISO-8601 UTC timestamp for manifest.created."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------- writing


class BundleStage:
    """A bundle being built in `.<name>.partial-XXXX` next to its destination.

    Nothing at the destination path exists until `commit` renames the finished directory there,
    so an interrupted pack never leaves something that looks like a bundle.
    """

    def __init__(self, dest: Path, path: Path) -> None:
        self.dest = dest
        self.path = path

    def write_text(self, name: str, text: str) -> Path:
        """Write one small file into the stage."""
        target = self.path / name
        with _disk_errors(target):
            target.write_text(text, encoding="utf-8")
        return target

    def finalize(
        self, manifest: BundleManifest, known: dict[str, FileEntry] | None = None
    ) -> BundleManifest:
        """Hash every staged file, write manifest.json last, and fsync everything.

        `known` holds entries the caller already hashed (the model, right after writing it).
        """
        known = known or {}
        files = {}
        for path in sorted(self.path.rglob("*")):
            if path.is_file() and path.name != MANIFEST:
                rel = path.relative_to(self.path).as_posix()
                files[rel] = known.get(rel) or FileEntry(
                    sha256=sha256_file(path), size=path.stat().st_size
                )
        final = BundleManifest.model_validate(
            {**manifest.model_dump(), "files": files, "name": self.dest.name}
        )
        manifest_path = self.path / MANIFEST
        with _disk_errors(manifest_path):
            manifest_path.write_text(final.model_dump_json(indent=2) + "\n", encoding="utf-8")
            for path in self.path.rglob("*"):
                if path.is_file():
                    _fsync(path)
            _fsync(self.path)
        return final

    def commit(
        self, manifest: BundleManifest, known: dict[str, FileEntry] | None = None
    ) -> BundleManifest:
        """Finalize, then rename the stage to its destination in one step."""
        final = self.finalize(manifest, known)
        try:
            # Never onto an existing path: os.rename would silently replace an empty directory.
            rename_noreplace(self.path, self.dest)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise _exists_error(self.dest) from exc
            raise BundleError(f"could not move the finished bundle to {self.dest}: {exc}") from exc
        _fsync(self.dest.parent)
        logger.info("wrote bundle %s", self.dest)
        return final


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # linux/fs.h


@functools.lru_cache(maxsize=1)
def _libc_renameat2() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename src to dst; FileExistsError if dst exists, even as an empty directory.

    os.rename silently replaces an empty directory, so a directory created at dst after a check
    would vanish. renameat2(RENAME_NOREPLACE) makes the check and the rename one step; where the
    C library, kernel or filesystem lacks it, a check just before the rename narrows the window.
    """
    renameat2 = _libc_renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                     _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def stage_bundle(dest: Path, check_dest: bool = True) -> Iterator[BundleStage]:
    """Stage a bundle for `dest`; the stage is removed on any error (and after commit)."""
    if check_dest and dest.exists():
        raise _exists_error(dest)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the bundle to the device
    except OSError as exc:
        raise BundleError(
            f"cannot create the bundle in {parent}: {exc.strerror or exc}",
            hint="pass a writable directory with -o",
        ) from exc
    try:
        yield BundleStage(dest, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exists_error(dest: Path) -> BundleError:
    return BundleError(
        f"output directory {dest} already exists",
        hint="pass a different -o, or remove the old bundle first",
    )


def disk_error(path: Path, exc: OSError) -> BundleError:
    """A BundleError for a failed write, saying plainly when the disk is full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BundleError(
            f"disk full while writing {path}: {exc.strerror}",
            hint="free disk space or pass a different -o; nothing was left behind",
        )
    if exc.errno == errno.EFBIG:
        return too_large_error(path)
    return BundleError(f"could not write {path}: {exc.strerror or exc}")


# The largest file FAT32 holds; SD cards often come formatted with it.
FAT32_MAX_FILE = 2**32 - 1


def file_size_limit() -> int | None:
    """The largest file this process may write (RLIMIT_FSIZE, `ulimit -f`); None = unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def reached_size_limit(written: int) -> bool:
    """Whether a file that stopped growing at `written` bytes ran into a file size limit."""
    limit = file_size_limit()
    return (limit is not None and written >= limit) or written == FAT32_MAX_FILE


def too_large_error(path: Path, cleanup: str = "nothing was left behind") -> BundleError:
    """A BundleError for EFBIG: the process's file size limit, else the filesystem's."""
    limit = file_size_limit()
    if limit is not None:
        return BundleError(
            f"file too large: writing {path} reached this process's file size limit "
            f"(`ulimit -f`: {limit} bytes)",
            hint=f"raise it (`ulimit -f unlimited`) and pack again; {cleanup}",
        )
    return BundleError(
        f"file too large: {path} is bigger than its filesystem allows in one file "
        "(FAT32 stops at 4 GiB)",
        hint=f"pass an -o on ext4, exFAT or another filesystem without that limit; {cleanup}",
    )


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise disk_error(path, exc) from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- verifying


class Check(BaseModel):
    """One verification step and its outcome."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="What was checked, e.g. 'sha256 model.gguf'")
    ok: bool = Field(..., description="Whether it passed")
    detail: str = Field(default="", description="What was found, and what to do when it failed")


class VerifyReport(BaseModel):
    """The result of `verify`: every check, and the first failure's message."""

    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(..., description="Bundle directory")
    checks: list[Check] = Field(default_factory=list)
    manifest: BundleManifest | None = Field(default=None, description="The manifest, if parsed")

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name=name, ok=ok, detail=detail))
        return ok

    def raise_for_problems(self) -> None:
        """Raise a BundleError naming the first failed check."""
        if self.ok:
            return
        first = self.problems[0]
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        raise BundleError(f"bundle {self.bundle}: {first.name}: {first.detail}{suffix}")


def read_manifest(bundle: Path) -> BundleManifest:
    """Parse and validate manifest.json, naming the file and the problem."""
    path = bundle / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(
            f"{path} is missing, so {bundle} is not a bundle",
            hint="pass the directory `edgerunner pack` wrote",
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON: {exc}", hint="re-pack the bundle") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema_version {version!r}; this edgerunner reads {SCHEMA_VERSION}",
            hint="re-pack the bundle with this edgerunner version",
        )
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{path} is not a valid manifest: {problems}",
                          hint="re-pack the bundle") from exc


def verify_bundle(path: Path, here: bool = False, root: Path = Path("/"),
                  stamped: frozenset[str] = frozenset()) -> VerifyReport:
    """Check a bundle's manifest, file hashes and runtime version; `here` also checks memory.

    `root` is where /proc and /sys/fs/cgroup are read for `here` (tests pass a fake tree).
    `stamped` names files whose hash a matching stamp stands for (bundle/stamp.py): their size
    is checked, their bytes are not read.
    """
    report = VerifyReport(bundle=str(path))
    if not path.is_dir():
        report.add("bundle", False, f"{path} is not a directory; pass a bundle directory or .tar")
        return report
    try:
        manifest = read_manifest(path)
    except BundleError as exc:
        report.add(MANIFEST, False, str(exc))
        return report
    report.manifest = manifest
    report.add(MANIFEST, True, f"schema_version {manifest.schema_version}")
    _check_files(path, manifest, report, stamped)
    running = package_version("llama-cpp-python")
    report.add(
        "llama-cpp-python version",
        manifest.llama_cpp_python_version == running,
        f"bundle packed for {manifest.llama_cpp_python_version}, running {running}"
        + ("" if manifest.llama_cpp_python_version == running else
           f"; install llama-cpp-python=={manifest.llama_cpp_python_version} "
           "or re-pack the bundle with this installation"),
    )
    if here:
        _check_memory_here(manifest, report, root)
    return report


def _check_files(path: Path, manifest: BundleManifest, report: VerifyReport,
                 stamped: frozenset[str] = frozenset()) -> None:
    for name, entry in manifest.files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or name == MANIFEST:
            report.add(f"file {name}", False, "manifest lists a path outside the bundle; re-pack")
            continue
        target = path / rel
        if not target.is_file():
            report.add(f"file {name}", False, f"{target} is missing; re-pack or copy it again")
            continue
        size = target.stat().st_size
        if size != entry.size:
            report.add(f"size {name}", False,
                       f"{name} is {size} bytes, manifest says {entry.size}: the file is "
                       "truncated or altered; copy the bundle again or re-pack")
            continue
        if name in stamped:
            report.add(f"sha256 {name}", True, "unchanged since its last full check (stamp)")
            continue
        digest = sha256_file(target)
        report.add(f"sha256 {name}", digest == entry.sha256,
                   "matches" if digest == entry.sha256 else
                   f"{name} has sha256 {digest}, manifest says {entry.sha256}: the file was "
                   "altered or corrupted; copy the bundle again or re-pack")
    listed = set(manifest.files) | {MANIFEST, SIGNATURE_FILE}
    extra = sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*")
        if not p.is_dir() and p.relative_to(path).as_posix() not in listed
    )
    report.add("unlisted files", not extra,
               "none" if not extra else
               f"{', '.join(extra)} not in the manifest; remove them or re-pack")


def _check_memory_here(manifest: BundleManifest, report: VerifyReport, root: Path) -> None:
    needed = manifest.prediction.memory.total_mb
    snapshot = MemoryProbe(root).read()
    free = snapshot.headroom_mb
    report.add(
        "memory here", needed <= free,
        f"plan needs {needed:.0f} MiB, {snapshot.source} allows {free:.0f} MiB now"
        + ("" if needed <= free else
           "; free memory, raise the limit, or re-pack with a smaller --max-ctx or --quant"),
    )


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory, ready for the daemon."""

    dir: Path
    manifest: BundleManifest

    @property
    def model_path(self) -> Path:
        return self.dir / MODEL_FILE

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def unit_path(self) -> Path:
        return self.dir / UNIT_FILE


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Open a bundle directory (or a .tar of one); by default refuse it unless it verifies."""
    path = Path(path)
    if path.is_file():
        from edgerunner.bundle.archive import extract_cached

        path = extract_cached(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist", hint="check the path")
    manifest = _verified_manifest(path) if verify else read_manifest(path)
    if MODEL_FILE not in manifest.files:
        raise BundleError(f"{path / MANIFEST} lists no {MODEL_FILE}", hint="re-pack the bundle")
    return Bundle(dir=path, manifest=manifest)


def _verified_manifest(path: Path) -> BundleManifest:
    """verify_bundle, where a matching stamp stands for the model's hash (bundle/stamp.py);
    a full check that passes leaves a stamp, one that fails drops it."""
    from edgerunner.bundle import stamp as stamps

    entry = read_manifest(path).files.get(MODEL_FILE)
    model = path / MODEL_FILE
    now = None
    if entry is not None and model.is_file():
        # stat before hashing: a file changed while it is hashed no longer matches its stamp
        now = stamps.current_stamp(path, model, path / MANIFEST, entry.sha256)
    trusted = now is not None and stamps.read_stamp(path) == now
    report = verify_bundle(path, stamped=frozenset({MODEL_FILE}) if trusted else frozenset())
    if not report.ok:
        stamps.forget_stamp(path)
        report.raise_for_problems()
    if trusted:
        logger.info("model.gguf unchanged since its last full check (stamp): not hashed")
    elif now is not None:
        stamps.write_stamp(now)
    assert report.manifest is not None
    return report.manifest
