"""Lay a bundle out on a device: bundle directory, systemd unit, config, service user.

Layout under ``root`` (``/`` on the device, a mounted SD card image or a temp dir otherwise):

    var/lib/edgerunner/bundles/<name>/             the bundle the service runs
    var/lib/edgerunner/bundles/.previous/<name>/   the one it replaced (for --rollback)
    etc/edgerunner/<name>.toml                     daemon settings (user-editable)
    etc/systemd/system/edgerunner@<name>.service   unit rendered for the bundle
    etc/sysusers.d/edgerunner.conf                 the `edgerunner` system user and group

Every write goes to a temp name first and is renamed into place, so an interrupted install
leaves the old bundle running. Installing the same bundle twice changes nothing.
"""

from __future__ import annotations

import ctypes
import errno
import filecmp
import functools
import grp
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner._fs import atomic_write_text
from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.unit import (
    BUNDLES_DIR,
    CONFIG_DIR,
    SERVICE_USER,
    check_bundle_name,
    render_unit,
    socket_path,
    unit_name,
)
from edgerunner.errors import BundleError, InstallError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

UNIT_DIR = "/etc/systemd/system"
SYSUSERS_FILE = "/etc/sysusers.d/edgerunner.conf"
PREVIOUS = ".previous"
SYSUSERS_TEXT = (
    "# The account edgerunner@*.service runs as; add users who may query the model to its group:\n"
    "#   usermod -aG edgerunner USER\n"
    f'u {SERVICE_USER} - "edgerunner local LLM daemon" /var/lib/edgerunner -\n'
)


