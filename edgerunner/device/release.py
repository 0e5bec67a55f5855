"""What `pack --sign/--mender` adds after the packer wrote a bundle directory.

The signature goes into the bundle directory, so a signed archive is written from the signed
directory (the packer's own --archive would have archived it unsigned).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgerunner.bundle.manifest import BundleManifest


@dataclass
class Release:
    """Where the signed bundle (and its artifact) went."""

    path: Path
    key_id: str | None = None
    mender: Path | None = None


def staging_dir(output: Path) -> Path:
    """A scratch directory on the output's filesystem for the unsigned directory."""
    output.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".edgerunner-sign-", dir=output))


def finish(bundle: Path, manifest: BundleManifest, output: Path, *, sign: Path | None,
           archive: bool, mender_device_type: str | None,
           mender_key: Path | None) -> Release:
    """Sign bundle (a directory), then archive it into output and/or wrap it for Mender."""
    from edgerunner.bundle.archive import write_archive

    release = Release(path=bundle)
    if sign is not None:
        from edgerunner.device.sign import sign_bundle

        release.key_id = sign_bundle(bundle, sign).key_id
    if archive:
        release.path = write_archive(bundle, output / f"{bundle.name}.tar", arcname=bundle.name)
    if mender_device_type is not None:
        from edgerunner.device.install import bundle_id
        from edgerunner.device.mender.artifact import write_artifact

        dest = output / f"{bundle.name}.mender"
        content = bundle_id(bundle)
        if archive:
            release.mender = write_artifact(release.path, manifest, content,
                                            mender_device_type, dest, mender_key)
        else:
            with tempfile.TemporaryDirectory(prefix=".edgerunner-mender-", dir=output) as tmp:
                tar = write_archive(bundle, Path(tmp) / f"{bundle.name}.tar",
                                    arcname=bundle.name)
                release.mender = write_artifact(tar, manifest, content, mender_device_type,
                                                dest, mender_key)
    return release


def discard(path: Path) -> None:
    """Remove a scratch directory."""
    shutil.rmtree(path, ignore_errors=True)
