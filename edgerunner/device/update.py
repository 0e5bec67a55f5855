"""Health-gated A/B updates: stage, switch, restart, prove, then commit or roll back.

    idle ──> staged ──> switched ──> restarted ──> proven ──> committed
                           │             │            │
                           └─────────────┴────────────┴──> rolling-back ──> rolled-back
                                                                        └─> failed

The journal (var/lib/edgerunner/update.json) is written before each step, so a crash at any
step leaves it readable (`install --status`) and the next update, or `install --recover`,
switches back an update that never committed. The bundle directory itself is switched with
one atomic exchange (device.install), so exactly one bundle is active at every moment.
One update at a time: var/lib/edgerunner/update.lock (flock) is held throughout.

With commit=False the update stops at `proven` (Mender's ArtifactInstall): commit_pending()
or rollback_pending() finishes it (ArtifactCommit / ArtifactRollback).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner._fs import atomic_write_text
from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.store import read_manifest
from edgerunner.bundle.unit import BUNDLES_DIR
from edgerunner.device import install
from edgerunner.device.service import ServiceController
from edgerunner.device.smoke import DEFAULT_WINDOW_S, GateFailed, current_pid, prove
from edgerunner.errors import EdgerunnerError, InstallError

logger = logging.getLogger(__name__)

STATE_FILE = "/var/lib/edgerunner/update.json"
LOCK_FILE = "/var/lib/edgerunner/update.lock"

State = Literal["staged", "switched", "restarted", "proven", "committed", "rolling-back",
                "rolled-back", "failed", "unchanged", "installed"]
UNFINISHED = ("staged", "switched", "restarted", "proven", "rolling-back")


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: str
    at: str
    detail: str = ""


class UpdateState(BaseModel):
    """The journal of the last (or running) update."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Bundle name (systemd instance)")
    state: State = Field(..., description="Where the update is")
    bundle_id: str = Field("", description="The new bundle's id (sha256 of its manifest, 12)")
    previous_id: str | None = Field(None, description="Bundle it replaces, if any")
    controller: str = Field("", description="systemd or direct")
    was_running: bool = Field(False, description="A daemon ran before the update")
    pid: int = Field(0, description="Process that ran the update")
    error: str = Field("", description="What failed, for rolled-back and failed")
    steps: list[Step] = Field(default_factory=list, description="Every state with its time")

    @property
    def sequence(self) -> list[str]:
        return [step.state for step in self.steps]


class UpdateFailed(InstallError):
    """The new bundle failed its gate; the state says whether the old one is back."""

    def __init__(self, message: str, hint: str | None, state: UpdateState) -> None:
        super().__init__(message, hint)
        self.state = state


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _path(root: Path, absolute: str) -> Path:
    return Path(root) / absolute.lstrip("/")


def read_state(root: Path = Path("/")) -> UpdateState | None:
    """The journal, None before the first update."""
    path = _path(root, STATE_FILE)
    try:
        return UpdateState.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        raise InstallError(f"the update journal {path} is unreadable: {exc}",
                           hint="inspect it; remove it only if no update is running") from exc


class _Journal:
    def __init__(self, root: Path, state: UpdateState) -> None:
        self.root = root
        self.state = state

    def enter(self, state: State, detail: str = "") -> None:
        self.state.state = state
        self.state.steps.append(Step(state=state, at=_now(), detail=detail))
        logger.info("update %s: %s%s", self.state.name, state, f" ({detail})" if detail else "")
        path = _path(self.root, STATE_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.state.model_dump_json(indent=2) + "\n",
                          before_rename=lambda tmp: os.chmod(tmp, 0o644))