class InstallReport(BaseModel):
    """What an install or rollback did (or, with dry_run, would do)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Bundle name = systemd instance name")
    root: str = Field("/", description="Root the layout was written under")
    dry_run: bool = Field(False, description="Nothing was written")
    bundle_dir: str = Field(..., description="Installed bundle directory (as seen on the device)")
    unit: str = Field(..., description="systemd unit name")
    socket: str = Field("", description="Unix socket the service listens on (as on the device)")
    previous: str | None = Field(None, description="Bundle kept for --rollback, if any")
    changes: list[str] = Field(default_factory=list, description="Each change, in order")
    commands: list[str] = Field(default_factory=list, description="systemctl steps to run")
    ran_commands: bool = Field(False, description="The commands were run (--enable)")
    hints: list[str] = Field(default_factory=list,
                             description="What the device needs besides the files (llama.cpp)")

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def systemd_running() -> bool:
    """Whether systemd is the init system here (sd_booted's test)."""
    return Path("/run/systemd/system").is_dir()


def default_executable() -> str:
    """How the unit starts edgerunner: the installed script, else this interpreter's module."""
    found = shutil.which("edgerunner")
    return found or f"{sys.executable} -m edgerunner"


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def install_bundle(
    source: Path, root: Path = Path("/"), dry_run: bool = False, enable: bool = False,
    executable: str | None = None, keyring: Path | None = None,
    on_verified: Callable[[BundleManifest, str], None] | None = None,
) -> InstallReport:
    """Verify a bundle (directory or .tar) and install it under root; keep the old one.

    The bundle's signature is checked against keyring (default: the device's, under root)
    before anything is moved. on_verified(manifest, bundle id) runs after the checks, before
    the switch.
    """
    root = Path(root)
    source = Path(source)
    if not source.exists():
        raise InstallError(f"bundle {source} does not exist", hint="check the path")
    _check_enable(enable, root, dry_run)
    bundles = _under(root, BUNDLES_DIR)
    with tempfile.TemporaryDirectory(prefix="edgerunner-dry-") as scratch:
        # The staged copy lives next to its destination so the final rename stays on one
        # filesystem; a dry run stages in a scratch directory and throws it away.
        stage_parent = Path(scratch) if dry_run else bundles
        if not dry_run:
            _mkdir(bundles)
        holder, staged = _stage(source, stage_parent)
        try:
            manifest = _verified(staged, keyring if keyring is not None else
                                 _default_keyring(root), shown=source)
            config = _read_config(staged)
            if on_verified is not None and not dry_run:
                on_verified(manifest, bundle_id(staged))
            report, rotated = _place(staged, manifest, root, dry_run)
        finally:
            shutil.rmtree(holder, ignore_errors=True)
    current, previous = bundles / manifest.name, bundles / PREVIOUS / manifest.name
    # The config in /etc came from the bundle that was current before this install.
    etc_config = _write_config(report, config, root, dry_run,
                               installed_from=previous if rotated and not dry_run else current)
    _write_unit(report, manifest, root, executable or default_executable(), dry_run,
                drain_timeout_s(config, etc_config))
    _write_file(report, _under(root, SYSUSERS_FILE), SYSUSERS_TEXT, dry_run, mode=0o644)
    _commands(report, root, enable)
    report.hints = llama_hints(manifest)
    return report


def llama_hints(manifest: BundleManifest) -> list[str]:
    """How the device gets a llama.cpp that runs on its own CPU (printed after the commands)."""
    version = manifest.llama_cpp_python_version
    hints = [f"the service needs llama-cpp-python {version} built for this device's CPU: "
             "a build made for a newer CPU (a Pi 5 build on a Pi 4) dies at the first "
             "request, and the daemon's preflight exits 5 saying `built for another CPU?`"]
    if manifest.profile.arch == "aarch64":
        hints += [
            "build it on the device (native for its own CPU): "
            "`python3 tools/build/llama_build.py --install /path/to/venv/bin/python`",
            "or one build for every Pi, with ggml's runtime CPU variants picked at load "
            "(-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON, GGML_BACKEND_DIR set to where "
            "the libraries go; GCC 14 for ggml's armv9.2 variants, or the three Pi variants "
            "of tools/arm/cross_build.py): README, \"On the device\"",
        ]
    else:
        hints.append("build it with portable flags: `python3 tools/build/llama_build.py --install "
                     "/path/to/venv/bin/python` (README, \"The llama.cpp build\")")
    return hints


def rollback(
    name: str, root: Path = Path("/"), dry_run: bool = False, enable: bool = False,
    executable: str | None = None,
) -> InstallReport:
    """Swap the installed bundle with the one it replaced (running it twice swaps back)."""
    root = Path(root)
    check_bundle_name(name)
    _check_enable(enable, root, dry_run)
    bundles = _under(root, BUNDLES_DIR)
    current, previous = bundles / name, bundles / PREVIOUS / name
    if not previous.is_dir():
        raise InstallError(
            f"no previous bundle of {name} to roll back to ({previous} does not exist)",
            hint="rollback needs an earlier `edgerunner install` of the same bundle name",
        )
    if not current.is_dir():
        raise InstallError(f"{name} is not installed ({current} does not exist)",
                           hint="install it with `edgerunner install BUNDLE`")
    manifest = _verified(previous)
    report = InstallReport(
        name=name, root=str(root), dry_run=dry_run, bundle_dir=f"{BUNDLES_DIR}/{name}",
        unit=unit_name(name), socket=socket_path(name),
        previous=f"{BUNDLES_DIR}/{PREVIOUS}/{name}",
    )
    report.changes.append(f"swap {current} with {previous}")
    if not dry_run:
        exchange(previous, current)
    config = _read_config(previous if dry_run else current)
    etc_config = _write_config(report, config, root, dry_run,
                               installed_from=current if dry_run else previous)
    _write_unit(report, manifest, root, executable or default_executable(), dry_run,
                drain_timeout_s(config, etc_config))
    _commands(report, root, enable)
    return report


def _check_enable(enable: bool, root: Path, dry_run: bool) -> None:
    if not enable or dry_run:
        return
    if root.resolve() != Path("/"):
        raise InstallError(
            f"--enable starts the service on this machine, but --root is {root}",
            hint="run the printed systemctl commands on the device instead",
        )
    if not systemd_running():
        raise InstallError("--enable needs systemd, and it is not running here",
                           hint="leave out --enable and start the daemon another way")


def _stage(source: Path, parent: Path) -> tuple[Path, Path]:
    """Copy or extract the bundle into a fresh temp directory under parent: (holder, bundle)."""
    holder = Path(tempfile.mkdtemp(prefix=".install-", dir=parent))
    try:
        if source.is_file():
            from edgerunner.bundle.archive import extract_archive

            return holder, extract_archive(source, holder)
        if not source.is_dir():
            raise InstallError(f"{source} is neither a bundle directory nor a .tar archive")
        staged = holder / source.name
        shutil.copytree(source, staged, symlinks=False)
        return holder, staged
    except OSError as exc:
        shutil.rmtree(holder, ignore_errors=True)
        raise InstallError(f"could not copy {source} to {parent}: {exc.strerror or exc}",
                           hint="check free space and permissions") from exc
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise


def _read_config(bundle: Path) -> str:
    path = bundle / "config.toml"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror or exc}",
                           hint="re-pack the bundle") from exc


