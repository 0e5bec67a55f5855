"""`edgerunner install BUNDLE [--root DIR] [--dry-run] [--enable]` and `--rollback NAME`."""

from __future__ import annotations

from pathlib import Path

import click

from edgerunner.cli.output import console, json_option, print_json


@click.command("install")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Install under this directory (e.g. a mounted SD card).")
@click.option("--dry-run", is_flag=True, help="Verify and show what would change; write nothing.")
@click.option("--enable", is_flag=True,
              help="Also run the systemctl commands (root / with systemd running only).")
@click.option("--rollback", metavar="NAME",
              help="Swap bundle NAME back to the version the last install replaced.")
@json_option
def install_cmd(bundle: Path | None, root: Path, dry_run: bool, enable: bool,
                rollback: str | None, as_json: bool) -> None:
    """Lay a bundle out on a device: bundle dir, systemd unit, /etc/edgerunner/<name>.toml."""
    from edgerunner.device import install

    if (bundle is None) == (rollback is None):
        raise click.UsageError("pass either BUNDLE to install or --rollback NAME")
    if rollback is not None:
        report = install.rollback(rollback, root=root, dry_run=dry_run, enable=enable)
    else:
        assert bundle is not None
        report = install.install_bundle(bundle, root=root, dry_run=dry_run, enable=enable)
    if as_json:
        print_json({**report.model_dump(mode="json"), "changed": report.changed})
        return
    out = console()
    verb = "would " if dry_run else ""
    for change in report.changes:
        out.print(f"{verb}{change}")
    if not report.changes:
        out.print(f"{report.name} is already installed as {report.bundle_dir}; nothing changed")
    if report.previous:
        out.print(f"rollback: edgerunner install --rollback {report.name}")
    if report.ran_commands:
        out.print(f"started {report.unit}")
    else:
        out.print("then, on the device, run:")
        for command in report.commands:
            out.print(f"  {command}")
    # `ask` finds a lone service's socket by itself; with several installed it needs the flag.
    group = install.SERVICE_USER
    out.print(f"the service listens on {report.socket} (group {group}: "
              f"`usermod -aG {group} USER` to let USER in); ask it with:")
    out.print(f"  edgerunner ask --socket {report.socket} 'Hello'")
    for hint in report.hints:
        out.print(hint)
