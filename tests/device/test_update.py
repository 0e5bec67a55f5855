"""Health-gated A/B updates against the real daemon, driven directly (no systemd here):
a good bundle commits, one that loads but fails its smoke prompt rolls back while the old one
answers, an unsigned one is refused before anything switches, an interrupted one is recovered."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.cli import main
from edgerunner.client.http import Client
from edgerunner.device import update
from edgerunner.device.install import bundle_id
from edgerunner.device.service import DirectController
from edgerunner.device.sign import generate_keypair, sign_bundle
from edgerunner.errors import InstallError

EXECUTABLE = f"{sys.executable} -m edgerunner"
WINDOW_S = 240.0


def variant(bundle: Path, dest: Path, marker: str, smoke_tokens: int | None = None) -> Path:
    """A copy of bundle, same name, another manifest: a new version (smoke_tokens: the JSON
    smoke prompt may use only that many tokens, too few for the JSON it must write)."""
    copy = dest / marker / bundle.name
    shutil.copytree(bundle, copy)
    manifest = BundleManifest.model_validate_json((copy / "manifest.json").read_text())
    manifest.created = f"{manifest.created} {marker}"
    if smoke_tokens is not None:
        manifest.smoke[-1].max_tokens = smoke_tokens
    (copy / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return copy


def answer(controller: DirectController, name: str) -> tuple[int, str]:
    with Client(controller.socket(name), timeout=120) as client:
        pid = client.health()["pid"]
        reply = client.chat([{"role": "user", "content": "Say hi."}], max_tokens=8)
    return pid, reply["choices"][0]["message"]["content"]


@pytest.fixture
def device(short_tmp: Path, rpi5_bundle: Path) -> Iterator[tuple[Path, DirectController, str]]:
    root = short_tmp / "root"
    controller = DirectController(root, EXECUTABLE)
    name = json.loads((rpi5_bundle / "manifest.json").read_text())["name"]
    try:
        yield root, controller, name
    finally:
        controller.stop(name)


@pytest.mark.slow
def test_good_update_commits_and_a_smoke_failure_rolls_back(
        device: tuple[Path, DirectController, str], rpi5_bundle: Path, tmp_path: Path) -> None:
    root, controller, name = device
    first, _ = update.update(rpi5_bundle, root, controller, start=True, window_s=WINDOW_S,
                             executable=EXECUTABLE)
    assert first.sequence == ["staged", "switched", "restarted", "proven", "committed"]
    assert first.previous_id is None and not first.was_running
    pid1, text = answer(controller, name)
    assert text.strip()

    good = variant(rpi5_bundle, tmp_path, "v2")
    second, _ = update.update(good, root, controller, window_s=WINDOW_S, executable=EXECUTABLE)
    assert second.sequence == ["staged", "switched", "restarted", "proven", "committed"]
    assert second.was_running and second.previous_id == first.bundle_id
    pid2, _ = answer(controller, name)
    assert pid2 != pid1
    assert update.installed_id(root, name) == bundle_id(good)

    broken = variant(rpi5_bundle, tmp_path, "v3", smoke_tokens=2)
    with pytest.raises(update.UpdateFailed, match="smoke json-status failed") as failed:
        update.update(broken, root, controller, window_s=WINDOW_S, executable=EXECUTABLE)
    state = failed.value.state
    assert state.sequence == ["staged", "switched", "restarted", "rolling-back", "rolled-back"]
    assert "not JSON" in state.error or "schema" in state.error
    assert update.installed_id(root, name) == bundle_id(good)  # v2 is active again
    pid3, text = answer(controller, name)
    assert pid3 not in (pid1, pid2) and text.strip()
    status = CliRunner().invoke(main, ["install", "--status", "--root", str(root), "--json"])
    assert json.loads(status.output)["update"]["state"] == "rolled-back"


@pytest.mark.slow
def test_unsigned_refused_before_anything_switches_and_interruption_recovers(
        device: tuple[Path, DirectController, str], rpi5_bundle: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root, controller, name = device
    private, public, _ = generate_keypair(tmp_path / "k.key")
    signed = variant(rpi5_bundle, tmp_path, "signed")
    sign_bundle(signed, private)
    (root / "etc/edgerunner/keys").mkdir(parents=True)
    shutil.copy(public, root / "etc/edgerunner/keys/release.pub")
    update.update(signed, root, controller, start=True, window_s=WINDOW_S,
                  executable=EXECUTABLE)
    pid, _ = answer(controller, name)
    journal = update.read_state(root)

    unsigned = variant(rpi5_bundle, tmp_path, "unsigned")
    result = CliRunner().invoke(main, ["install", str(unsigned), "--root", str(root),
                                       "--service", "direct"])
    assert result.exit_code == 1 and "is unsigned" in result.output
    assert update.read_state(root) == journal  # nothing was even staged
    assert answer(controller, name)[0] == pid
    assert update.installed_id(root, name) == bundle_id(signed)

    # A crash right after the switch: the journal says `switched`, the new bundle is in place.
    newer = variant(rpi5_bundle, tmp_path, "newer")
    sign_bundle(newer, private)

    def crash(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(controller, "restart", crash)
    with pytest.raises(KeyboardInterrupt):
        update.update(newer, root, controller, window_s=WINDOW_S, executable=EXECUTABLE)
    monkeypatch.undo()
    crashed = update.read_state(root)
    assert crashed is not None and crashed.state == "switched"
    assert update.installed_id(root, name) == bundle_id(newer)
    with update.update_lock(root), pytest.raises(InstallError,
                                                 match="another update is running"):
        update.recover(root, controller)
    recovered = update.recover(root, controller, executable=EXECUTABLE, window_s=WINDOW_S)
    assert recovered is not None
    assert recovered.sequence[-3:] == ["switched", "rolling-back", "rolled-back"]
    assert update.installed_id(root, name) == bundle_id(signed)
    assert answer(controller, name)[1].strip()
