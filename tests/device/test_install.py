"""`edgerunner install` into a temp root: fresh, again (no change), upgrade, rollback, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.bundle.archive import write_archive
from edgerunner.bundle.manifest import BundleManifest, FileEntry
from edgerunner.bundle.unit import unit_name
from edgerunner.cli import main
from edgerunner.device.install import install_bundle, rollback
from edgerunner.errors import InstallError


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its mode and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        out[rel] = (path.stat().st_mode & 0o7777, digest)
    return out


def upgraded(bundle: Path, dest: Path, marker: str) -> Path:
    """A copy of bundle with the same name and a changed config.toml, re-hashed: a new version."""
    copy = dest / bundle.name
    shutil.copytree(bundle, copy)
    config = copy / "config.toml"
    config.write_text(config.read_text() + f"# {marker}\n")
    manifest = BundleManifest.model_validate_json((copy / "manifest.json").read_text())
    data = config.read_bytes()
    manifest.files["config.toml"] = FileEntry(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (copy / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return copy


def name_of(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["name"])


def test_install_lays_out_everything(rpi5_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    report = install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    name = name_of(rpi5_bundle)
    installed = root / "var/lib/edgerunner/bundles" / name
    assert (installed / "model.gguf").read_bytes() == (rpi5_bundle / "model.gguf").read_bytes()
    unit = (root / "etc/systemd/system" / unit_name(name)).read_text()
    assert f"ExecStart=/usr/bin/true serve /var/lib/edgerunner/bundles/{name} " in unit
    assert (root / f"etc/edgerunner/{name}.toml").read_text() == (
        rpi5_bundle / "config.toml").read_text()
    assert "u edgerunner" in (root / "etc/sysusers.d/edgerunner.conf").read_text()
    assert report.changed and report.previous is None
    assert f"systemctl enable {unit_name(name)}" in report.commands
    assert not report.ran_commands
    # No staging leftovers next to the installed bundle.
    assert sorted(p.name for p in installed.parent.iterdir()) == [name]
    assert installed.stat().st_mode & 0o777 == 0o755
    assert (installed / "model.gguf").stat().st_mode & 0o777 == 0o644


def test_install_twice_then_upgrade_then_rollback(rpi5_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    name = name_of(rpi5_bundle)
    bundles = root / "var/lib/edgerunner/bundles"
    config = root / f"etc/edgerunner/{name}.toml"

    install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    first = snapshot(root)
    again = install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    assert not again.changed
    assert snapshot(root) == first

    v2 = upgraded(rpi5_bundle, tmp_path / "v2", "version 2")
    report = install_bundle(v2, root=root, executable="/usr/bin/true")
    assert report.previous == f"/var/lib/edgerunner/bundles/.previous/{name}"
    assert (bundles / name / "config.toml").read_text().endswith("# version 2\n")
    assert (bundles / ".previous" / name / "config.toml").read_text() == (
        rpi5_bundle / "config.toml").read_text()
    assert config.read_text().endswith("# version 2\n")  # unedited config follows the bundle

    back = rollback(name, root=root, executable="/usr/bin/true")
    assert back.changed
    # Everything but the kept version 2 is back to the first install, byte for byte.
    assert {k: v for k, v in snapshot(root).items() if ".previous" not in k} == first
    assert (bundles / name / "config.toml").read_text() == (rpi5_bundle / "config.toml").read_text()
    assert config.read_text() == (rpi5_bundle / "config.toml").read_text()
    # Rolling back again goes forward to version 2.
    rollback(name, root=root, executable="/usr/bin/true")
    assert (bundles / name / "config.toml").read_text().endswith("# version 2\n")


def test_upgrade_keeps_a_locally_edited_config(rpi5_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    name = name_of(rpi5_bundle)
    install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    config = root / f"etc/edgerunner/{name}.toml"
    config.write_text(config.read_text() + "queue_depth = 2\n")
    edited = config.read_text()
    report = install_bundle(upgraded(rpi5_bundle, tmp_path / "v2", "v2"), root=root,
                            executable="/usr/bin/true")
    assert config.read_text() == edited
    assert config.with_name(config.name + ".new").read_text().endswith("# v2\n")
    assert any("locally edited" in change for change in report.changes)


def test_unit_stop_timeout_follows_the_installed_config(rpi5_bundle: Path,
                                                       tmp_path: Path) -> None:
    from edgerunner.bundle.unit import STOP_MARGIN_S

    root = tmp_path / "root"
    name = name_of(rpi5_bundle)
    unit = root / "etc/systemd/system" / unit_name(name)
    install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    assert "\nTimeoutStopSec=55\n" in unit.read_text()  # drain 30 s + margin
    config = root / f"etc/edgerunner/{name}.toml"
    config.write_text(config.read_text().replace("drain_timeout_s = 30.0",
                                                 "drain_timeout_s = 300.0"))
    report = install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    assert f"write {unit}" in report.changes
    assert f"\nTimeoutStopSec={300 + STOP_MARGIN_S}\n" in unit.read_text()


def test_dry_run_writes_nothing(rpi5_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    report = install_bundle(rpi5_bundle, root=root, dry_run=True)
    assert report.dry_run and report.changed
    assert not root.exists() or not any(root.rglob("*"))


def test_installs_from_an_archive(rpi5_bundle: Path, tmp_path: Path) -> None:
    archive = write_archive(rpi5_bundle, tmp_path / "bundle.tar")
    root = tmp_path / "root"
    install_bundle(archive, root=root, executable="/usr/bin/true")
    name = name_of(rpi5_bundle)
    assert (root / "var/lib/edgerunner/bundles" / name / "manifest.json").is_file()
    assert sorted(p.name for p in (root / "var/lib/edgerunner/bundles").iterdir()) == [name]


def test_a_tampered_bundle_is_refused_and_nothing_lands(rpi5_bundle: Path,
                                                        tmp_path: Path) -> None:
    bad = tmp_path / "bad" / rpi5_bundle.name
    shutil.copytree(rpi5_bundle, bad)
    with (bad / "config.toml").open("a") as handle:
        handle.write("# sneaked in\n")
    root = tmp_path / "root"
    with pytest.raises(InstallError, match=r"refusing to install.*config\.toml"):
        install_bundle(bad, root=root)
    bundles = root / "var/lib/edgerunner/bundles"
    assert not bundles.exists() or list(bundles.iterdir()) == []
    assert not (root / "etc").exists()


def test_rollback_without_a_previous_version_says_so(rpi5_bundle: Path,
                                                      tmp_path: Path) -> None:
    root = tmp_path / "root"
    install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    with pytest.raises(InstallError, match="no previous bundle"):
        rollback(name_of(rpi5_bundle), root=root)


def test_enable_refuses_a_foreign_root(rpi5_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="--root"):
        install_bundle(rpi5_bundle, root=tmp_path / "root", enable=True)


def test_cli_install_json_and_rollback(rpi5_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    runner = CliRunner()
    result = runner.invoke(main, ["install", str(rpi5_bundle), "--root", str(root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["changed"] is True
    assert data["unit"] == unit_name(name_of(rpi5_bundle))
    assert data["commands"][-1] == f"systemctl restart {data['unit']}"

    text = runner.invoke(main, ["install", str(rpi5_bundle), "--root", str(root)])
    assert text.exit_code == 0
    assert "nothing changed" in text.output and "systemctl daemon-reload" in text.output

    missing = runner.invoke(main, ["install", "--rollback", name_of(rpi5_bundle),
                                   "--root", str(root)])
    assert missing.exit_code == 1 and "no previous bundle" in missing.output
    usage = runner.invoke(main, ["install", "--root", str(root)])
    assert usage.exit_code == 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_installed_unit_passes_systemd_analyze(rpi5_bundle: Path, tmp_path: Path) -> None:
    from edgerunner.bundle.unit import verify_unit

    root = tmp_path / "root"
    # verify insists the ExecStart binary exists: use this interpreter's module entry point.
    report = install_bundle(rpi5_bundle, root=root)
    assert verify_unit(root / "etc/systemd/system" / report.unit) == []
    assert os.access(root / "etc/systemd/system" / report.unit, os.R_OK)
