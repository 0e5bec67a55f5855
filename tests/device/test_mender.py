"""Fleet updates through Debian's mender-client 3.4 in standalone mode, with edgerunner's
update module and the real daemon: success, failed health check, failed commit, manual rollback,
unsigned artifact and unsigned bundle refused.

mender 3.4 reads its update modules from /usr/share/mender/modules/v3 and its artifact_info
from /etc/mender whatever its config says, so each call runs in a private mount namespace with
this test's directories bound there: the host's own files are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.client.http import Client
from edgerunner.device import update
from edgerunner.device.install import bundle_id
from edgerunner.device.mender.artifact import generate_mender_key
from edgerunner.device.mender.module import STATES_LOG, install_module
from edgerunner.device.release import finish
from edgerunner.device.service import DirectController
from edgerunner.device.sign import generate_keypair
from tests.device.test_update import variant

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mender") is None or shutil.which("mender-artifact") is None,
                       reason="mender-client / mender-artifact are not installed "
                       "(apt-get install mender-client mender-artifact)"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="mender runs in a private mount namespace: needs root and unshare"),
    pytest.mark.skipif(not Path("/usr/share/mender/modules/v3").is_dir()
                       or not Path("/etc/mender").is_dir(),
                       reason="mender-client's directories are missing"),
]

DEVICE_TYPE = "edgerunner-test-board"
WINDOW_S = 240.0
BIND = ('mount --bind "$1" /usr/share/mender/modules/v3 && mount --bind "$2" /etc/mender '
        '&& shift 2 && exec mender "$@"')


@dataclass
class Device:
    root: Path
    home: Path
    name: str
    controller: DirectController
    bundle_key: Path
    artifact_key: Path

    def mender(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run mender 3.4 standalone against this device's directories."""
        command = ["unshare", "-m", "sh", "-c", BIND, "sh",
                   str(self.root / "usr/share/mender/modules/v3"), str(self.home / "etc-mender"),
                   "--no-syslog", "--config", str(self.home / "mender.conf"),
                   "--fallback-config", str(self.home / "none.conf"),
                   "--data", str(self.home / "data"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    def states(self) -> list[str]:
        """Module states called since the last call to states()."""
        log = self.root / STATES_LOG.lstrip("/")
        lines = log.read_text().split("\n") if log.exists() else []
        log.unlink(missing_ok=True)
        return [line.split()[1] for line in lines if line.strip()]

    def answer(self) -> tuple[int, str]:
        with Client(self.controller.socket(self.name), timeout=120) as client:
            pid = client.health()["pid"]
            reply = client.chat([{"role": "user", "content": "Say hi."}], max_tokens=8)
        return pid, reply["choices"][0]["message"]["content"]


def artifact(device: Device, bundle: Path, out: Path, marker: str, *,
             smoke_tokens: int | None = None, sign_bundle: bool = True,
             sign_artifact: bool = True) -> tuple[Path, str]:
    """A new version of bundle as a .mender artifact: (path, bundle id)."""
    copy = variant(bundle, out, marker, smoke_tokens)
    manifest = BundleManifest.model_validate_json((copy / "manifest.json").read_text())
    release = finish(copy, manifest, out / marker,
                     sign=device.bundle_key if sign_bundle else None, archive=False,
                     mender_device_type=DEVICE_TYPE,
                     mender_key=device.artifact_key if sign_artifact else None)
    assert release.mender is not None
    return release.mender, bundle_id(copy)


@pytest.fixture
def device(short_tmp: Path, rpi5_bundle: Path, tmp_path: Path) -> Iterator[Device]:
    root, home = short_tmp / "root", tmp_path / "mender"
    bundle_key, bundle_pub, _ = generate_keypair(tmp_path / "keys/bundle.key")
    artifact_key, artifact_pub, _ = generate_mender_key(tmp_path / "keys/artifact.key")
    (root / "etc/edgerunner/keys").mkdir(parents=True)
    shutil.copy(bundle_pub, root / "etc/edgerunner/keys/release.pub")
    for sub in ("data", "etc-mender"):
        (home / sub).mkdir(parents=True)
    (home / "mender.conf").write_text(json.dumps({
        "ArtifactVerifyKey": str(artifact_pub),
        "DeviceTypeFile": str(home / "data/device_type")}))
    (home / "data/device_type").write_text(f"device_type={DEVICE_TYPE}\n")
    (home / "etc-mender/artifact_info").write_text("artifact_name=factory\n")
    install_module(root, service="direct", window_s=WINDOW_S, python=sys.executable)
    name = json.loads((rpi5_bundle / "manifest.json").read_text())["name"]
    controller = DirectController(root, f"{sys.executable} -m edgerunner")
    try:
        yield Device(root, home, name, controller, bundle_key, artifact_key)
    finally:
        controller.stop(name)


def test_mender_install_commit_rollback_and_refusals(device: Device, rpi5_bundle: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    seen: dict[str, list[str]] = {}

    # 1. success: install (health-gated in ArtifactInstall), then commit
    good, good_id = artifact(device, rpi5_bundle, out, "v1")
    done = device.mender("install", str(good))
    assert done.returncode == 0, done.stderr
    seen["install v1"] = device.states()
    assert seen["install v1"] == ["Download", "SupportsRollback", "ArtifactInstall",
                                  "NeedsArtifactReboot"]
    assert update.read_state(device.root).state == "proven"  # type: ignore[union-attr]
    done = device.mender("commit")
    assert done.returncode == 0, done.stderr
    seen["commit v1"] = device.states()
    assert seen["commit v1"] == ["ArtifactCommit", "Cleanup"]
    assert device.mender("show-artifact").stdout.strip() == f"{device.name}-{good_id}"
    assert device.answer()[1].strip()

    # 2. a bundle that loads but fails its smoke prompt: ArtifactInstall rolls back by itself
    broken, _ = artifact(device, rpi5_bundle, out, "v2", smoke_tokens=2)
    done = device.mender("install", str(broken))
    assert done.returncode != 0
    seen["install v2 (smoke fails)"] = device.states()
    assert seen["install v2 (smoke fails)"][:3] == ["Download", "SupportsRollback",
                                                    "ArtifactInstall"]
    assert "ArtifactRollback" in seen["install v2 (smoke fails)"]
    assert "smoke json-status failed" in done.stderr
    assert update.installed_id(device.root, device.name) == good_id
    assert device.answer()[1].strip()
    assert device.mender("show-artifact").stdout.strip() == f"{device.name}-{good_id}"

    # 3. the new bundle passes its gate but is dead by commit time: ArtifactCommit fails
    v3, v3_id = artifact(device, rpi5_bundle, out, "v3")
    assert device.mender("install", str(v3)).returncode == 0
    seen["install v3"] = device.states()
    assert update.installed_id(device.root, device.name) == v3_id
    os.kill(device.answer()[0], signal.SIGKILL)
    done = device.mender("commit")
    assert done.returncode != 0
    seen["commit v3 (daemon died)"] = device.states()
    assert seen["commit v3 (daemon died)"][0] == "ArtifactCommit"
    assert "ArtifactRollback" in seen["commit v3 (daemon died)"]
    assert update.installed_id(device.root, device.name) == good_id
    assert device.answer()[1].strip()

    # 4. manual rollback of an installed, uncommitted update
    v4, v4_id = artifact(device, rpi5_bundle, out, "v4")
    assert device.mender("install", str(v4)).returncode == 0
    seen["install v4"] = device.states()
    assert update.installed_id(device.root, device.name) == v4_id
    done = device.mender("rollback")
    assert done.returncode == 0, done.stderr
    seen["rollback v4"] = device.states()
    assert "ArtifactRollback" in seen["rollback v4"]
    assert update.installed_id(device.root, device.name) == good_id
    assert device.answer()[1].strip()

    # 5. unsigned artifact: mender refuses it before any module state; unsigned bundle inside a
    #    signed artifact: the module refuses it before anything switches
    unsigned, _ = artifact(device, rpi5_bundle, out, "v5", sign_artifact=False)
    done = device.mender("install", str(unsigned))
    assert done.returncode != 0
    seen["install v5 (unsigned artifact)"] = device.states()
    assert "ArtifactInstall" not in seen["install v5 (unsigned artifact)"]
    assert "signature" in done.stderr.lower()
    pid = device.answer()[0]
    bare, _ = artifact(device, rpi5_bundle, out, "v6", sign_bundle=False)
    done = device.mender("install", str(bare))
    assert done.returncode != 0
    seen["install v6 (unsigned bundle)"] = device.states()
    assert "is unsigned" in done.stderr
    assert update.installed_id(device.root, device.name) == good_id
    assert device.answer()[0] == pid  # never restarted
    print("mender module states:", json.dumps(seen, indent=1))
