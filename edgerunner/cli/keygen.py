"""`edgerunner keygen [PATH] [--mender]`: a key pair for signing bundles (or Mender artifacts)."""

from __future__ import annotations

from pathlib import Path

import click

from edgerunner.cli.output import console, json_option, print_json


@click.command("keygen")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mender", is_flag=True,
              help="An ECDSA P-256 key for `pack --mender-key` (mender-artifact signs with it) "
              "instead of an Ed25519 bundle key.")
@click.option("--force", is_flag=True, help="Replace an existing key at PATH.")
@json_option
def keygen_cmd(path: Path | None, mender: bool, force: bool, as_json: bool) -> None:
    """Write a private key (mode 0600) and its public key PATH.pub.

    PATH defaults to ./edgerunner-signing.key (./edgerunner-mender.key with --mender).
    Keep the private key on the packing machine; copy the .pub into each device's keyring
    (/etc/edgerunner/keys/, or Mender's ArtifactVerifyKey for --mender).
    """
    if mender:
        from edgerunner.device.mender.artifact import generate_mender_key

        path = path or Path("edgerunner-mender.key")
        private, public, kid = generate_mender_key(path, force=force)
        where = "/etc/mender/artifact-verify-key.pem (mender.conf's ArtifactVerifyKey)"
    else:
        from edgerunner.device.sign import KEYRING_DIR, generate_keypair

        path = path or Path("edgerunner-signing.key")
        private, public, kid = generate_keypair(path, force=force)
        where = f"{KEYRING_DIR}/ on each device"
    if as_json:
        print_json({"private_key": str(private), "public_key": str(public), "key_id": kid,
                    "kind": "mender-ecdsa-p256" if mender else "ed25519"})
        return
    out = console()
    out.print(f"private key {private} (mode 0600: keep it on the packing machine, never on a "
              "device)")
    out.print(f"public key  {public} (key id {kid}): copy it to {where}")
    if mender:
        out.print(f"sign artifacts with: edgerunner pack ... --mender DEVICE_TYPE --mender-key "
                  f"{private}")
    else:
        out.print(f"sign bundles with:   edgerunner pack ... --sign {private}")