@contextlib.contextmanager
def update_lock(root: Path) -> Iterator[None]:
    """Hold the update lock, or InstallError naming who holds it."""
    path = _path(root, LOCK_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InstallError(f"another update is running (pid {holder}); one at a time",
                               hint="wait for it; `edgerunner install --status` shows it") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def installed_id(root: Path, name: str, previous: bool = False) -> str | None:
    """Id of the active (or the kept previous) bundle `name`, None if there is none."""
    bundles = _path(root, BUNDLES_DIR)
    path = bundles / install.PREVIOUS / name if previous else bundles / name
    return install.bundle_id(path) if (path / "manifest.json").is_file() else None


def update(source: Path, root: Path, controller: ServiceController, *, commit: bool = True,
           start: bool = False, window_s: float = DEFAULT_WINDOW_S,
           executable: str | None = None,
           keyring: Path | None = None) -> tuple[UpdateState, install.InstallReport]:
    """Install source with the health gate; UpdateFailed (after rolling back) if it fails.

    The gate runs when the bundle's service is running, or with start=True; otherwise the
    bundle is only laid out (state `installed`).
    """
    root = Path(root)
    with update_lock(root):
        _recover(root, controller, executable, window_s)
        journal: _Journal | None = None

        def staged(manifest: BundleManifest, new_id: str) -> None:
            nonlocal journal
            running = controller.is_running(manifest.name)
            journal = _Journal(root, UpdateState(
                name=manifest.name, state="staged", bundle_id=new_id,
                previous_id=installed_id(root, manifest.name), controller=controller.kind,
                was_running=running, pid=os.getpid()))
            journal.enter("staged", f"verified {source}")

        # verifies, checks the signature, journals `staged`, switches atomically
        report = install.install_bundle(source, root=root, executable=executable,
                                        keyring=keyring, on_verified=staged)
        assert journal is not None
        name = report.name
        if not report.changed:
            journal.enter("unchanged", f"{name} {journal.state.bundle_id} is already installed")
            if start and not controller.is_running(name):
                _start_and_prove(journal, controller, root, window_s, None)
            return journal.state, report
        journal.enter("switched", "; ".join(report.changes))
        if not (start or journal.state.was_running):
            journal.enter("installed", f"{name} is not running; not started")
            return journal.state, report
        replaced = current_pid(controller, name)
        try:
            _start_and_prove(journal, controller, root, window_s, replaced)
        except (GateFailed, EdgerunnerError) as exc:
            step = exc.step if isinstance(exc, GateFailed) else "restart"
            _roll_back(journal, controller, root, executable, window_s,
                       f"{step} failed: {exc}")
        if commit:
            journal.enter("committed")
        return journal.state, report


def _start_and_prove(journal: _Journal, controller: ServiceController, root: Path,
                     window_s: float, replaced: int | None) -> None:
    name = journal.state.name
    controller.restart(name)
    journal.enter("restarted", f"{controller.kind} restarted {name}")
    manifest = read_manifest(_path(root, BUNDLES_DIR) / name)
    result = prove(controller, name, manifest, window_s, replaced_pid=replaced)
    journal.enter("proven", f"pid {result.pid} ready in {result.ready_s:g} s; smoke "
                  + ", ".join(f"{k} {v:g} s" for k, v in result.smoke.items()))


def _roll_back(journal: _Journal, controller: ServiceController, root: Path,
               executable: str | None, window_s: float, why: str) -> None:
    """Switch back to the previous bundle, restart and check it; always raises UpdateFailed."""
    state = journal.state
    name = state.name
    state.error = why
    journal.enter("rolling-back", why)
    if state.previous_id is None:
        controller.stop(name)
        journal.enter("failed", f"{why}; no previous bundle to go back to, {name} is stopped")
        raise UpdateFailed(f"update of {name} failed ({why}); there was no previous bundle, "
                           "so the service is stopped", "fix the bundle and install it again",
                           state)
    try:
        if installed_id(root, name) != state.previous_id:
            install.rollback(name, root=root, executable=executable)
        controller.restart(name)
        manifest = read_manifest(_path(root, BUNDLES_DIR) / name)
        if state.was_running:
            prove(controller, name, manifest, window_s, latency=False)
    except (GateFailed, EdgerunnerError, OSError) as exc:
        journal.enter("failed", f"{why}; the previous bundle did not come back either: {exc}")
        raise UpdateFailed(f"update of {name} failed ({why}), and the previous bundle "
                           f"{state.previous_id} failed its check too: {exc}",
                           f"see `journalctl -u edgerunner@{name}` or the daemon's log",
                           state) from exc
    journal.enter("rolled-back", f"{state.previous_id} is active again")
    raise UpdateFailed(f"update of {name} to {state.bundle_id} rolled back: {why}",
                       f"{state.previous_id} answers again; fix the bundle and install it again",
                       state)


def _recover(root: Path, controller: ServiceController, executable: str | None,
             window_s: float) -> UpdateState | None:
    """Switch back an update that never committed (crashed, or left pending)."""
    state = read_state(root)
    if state is None or state.state not in UNFINISHED:
        return state
    journal = _Journal(root, state)
    name = state.name
    if installed_id(root, name) == state.bundle_id and state.previous_id is not None:
        try:
            _roll_back(journal, controller, root, executable, window_s,
                       f"update interrupted at {state.state}")
        except UpdateFailed as exc:
            logger.warning("%s", exc)
    else:
        journal.enter("rolled-back", f"interrupted at {state.state} before the switch; "
                      f"{installed_id(root, name)} stayed active")
    return journal.state


def recover(root: Path, controller: ServiceController, executable: str | None = None,
            window_s: float = DEFAULT_WINDOW_S) -> UpdateState | None:
    """`install --recover`: finish an interrupted update by switching it back."""
    with update_lock(Path(root)):
        return _recover(Path(root), controller, executable, window_s)


def commit_pending(root: Path, controller: ServiceController) -> UpdateState:
    """Commit an update left at `proven`, after checking it still answers."""
    root = Path(root)
    with update_lock(root):
        state = read_state(root)
        if state is None or state.state != "proven":
            raise InstallError(f"no proven update to commit (state: "
                               f"{state.state if state else 'none'})",
                               hint="install a bundle first")
        journal = _Journal(root, state)
        if installed_id(root, state.name) != state.bundle_id:
            raise InstallError(f"{state.name} is no longer {state.bundle_id}; not committing")
        why = controller.exited(state.name)
        if why is not None:
            raise InstallError(f"refusing to commit {state.name}: {why}",
                               hint="roll back with `mender rollback`")
        try:
            pid = current_pid(controller, state.name)
            if pid is None:
                raise InstallError(f"refusing to commit {state.name}: its socket does not "
                                   "answer")
        except InstallError:
            raise
        journal.enter("committed", f"pid {pid}")
        return journal.state


def rollback_pending(root: Path, controller: ServiceController,
                     executable: str | None = None,
                     window_s: float = DEFAULT_WINDOW_S) -> UpdateState:
    """Roll back an update that has not committed (Mender's ArtifactRollback)."""
    root = Path(root)
    with update_lock(root):
        state = read_state(root)
        if state is None or state.state not in UNFINISHED:
            raise InstallError(f"no uncommitted update to roll back (state: "
                               f"{state.state if state else 'none'})",
                               hint="`edgerunner install --rollback NAME` swaps a committed one")
        journal = _Journal(root, state)
        try:
            _roll_back(journal, controller, root, executable, window_s, "rollback requested")
        except UpdateFailed as exc:
            if journal.state.state == "failed":
                raise
            logger.info("%s", exc.message)
        return journal.state


def describe(root: Path) -> dict[str, object]:
    """`install --status`: the journal plus what is active now."""
    state = read_state(root)
    out: dict[str, object] = {"update": state.model_dump(mode="json") if state else None}
    if state is not None:
        out["active"] = installed_id(root, state.name)
        out["previous"] = installed_id(root, state.name, previous=True)
    return out
