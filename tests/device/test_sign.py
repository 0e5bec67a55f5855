"""Signed bundles: keygen, pack --sign, and verify/install refusing unsigned, unknown-key and
altered bundles, each named."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.bundle.archive import extract_archive
from edgerunner.cli import main
from edgerunner.device.install import install_bundle
from edgerunner.device.sign import check_signature, generate_keypair, sign_bundle
from edgerunner.errors import BundleError, InstallError


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs: `a` is trusted by the keyring, `b` is not."""
    out = {}
    for name in ("a", "b"):
        private, public, _ = generate_keypair(tmp_path / "keys" / f"{name}.key")
        out[name], out[f"{name}.pub"] = private, public
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    shutil.copy(out["a.pub"], keyring / "a.pub")
    out["keyring"] = keyring
    return out


def signed_copy(bundle: Path, dest: Path, key: Path | None) -> Path:
    copy = dest / bundle.name
    shutil.copytree(bundle, copy)
    if key is not None:
        sign_bundle(copy, key)
    return copy


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", str(tmp_path / "k.key"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert Path(data["public_key"]).read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = CliRunner().invoke(main, ["keygen", str(tmp_path / "k.key")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_signed_bundle_is_trusted_and_its_signature_is_not_in_the_manifest(
        rpi5_bundle: Path, tmp_path: Path, keys: dict[str, Path]) -> None:
    bundle = signed_copy(rpi5_bundle, tmp_path, keys["a"])
    check = check_signature(bundle, keys["keyring"])
    assert check.trusted and check.key_id
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "manifest.sig" not in manifest["files"]
    result = CliRunner().invoke(main, ["verify", str(bundle), "--keyring", str(keys["keyring"])])
    assert result.exit_code == 0, result.output
    assert f"signed by trusted key {check.key_id}" in result.output


@pytest.mark.parametrize("case", ["unsigned", "unknown key", "altered manifest", "altered file"])
def test_verify_and_install_refuse_naming_why(case: str, rpi5_bundle: Path, tmp_path: Path,
                                              keys: dict[str, Path]) -> None:
    key = {"unsigned": None, "unknown key": keys["b"]}.get(case, keys["a"])
    bundle = signed_copy(rpi5_bundle, tmp_path, key)
    if case == "altered manifest":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["plan"]["n_ctx"] = 64
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if case == "altered file":
        with (bundle / "config.toml").open("a") as handle:
            handle.write("# changed after signing\n")
    expected = {"unsigned": "is unsigned", "unknown key": "which is not in the keyring",
                "altered manifest": "was altered after it was signed",
                "altered file": "config.toml is .* bytes, manifest says"}[case]

    result = CliRunner().invoke(main, ["verify", str(bundle), "--keyring", str(keys["keyring"])])
    assert result.exit_code == 1
    assert re.search(expected, result.output)

    root = tmp_path / "root"
    with pytest.raises(InstallError, match=expected):
        install_bundle(bundle, root=root, keyring=keys["keyring"], executable="/usr/bin/true")
    assert not (root / "var/lib/edgerunner/bundles" / bundle.name).exists()


def test_rotation_two_trusted_keys_and_an_empty_keyring(rpi5_bundle: Path, tmp_path: Path,
                                                        keys: dict[str, Path]) -> None:
    by_b = signed_copy(rpi5_bundle, tmp_path / "b", keys["b"])
    with pytest.raises(BundleError, match="not in the keyring"):
        check_signature(by_b, keys["keyring"])
    shutil.copy(keys["b.pub"], keys["keyring"] / "b.pub")  # the new key is rolled out
    assert check_signature(by_b, keys["keyring"]).trusted
    assert check_signature(signed_copy(rpi5_bundle, tmp_path / "a", keys["a"]),
                           keys["keyring"]).trusted
    empty = tmp_path / "empty"
    unsigned = check_signature(rpi5_bundle, empty)
    assert not unsigned.signed and "accepted" in unsigned.detail
    assert not check_signature(by_b, empty).trusted


def test_install_checks_the_devices_keyring_under_root(rpi5_bundle: Path, tmp_path: Path,
                                                       keys: dict[str, Path]) -> None:
    root = tmp_path / "root"
    shutil.copytree(keys["keyring"], root / "etc/edgerunner/keys")
    with pytest.raises(InstallError, match="is unsigned"):
        install_bundle(rpi5_bundle, root=root, executable="/usr/bin/true")
    signed = signed_copy(rpi5_bundle, tmp_path / "s", keys["a"])
    report = install_bundle(signed, root=root, executable="/usr/bin/true")
    assert (root / "var/lib/edgerunner/bundles" / report.name / "manifest.sig").is_file()


def test_pack_sign_archive_carries_the_signature(default_model: Path, tmp_path: Path,
                                                 keys: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "pack", str(default_model), "--profile", "rpi5", "-o", str(out), "--archive",
        "--sign", str(keys["a"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["archive"] and data["signed_by"]
    assert sorted(p.name for p in out.iterdir()) == [Path(data["path"]).name]  # no scratch left
    bundle = extract_archive(Path(data["path"]), tmp_path / "x")
    assert check_signature(bundle, keys["keyring"]).key_id == data["signed_by"]
    assert [s["name"] for s in json.loads((bundle / "manifest.json").read_text())["smoke"]] == [
        "greeting", "json-status"]
