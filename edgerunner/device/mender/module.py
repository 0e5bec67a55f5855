"""Mender's `edgerunner-bundle` update module (protocol v3): the health-gated install.

Mender calls ``<module> STATE FILES_DIR`` for each state of an artifact of payload type
edgerunner-bundle; the bundle .tar is in FILES_DIR/files/ from Download on.

    Download            nothing to do: Mender stores the payload in FILES_DIR/files/
    SupportsRollback    "Yes"
    ArtifactInstall     device.update.update(tar, commit=False): stage, switch, restart, prove;
                        a failure rolls back by itself and exits 1 (Mender then calls
                        ArtifactRollback, a no-op by then, and ArtifactFailure)
    NeedsArtifactReboot "No"
    ArtifactCommit      check the new bundle still answers, then commit; exit 1 if not (Mender
                        then calls ArtifactRollback)
    ArtifactRollback    switch back to the previous bundle, restart it and check it
    others              nothing (ArtifactFailure, Cleanup, reboot states)

Every state called is appended to var/lib/edgerunner/mender-states.log (under --root).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgerunner._fs import atomic_write_text
from edgerunner.device.mender.artifact import PAYLOAD_TYPE
from edgerunner.errors import EdgerunnerError, InstallError

logger = logging.getLogger(__name__)

MODULES_DIR = "/usr/share/mender/modules/v3"
STATES_LOG = "/var/lib/edgerunner/mender-states.log"


def install_module(root: Path, service: str = "auto", window_s: float = 300.0,
                   keyring: Path | None = None, python: str | None = None) -> Path:
    """Write the update module under root; it runs this Python's edgerunner."""
    root = Path(root)
    path = root / MODULES_DIR.lstrip("/") / PAYLOAD_TYPE
    args = [python or sys.executable, "-m", "edgerunner.device.mender.module",
            "--root", str(root.resolve()), "--service", service, "--window", f"{window_s:g}"]
    if keyring is not None:
        args += ["--keyring", str(keyring.resolve())]
    text = (
        "#!/bin/sh\n"
        "# Mender update module for edgerunner bundles (payload type edgerunner-bundle),\n"
        "# written by `edgerunner install --mender-module`: health-gated install and rollback.\n"
        f"exec {' '.join(_quote(a) for a in args)} \"$@\"\n"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text, before_rename=lambda tmp: os.chmod(tmp, 0o755))
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}",
                           hint="run as root, or pass --root DIR") from exc
    return path


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _log_state(root: Path, state: str) -> None:
    path = root / STATES_LOG.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='milliseconds')} {state}\n")


def _payload(files_dir: Path) -> Path:
    found = sorted(p for p in (files_dir / "files").glob("*") if p.is_file())
    if len(found) != 1:
        raise InstallError(f"the artifact carries {len(found)} files in {files_dir}/files, "
                           "an edgerunner-bundle artifact carries one bundle .tar",
                           hint="write it with `edgerunner pack --mender DEVICE_TYPE`")
    return found[0]


def run(state: str, files_dir: Path, root: Path, service: str, window_s: float,
        keyring: Path | None) -> int:
    """Handle one Mender state; the exit code Mender sees."""
    from edgerunner.device import update
    from edgerunner.device.install import default_executable
    from edgerunner.device.service import pick_controller

    _log_state(root, state)
    if state == "SupportsRollback":
        print("Yes")
        return 0
    if state == "NeedsArtifactReboot":
        print("No")
        return 0
    if state not in ("ArtifactInstall", "ArtifactCommit", "ArtifactRollback"):
        return 0
    controller = pick_controller(service, root, default_executable())
    if state == "ArtifactInstall":
        tar = _payload(files_dir)
        result, _report = update.update(tar, root, controller, commit=False, start=True,
                                        window_s=window_s, keyring=keyring)
        print(f"edgerunner-bundle: {result.name} {result.bundle_id}: "
              f"{' -> '.join(result.sequence)}", file=sys.stderr)
        return 0
    if state == "ArtifactCommit":
        result = update.commit_pending(root, controller)
        print(f"edgerunner-bundle: committed {result.name} {result.bundle_id}", file=sys.stderr)
        return 0
    current = update.read_state(root)
    if current is None or current.state not in update.UNFINISHED:
        print("edgerunner-bundle: nothing to roll back "
              f"(last update: {current.state if current else 'none'})", file=sys.stderr)
        return 0
    result = update.rollback_pending(root, controller, window_s=window_s)
    print(f"edgerunner-bundle: rolled back {result.name} to {result.previous_id}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the module script: [options] STATE FILES_DIR."""
    parser = argparse.ArgumentParser(prog=PAYLOAD_TYPE)
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--service", default="auto", choices=["auto", "systemd", "direct"])
    parser.add_argument("--window", type=float, default=300.0)
    parser.add_argument("--keyring", type=Path, default=None)
    parser.add_argument("state")
    parser.add_argument("files_dir", type=Path, nargs="?", default=Path("."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="edgerunner-bundle %(levelname)s %(message)s")
    try:
        return run(args.state, args.files_dir, args.root, args.service, args.window,
                   args.keyring)
    except EdgerunnerError as exc:
        print(f"edgerunner-bundle: {args.state} failed: {exc}", file=sys.stderr)
        return 1


def is_installed(root: Path) -> bool:
    """Whether the module is in place and executable under root."""
    path = Path(root) / MODULES_DIR.lstrip("/") / PAYLOAD_TYPE
    try:
        return bool(path.stat().st_mode & stat.S_IXUSR)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