def bundle_id(bundle: Path) -> str:
    """First 12 hex digits of the sha256 of manifest.json: names one bundle's content."""
    try:
        return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def _default_keyring(root: Path) -> Path:
    from edgerunner.device.sign import default_keyring

    return default_keyring(root)


def _verified(bundle: Path, keyring: Path | None = None,
              shown: Path | None = None) -> BundleManifest:
    # Verify the copy that will actually run, not the source: it also catches copy errors.
    from edgerunner.bundle.store import verify_bundle
    from edgerunner.device.sign import check_signature

    report = verify_bundle(bundle)
    try:
        report.raise_for_problems()
        if keyring is not None:
            check_signature(bundle, keyring, shown)
    except BundleError as exc:
        raise InstallError(f"refusing to install: {exc.message}",
                           hint=exc.hint or "re-pack or copy the bundle again") from exc
    assert report.manifest is not None
    check_bundle_name(report.manifest.name)
    return report.manifest


def _place(
    staged: Path, manifest: BundleManifest, root: Path, dry_run: bool
) -> tuple[InstallReport, bool]:
    """Rename the staged bundle into place, moving an older different one to .previous.

    Returns the report and whether an older bundle was moved aside.
    """
    name = manifest.name
    bundles = _under(root, BUNDLES_DIR)
    current, previous = bundles / name, bundles / PREVIOUS / name
    report = InstallReport(
        name=name, root=str(root), dry_run=dry_run, bundle_dir=f"{BUNDLES_DIR}/{name}",
        unit=unit_name(name), socket=socket_path(name),
        previous=f"{BUNDLES_DIR}/{PREVIOUS}/{name}" if previous.is_dir() else None,
    )
    if current.is_dir() and _same_bundle(current, staged):
        logger.info("%s is already installed at %s", name, current)
        return report, False
    rotated = current.is_dir()
    if rotated:
        report.changes.append(f"keep {current} as {previous} for rollback")
        report.previous = f"{BUNDLES_DIR}/{PREVIOUS}/{name}"
    report.changes.append(f"install bundle {name} to {current}")
    if dry_run:
        return report, rotated
    _make_readable(staged)
    try:
        if rotated:
            _mkdir(previous.parent)
            if previous.exists():
                shutil.rmtree(previous)
            # One atomic step puts the new bundle in place: at no moment is there none.
            exchange(staged, current)
            os.rename(staged, previous)
        else:
            os.rename(staged, current)
    except OSError as exc:
        raise InstallError(f"could not move {name} into {bundles}: {exc.strerror or exc}",
                           hint="check permissions; the previous bundle is in "
                           f"{previous}") from exc
    return report, rotated


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    func.restype = ctypes.c_int
    result: Callable[..., int] = func
    return result


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (renameat2 RENAME_EXCHANGE); three renames where the
    filesystem cannot (then a crash between them leaves a `.<name>.swap` to recover from)."""
    func = _renameat2()
    if func is not None:
        if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(a))
    parked = b.with_name(f".{b.name}.swap")
    shutil.rmtree(parked, ignore_errors=True)
    os.rename(b, parked)
    os.rename(a, b)
    os.rename(parked, a)


def _same_bundle(a: Path, b: Path) -> bool:
    # manifest.json lists every file's sha256, and both copies verified against their own.
    try:
        return (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    except OSError:
        return False


def _make_readable(bundle: Path) -> None:
    # The service user reads what root wrote; a packer's umask must not lock it out.
    for dirpath, _dirs, files in os.walk(bundle):
        os.chmod(dirpath, 0o755)
        for file in files:
            os.chmod(os.path.join(dirpath, file), 0o644)


def drain_timeout_s(*configs: str) -> float | None:
    """drain_timeout_s as the daemon will read it from these config.toml texts (last wins).

    None when none sets a valid one: the unit then covers ServeConfig's default.
    """
    from edgerunner.bundle.settings import ServeConfig

    value = None
    for text in configs:
        try:
            value = tomllib.loads(text).get("drain_timeout_s", value)
        except tomllib.TOMLDecodeError:
            continue  # the daemon names a broken config itself when it starts
    if value is None:
        return None
    try:
        return ServeConfig(drain_timeout_s=value).drain_timeout_s
    except ValidationError:
        return None


def _write_unit(report: InstallReport, manifest: BundleManifest, root: Path, executable: str,
                dry_run: bool, drain_s: float | None) -> None:
    text = render_unit(manifest, executable=executable, drain_timeout_s=drain_s)
    _write_file(report, _under(root, UNIT_DIR) / unit_name(manifest.name), text, dry_run,
                mode=0o644)


def _write_config(report: InstallReport, new_default: str, root: Path, dry_run: bool,
                  installed_from: Path) -> str:
    """Install the bundle's config.toml as /etc/edgerunner/<name>.toml, keeping local edits.

    A file still equal to the default of the bundle it was installed from was never edited and
    follows the new bundle; an edited one stays, and the new default lands next to it as
    <name>.toml.new. Returns what /etc/edgerunner/<name>.toml holds afterwards.
    """
    target = _under(root, CONFIG_DIR) / f"{report.name}.toml"
    if target.exists():
        current = target.read_text(encoding="utf-8")
        if current == new_default:
            return current
        old_default = installed_from / "config.toml"
        pristine = old_default.is_file() and filecmp.cmp(old_default, target, shallow=False)
        if not pristine:
            before = len(report.changes)
            _write_file(report, target.with_name(target.name + ".new"), new_default, dry_run,
                        mode=0o640)
            if len(report.changes) > before:
                report.changes.append(f"kept locally edited {target}; compare with {target}.new")
            return current
    _write_file(report, target, new_default, dry_run, mode=0o640)
    return new_default


def _write_file(report: InstallReport, path: Path, text: str, dry_run: bool, mode: int) -> None:
    """Write path atomically if its content differs; record the change."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    report.changes.append(f"write {path}")
    if dry_run:
        return
    _mkdir(path.parent)

    def permissions(tmp: Path) -> None:
        os.chmod(tmp, mode)
        if mode & 0o040 and not mode & 0o004:
            _chgrp_service(tmp)

    try:
        atomic_write_text(path, text, before_rename=permissions)
    except OSError as exc:
        raise InstallError(f"could not write {path}: {exc.strerror or exc}",
                           hint="run as root, or pass --root DIR") from exc


def _chgrp_service(path: Path) -> None:
    # The config may hold MQTT credentials: group-readable by the service only, once it exists.
    try:
        gid = grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        os.chmod(path, 0o644)  # no group yet: the service must still be able to read it
        return
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        os.chmod(path, 0o644)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create {path}: {exc.strerror or exc}",
                           hint="run as root, or pass --root DIR") from exc


def _commands(report: InstallReport, root: Path, enable: bool) -> None:
    unit = report.unit
    report.commands = [
        f"systemd-sysusers {SYSUSERS_FILE}",
        "systemctl daemon-reload",
        f"systemctl enable {unit}",
        f"systemctl restart {unit}",
    ]
    if not enable or report.dry_run:
        return
    for command in report.commands:
        logger.info("running %s", command)
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InstallError(
                f"`{command}` failed (exit {done.returncode}): {done.stderr.strip()}",
                hint=f"see `journalctl -u {unit}`",
            )
    report.ran_commands = True
