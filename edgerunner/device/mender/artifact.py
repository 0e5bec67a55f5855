"""`pack --mender DEVICE_TYPE`: a signed Mender module-image artifact carrying a bundle .tar.

The artifact's payload type is ``edgerunner-bundle``, the name of the update module
`edgerunner install --mender-module` puts on the device. mender-artifact (Debian's
`mender-artifact` package) writes it; 3.9 signs with RSA or ECDSA keys in SEC1/PKCS#1 PEM, not
PKCS#8 and not Ed25519, so artifacts get their own key (`edgerunner keygen --mender`) beside the
bundle's Ed25519 signature, which the update module checks against the device keyring.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.device.sign import refuse_overwrite, write_key_pair
from edgerunner.errors import BundleError

PAYLOAD_TYPE = "edgerunner-bundle"
TOOL = "mender-artifact"


def generate_mender_key(private_path: Path, force: bool = False) -> tuple[Path, Path, str]:
    """An ECDSA P-256 key in SEC1 PEM (mender-artifact 3.9's format) and its public PEM."""
    public_path = refuse_overwrite(private_path, force)
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    write_key_pair(private_path, public_path, private_pem, public_pem)
    return private_path, public_path, hashlib.sha256(public_pem).hexdigest()[:16]


def artifact_name(manifest: BundleManifest, bundle_id: str) -> str:
    """<bundle name>-<bundle id>, the id `install --status` shows (sha256 of manifest.json)."""
    return f"{manifest.name}-{bundle_id}"


def write_artifact(bundle_tar: Path, manifest: BundleManifest, bundle_id: str,
                   device_type: str, dest: Path, key: Path | None) -> Path:
    """Run mender-artifact to wrap bundle_tar into dest (.mender), signed with key if given."""
    tool = shutil.which(TOOL)
    if tool is None:
        raise BundleError(f"{TOOL} is not installed, so no .mender artifact can be written",
                          hint="apt-get install mender-artifact (Debian 12 ships 3.9)")
    if dest.exists():
        raise BundleError(f"{dest} already exists", hint="remove it or pass a different -o")
    name = artifact_name(manifest, bundle_id)
    command = [
        tool, "write", "module-image", "-T", PAYLOAD_TYPE, "-n", name, "-t", device_type,
        "--software-filesystem", PAYLOAD_TYPE, "--software-name", manifest.name,
        "--software-version", name, "-f", str(bundle_tar), "-o", str(dest),
    ]
    if key is not None:
        command += ["-k", str(key)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        dest.unlink(missing_ok=True)
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise BundleError(f"{TOOL} failed (exit {done.returncode}): "
                          f"{detail[-1] if detail else 'no output'}",
                          hint="mender-artifact 3.9 wants an ECDSA P-256 or RSA key in "
                          "SEC1/PKCS#1 PEM: make one with `edgerunner keygen --mender`")
    return dest
