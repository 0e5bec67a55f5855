"""`edgerunner install BUNDLE`: verify, switch, restart, prove, commit or roll back; and the
update's other verbs (--status, --recover, --rollback NAME, --mender-module)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgerunner.cli.output import console, json_option, print_json

if TYPE_CHECKING:
    from edgerunner.device.service import ServiceController


@click.command("install")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Install under this directory (e.g. a mounted SD card).")
@click.option("--dry-run", is_flag=True, help="Verify and show what would change; write nothing.")
@click.option("--enable", is_flag=True,
              help="Enable and start the systemd service, then prove it (root, systemd only).")
@click.option("--start", is_flag=True,
              help="Start and prove the service even if it is not running yet.")
@click.option("--service", type=click.Choice(["auto", "systemd", "direct"]), default="auto",
              show_default=True,
              help="What runs the daemon: systemd, or `edgerunner serve` as a child process "
              "(direct; auto picks systemd when --root is / and systemd runs).")
@click.option("--window", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds the new bundle has to become ready and answer its smoke prompts.")
@click.option("--keyring", type=click.Path(file_okay=False, path_type=Path),
              help="Trusted bundle keys [default: $EDGERUNNER_KEYRING or "
              "ROOT/etc/edgerunner/keys].")
@click.option("--rollback", metavar="NAME",
              help="Swap bundle NAME back to the version the last install replaced.")
@click.option("--status", "show_status", is_flag=True, help="Show the last update's journal.")
@click.option("--recover", is_flag=True, help="Switch back an update that was interrupted.")
@click.option("--no-commit", is_flag=True, hidden=True,
              help="Stop at `proven` (Mender's ArtifactInstall); --commit finishes.")
@click.option("--commit", "commit_pending", is_flag=True, hidden=True,
              help="Commit an update left at `proven`.")
@click.option("--mender-module", is_flag=True,
              help="Install Mender's edgerunner-bundle update module under ROOT.")
@json_option
def install_cmd(bundle: Path | None, root: Path, dry_run: bool, enable: bool, start: bool,
                service: str, window: float, keyring: Path | None, rollback: str | None,
                show_status: bool, recover: bool, no_commit: bool, commit_pending: bool,
                mender_module: bool, as_json: bool) -> None:
    """Install a bundle on a device. With its service running (or --start/--enable), the
    update is health-gated: stage, switch, restart, prove (READY, fit, smoke prompts), then
    commit, or switch back and fail naming what failed."""
    from edgerunner.device import install, update

    verbs = [bundle is not None, rollback is not None, show_status, recover, commit_pending,
             mender_module]
    if sum(verbs) != 1:
        raise click.UsageError("pass one of BUNDLE, --rollback NAME, --status, --recover, "
                               "--mender-module")
    if show_status:
        _print_status(update.describe(root), as_json)
        return
    if mender_module:
        from edgerunner.device.mender.module import install_module

        path = install_module(root, service=service, window_s=window, keyring=keyring)
        if as_json:
            print_json({"module": str(path)})
        else:
            console().print(f"wrote {path}: Mender calls it for artifacts of type "
                            "edgerunner-bundle (`edgerunner pack --mender DEVICE_TYPE`)")
        return
    if rollback is not None:
        report = install.rollback(rollback, root=root, dry_run=dry_run, enable=enable)
        _print_report(report, None, dry_run, as_json)
        return
    controller = _controller(service, root, enable)
    if recover:
        _print_status({"update": _dump(update.recover(root, controller, window_s=window))},
                      as_json)
        return
    if commit_pending:
        _print_status({"update": _dump(update.commit_pending(root, controller))}, as_json)
        return
    assert bundle is not None
    if dry_run:
        report = install.install_bundle(bundle, root=root, dry_run=True, keyring=keyring)
        _print_report(report, None, dry_run, as_json)
        return
    try:
        state, report = update.update(bundle, root, controller, commit=not no_commit,
                                      start=start or enable, window_s=window, keyring=keyring)
    except update.UpdateFailed as exc:
        if as_json:
            print_json({"ok": False, "error": exc.message, "update": exc.state})
        raise
    _print_report(report, state, dry_run, as_json)


def _dump(state: object) -> object:
    from pydantic import BaseModel

    return state.model_dump(mode="json") if isinstance(state, BaseModel) else state


def _controller(service: str, root: Path, enable: bool) -> ServiceController:
    from edgerunner.device.install import default_executable
    from edgerunner.device.service import pick_controller
    from edgerunner.errors import InstallError

    if enable:
        if root.resolve() != Path("/"):
            raise InstallError(f"--enable starts the service on this machine, but --root is "
                               f"{root}", hint="run the printed systemctl commands on the "
                               "device instead")
        service = "systemd"
    return pick_controller(service, root, default_executable())


def _print_status(data: dict[str, object], as_json: bool) -> None:
    if as_json:
        print_json(data)
        return
    out = console()
    state = data.get("update")
    if not isinstance(state, dict):
        out.print("no update has run here")
        return
    out.print(f"{state['name']}: {state['state']} (bundle {state['bundle_id']}, previous "
              f"{state.get('previous_id') or 'none'}, via {state['controller'] or '?'})")
    if "active" in data:
        out.print(f"active bundle: {data['active']}; kept for rollback: {data.get('previous')}")
    if state.get("error"):
        out.print(f"error: {state['error']}")
    for step in state.get("steps", []):
        out.print(f"  {step['at']}  {step['state']:<12} {step['detail']}")


def _print_report(report: object, state: object, dry_run: bool, as_json: bool) -> None:
    from edgerunner.device.install import SERVICE_USER, InstallReport
    from edgerunner.device.update import UpdateState

    assert isinstance(report, InstallReport)
    gated = isinstance(state, UpdateState) and state.state in ("committed", "proven")
    if as_json:
        print_json({**report.model_dump(mode="json"), "changed": report.changed,
                    "update": _dump(state)})
        return
    out = console()
    verb = "would " if dry_run else ""
    for change in report.changes:
        out.print(f"{verb}{change}")
    if not report.changes:
        out.print(f"{report.name} is already installed as {report.bundle_dir}; nothing changed")
    if report.previous:
        out.print(f"rollback: edgerunner install --rollback {report.name}")
    if isinstance(state, UpdateState) and gated:
        out.print(f"{state.state}: " + " -> ".join(state.sequence))
        out.print(next(step.detail for step in state.steps if step.state == "proven"))
    elif report.ran_commands:
        out.print(f"started {report.unit}")
    else:
        out.print("then, on the device, run:")
        for command in report.commands:
            out.print(f"  {command}")
    # `ask` finds a lone service's socket by itself; with several installed it needs the flag.
    out.print(f"the service listens on {report.socket} (group {SERVICE_USER}: "
              f"`usermod -aG {SERVICE_USER} USER` to let USER in); ask it with:")
    out.print(f"  edgerunner ask --socket {report.socket} 'Hello'")
    for hint in report.hints:
        out.print(hint)
