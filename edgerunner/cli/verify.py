"""`edgerunner verify BUNDLE [--here]`: hashes, schema, runtime version, and optionally memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from edgerunner.cli.output import console, json_option, print_json


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--here", is_flag=True,
              help="Also check that the plan fits this machine's memory now.")
@json_option
def verify_cmd(bundle: Path, here: bool, as_json: bool) -> None:
    """Check a bundle (directory or .tar): every file's hash, the schema and the runtime version."""
    from edgerunner.archive import extract_archive
    from edgerunner.bundle import verify_bundle
    from edgerunner.errors import BundleError

    if not bundle.exists():
        raise BundleError(f"bundle {bundle} does not exist", hint="check the path")
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="edgerunner-verify-") as tmp:
            report = verify_bundle(extract_archive(bundle, Path(tmp)), here=here)
            report.bundle = str(bundle)
    else:
        report = verify_bundle(bundle, here=here)
    if as_json:
        print_json({"ok": report.ok, "bundle": report.bundle, "checks": report.checks})
    else:
        out = console()
        for check in report.checks:
            mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
            out.print(f"{mark} {check.name}: {check.detail}")
    if not report.ok:
        report.raise_for_problems()
    elif not as_json:
        console().print(f"bundle {bundle} verified")
