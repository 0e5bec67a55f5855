"""`edgerunner verify BUNDLE [--here]`: hashes, schema, runtime version, and optionally memory."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgerunner.cli.output import console, json_option, print_json

if TYPE_CHECKING:
    from edgerunner.bundle.store import VerifyReport


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--here", is_flag=True,
              help="Also check that the plan fits this machine's memory now.")
@click.option("--keyring", type=click.Path(file_okay=False, path_type=Path),
              help="Trusted public keys (*.pub) [default: $EDGERUNNER_KEYRING or "
              "/etc/edgerunner/keys]. Once it holds a key, unsigned bundles fail.")
@json_option
def verify_cmd(bundle: Path, here: bool, keyring: Path | None, as_json: bool) -> None:
    """Check a bundle (directory or .tar): every file's hash, the schema and the runtime version.

    With --here, also whether it fits this machine's memory now, and which llama.cpp path
    decodes on this CPU (the daemon's preflight, cached). A signed bundle's signature is
    checked against the keyring.
    """
    from edgerunner.bundle.archive import extract_archive
    from edgerunner.bundle.store import verify_bundle
    from edgerunner.errors import BundleError

    if not bundle.exists():
        raise BundleError(f"bundle {bundle} does not exist", hint="check the path")
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="edgerunner-verify-") as tmp:
            unpacked = extract_archive(bundle, Path(tmp))
            report = verify_bundle(unpacked, here=here)
            _check_signature(unpacked, keyring, report)
            if here and report.ok:
                _check_decode_here(unpacked, report)
            report.bundle = str(bundle)
            quality = _quality(unpacked)
    else:
        report = verify_bundle(bundle, here=here)
        _check_signature(bundle, keyring, report)
        if here and report.ok:
            _check_decode_here(bundle, report)
        quality = _quality(bundle)
    if as_json:
        print_json({"ok": report.ok, "bundle": report.bundle, "checks": report.checks,
                    "quality": quality[0], "imatrix": quality[1]})
    else:
        out = console()
        for check in report.checks:
            mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
            out.print(f"{mark} {check.name}: {check.detail}")
        if quality != (None, None):
            from edgerunner.cli.pack import quality_line

            out.print(quality_line(*quality))
    if not report.ok:
        report.raise_for_problems()
    elif not as_json:
        console().print(f"bundle {bundle} verified")


def _check_signature(path: Path, keyring: Path | None, report: VerifyReport) -> None:
    from edgerunner.device.sign import check_signature, default_keyring
    from edgerunner.errors import BundleError

    try:
        found = check_signature(path, keyring or default_keyring())
    except BundleError as exc:
        report.add("signature", False, exc.message + (f"; {exc.hint}" if exc.hint else ""))
        return
    report.add("signature", True, found.detail)


def _quality(path: Path) -> tuple[Any, Any]:
    """(quality, imatrix) the manifest records; (None, None) if it cannot be read."""
    from edgerunner.bundle.manifest import BundleManifest

    try:
        manifest = BundleManifest.model_validate_json((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None, None
    return manifest.quality, manifest.imatrix


def _check_decode_here(path: Path, report: VerifyReport) -> None:
    from edgerunner.bundle.store import MODEL_FILE
    from edgerunner.errors import EdgerunnerError
    from edgerunner.host.cpu import cpu_budget, decode_threads
    from edgerunner.runtime.engine.preflight import preflight

    manifest = report.manifest
    assert manifest is not None
    budget = cpu_budget()
    threads = decode_threads(manifest.plan.n_threads, budget)
    report.add("threads here", True,
               f"{threads} (plan {manifest.plan.n_threads}; {budget.describe()})")
    try:
        verdict = preflight(path / MODEL_FILE, manifest.files[MODEL_FILE].sha256,
                            manifest.plan, threads)
    except EdgerunnerError as exc:
        report.add("decode here", False, str(exc))
        return
    how = "cached verdict" if verdict.cached else f"decoded in {verdict.seconds:.2f} s"
    path_text = ("llama.cpp's extra buffer types on (weight repacking, AMX where built)"
                 if verdict.extra_bufts else
                 f"extra buffer types off, as the default died ({', '.join(verdict.failures)})")
    report.add("decode here", True, f"{path_text}; {how}; {verdict.system_info}")
