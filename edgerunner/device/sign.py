"""Signed bundles: Ed25519 over manifest.json, checked against the device's keyring.

manifest.json holds the sha256 of every other file of the bundle, so one signature over its
exact bytes covers the whole bundle. The signature lives beside it in manifest.sig (JSON: the
algorithm, the signing key's id, the signature in base64), which the manifest does not list.

A device trusts the public keys (``*.pub``, PEM) in its keyring directory, by default
/etc/edgerunner/keys/; several may be there at once, so a new key can be rolled out before
bundles signed with it arrive. Once the keyring holds any key, unsigned bundles are refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from edgerunner._fs import atomic_write_text
from edgerunner.bundle.manifest import SIGNATURE_FILE
from edgerunner.errors import BundleError

KEYRING_DIR = "/etc/edgerunner/keys"
KEYRING_ENV = "EDGERUNNER_KEYRING"
ALGORITHM = "ed25519"
MANIFEST = "manifest.json"


class Signature(BaseModel):
    """manifest.sig."""

    model_config = ConfigDict(extra="forbid")

    algorithm: str = Field(ALGORITHM, description="Signature algorithm (ed25519)")
    key_id: str = Field(..., pattern=r"^[0-9a-f]{16}$", description="Signing key's id")
    signature: str = Field(..., description="Base64 signature over manifest.json's bytes")


class SignatureCheck(BaseModel):
    """What the signature check found (refusals raise instead)."""

    model_config = ConfigDict(extra="forbid")

    signed: bool = Field(..., description="The bundle carries manifest.sig")
    key_id: str | None = Field(None, description="Key that signed it")
    trusted: bool = Field(False, description="Signed by a key in the keyring and intact")
    keyring: str = Field(..., description="Keyring directory consulted")
    detail: str = Field("", description="One line for people")


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def default_keyring(root: Path = Path("/")) -> Path:
    """$EDGERUNNER_KEYRING, else /etc/edgerunner/keys under root."""
    override = os.environ.get(KEYRING_ENV)
    if override:
        return Path(override)
    return Path(root) / KEYRING_DIR.lstrip("/")


def generate_keypair(private_path: Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key (PEM, mode 0600) and its public key beside it (.pub).

    Returns (private path, public path, key id).
    """
    public_path = refuse_overwrite(private_path, force)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    write_key_pair(private_path, public_path, private_pem, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(key.public_key())


def refuse_overwrite(private_path: Path, force: bool) -> Path:
    """The .pub path beside a private key path; an existing key is kept unless force."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise BundleError(f"{path} already exists; refusing to overwrite a key",
                              hint="pick another path, or pass --force to replace it")
    return public_path


def write_key_pair(private_path: Path, public_path: Path, private_pem: bytes,
                   public_pem: bytes) -> None:
    """Write a key pair atomically: the private key 0600, the public key 0644."""
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(private_path, private_pem.decode(),
                          before_rename=lambda tmp: os.chmod(tmp, 0o600))
        atomic_write_text(public_path, public_pem.decode(),
                          before_rename=lambda tmp: os.chmod(tmp, 0o644))
    except OSError as exc:
        raise BundleError(f"cannot write the key pair at {private_path}: {exc.strerror or exc}",
                          hint="check the directory exists and is writable") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file written by `edgerunner keygen`."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"cannot read the signing key {path}: {exc.strerror or exc}",
                          hint="create one with `edgerunner keygen`") from exc
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not an unencrypted PEM private key: {exc}",
                          hint="create one with `edgerunner keygen`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is a {type(key).__name__}, not an Ed25519 key",
                          hint="create one with `edgerunner keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a .pub PEM file."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read the public key {path}: {exc}",
                          hint="keyring files are the .pub files `edgerunner keygen` "
                          "writes") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} is not an Ed25519 public key",
                          hint="keyring files are the .pub files `edgerunner keygen` writes")
    return key


def load_keyring(directory: Path) -> dict[str, tuple[Path, Ed25519PublicKey]]:
    """Trusted keys by id: every *.pub in directory (missing directory = no keys)."""
    keys: dict[str, tuple[Path, Ed25519PublicKey]] = {}
    if not directory.is_dir():
        return keys
    for path in sorted(directory.glob("*.pub")):
        public = load_public_key(path)
        keys[key_id(public)] = (path, public)
    return keys


def sign_bundle(bundle: Path, private_key: Path) -> Signature:
    """Sign bundle/manifest.json with the key; write bundle/manifest.sig atomically."""
    key = load_private_key(private_key)
    manifest = bundle / MANIFEST
    try:
        data = manifest.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {manifest}: {exc.strerror or exc}",
                          hint="pass the directory `edgerunner pack` wrote") from exc
    signature = Signature(key_id=key_id(key.public_key()),
                          signature=base64.b64encode(key.sign(data)).decode())
    try:
        atomic_write_text(bundle / SIGNATURE_FILE, signature.model_dump_json(indent=2) + "\n",
                          before_rename=lambda tmp: os.chmod(tmp, 0o644))
    except OSError as exc:
        raise BundleError(f"cannot write {bundle / SIGNATURE_FILE}: {exc.strerror or exc}") from exc
    return signature


def read_signature(bundle: Path) -> Signature | None:
    """manifest.sig, None when the bundle has none; BundleError when it is unreadable."""
    path = bundle / SIGNATURE_FILE
    if not path.exists():
        return None
    try:
        return Signature.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {bundle}: {SIGNATURE_FILE} is damaged ({exc})",
                          hint="copy the bundle again from the machine that packed it") from exc


def check_signature(bundle: Path, keyring: Path, shown: Path | None = None) -> SignatureCheck:
    """Check the bundle's signature against the keyring; BundleError naming what is wrong.

    Refused: unsigned while the keyring holds keys; signed by a key not in the keyring;
    manifest.json altered after signing. With an empty keyring a signature is reported, not
    required (and it cannot be checked). Messages name `shown` (what the user passed) if given.
    """
    signature = read_signature(bundle)
    name = shown or bundle
    keys = load_keyring(keyring)
    trusted = ", ".join(f"{kid} ({path.name})" for kid, (path, _) in keys.items())
    if signature is None:
        if keys:
            raise BundleError(
                f"bundle {name} is unsigned, and this device only accepts bundles signed by "
                f"a key in {keyring} ({trusted})",
                hint="pack it with `edgerunner pack --sign KEY` using one of those keys")
        return SignatureCheck(signed=False, keyring=str(keyring),
                              detail=f"unsigned (accepted: no keys in {keyring})")
    if signature.algorithm != ALGORITHM:
        raise BundleError(f"bundle {name} is signed with {signature.algorithm!r}; "
                          f"edgerunner checks {ALGORITHM}", hint="re-pack with --sign")
    if not keys:
        return SignatureCheck(signed=True, key_id=signature.key_id, keyring=str(keyring),
                              detail=f"signed by key {signature.key_id} (not checked: no keys "
                              f"in {keyring})")
    if signature.key_id not in keys:
        raise BundleError(
            f"bundle {name} is signed by key {signature.key_id}, which is not in the "
            f"keyring {keyring} (trusted: {trusted})",
            hint=f"if you trust that key, copy its .pub into {keyring}; otherwise re-pack "
            "with a trusted key")
    path, public = keys[signature.key_id]
    try:
        raw = base64.b64decode(signature.signature, validate=True)
        public.verify(raw, (bundle / MANIFEST).read_bytes())
    except (InvalidSignature, binascii.Error, OSError) as exc:
        raise BundleError(
            f"bundle {name}: {MANIFEST} does not match its signature by key "
            f"{signature.key_id} ({path.name}): the bundle was altered after it was signed",
            hint="do not install it; copy the bundle again from the machine that packed "
            "and signed it") from exc
    return SignatureCheck(signed=True, key_id=signature.key_id, trusted=True,
                          keyring=str(keyring),
                          detail=f"signed by trusted key {signature.key_id} ({path.name})")
