"""A restart does not hash an unchanged model again; a changed one is hashed and refused.

Whether the model was hashed is read at the OS boundary: /proc/self/io's rchar counts the bytes
this process read through read(2), so hashing the model shows up as at least its size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edgerunner.bundle.stamp import read_stamp, stamp_path
from edgerunner.bundle.store import MODEL_FILE, load_bundle, verify_bundle
from edgerunner.errors import BundleError


def bytes_read() -> int:
    with open("/proc/self/io", encoding="ascii") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


def read_during(call, *args):  # type: ignore[no-untyped-def]
    before = bytes_read()
    result = call(*args)
    return result, bytes_read() - before


@pytest.fixture
def bundle(rpi5_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the packed bundle (tests alter it) and a state directory of its own."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    copy = tmp_path / rpi5_bundle.name
    shutil.copytree(rpi5_bundle, copy)
    return copy


def model_size(bundle: Path) -> int:
    return (bundle / MODEL_FILE).stat().st_size


def test_restart_does_not_hash_an_unchanged_model(bundle: Path, tmp_path: Path) -> None:
    size = model_size(bundle)
    _, first = read_during(load_bundle, bundle)
    assert first >= size  # no stamp yet: a full check
    assert stamp_path(bundle).parent == tmp_path / "state" / "stamps"
    assert read_stamp(bundle) is not None
    loaded, again = read_during(load_bundle, bundle)
    assert again < size // 10
    assert loaded.manifest.files[MODEL_FILE].sha256 == read_stamp(bundle).model_sha256  # type: ignore[union-attr]


def test_verify_still_hashes_everything(bundle: Path) -> None:
    load_bundle(bundle)
    report, read = read_during(verify_bundle, bundle)
    assert report.ok
    assert read >= model_size(bundle)


def test_a_changed_model_is_hashed_and_refused(bundle: Path) -> None:
    load_bundle(bundle)
    model = bundle / MODEL_FILE
    before = model.stat()
    with model.open("r+b") as handle:  # same size, one byte flipped, the old mtime put back
        handle.seek(before.st_size // 2)
        byte = handle.read(1)
        handle.seek(before.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(BundleError, match=r"sha256 model\.gguf"):
        read_during(load_bundle, bundle)
    assert read_stamp(bundle) is None
    before_retry = bytes_read()
    with pytest.raises(BundleError, match=r"sha256 model\.gguf"):
        load_bundle(bundle)
    assert bytes_read() - before_retry >= model.stat().st_size


def test_a_replaced_manifest_means_a_full_check(bundle: Path) -> None:
    load_bundle(bundle)
    manifest = bundle / "manifest.json"
    text = manifest.read_text()
    manifest.unlink()
    manifest.write_text(text)  # same bytes, another inode
    _, read = read_during(load_bundle, bundle)
    assert read >= model_size(bundle)


def test_unwritable_state_directory_hashes_every_start(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("STATE_DIRECTORY", str(blocker / "state"))
    load_bundle(bundle)
    assert "cannot keep a verification stamp" in caplog.text
    _, read = read_during(load_bundle, bundle)
    assert read >= model_size(bundle)


def test_an_unreadable_stamp_is_ignored(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_bundle(bundle)
    stamp_path(bundle).write_text("{not json")
    _, read = read_during(load_bundle, bundle)
    assert read >= model_size(bundle)
    assert "ignoring the stamp" in caplog.text
    assert read_stamp(bundle) is not None  # the full check wrote a good one
