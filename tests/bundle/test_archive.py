"""Bundle archives: a round trip, and every kind of member that could escape extraction."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgerunner.bundle.archive import extract_archive, write_archive
from edgerunner.bundle.store import load_bundle, verify_bundle
from edgerunner.errors import ArchiveError, BundleError


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"payload"


def _entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


MALICIOUS: dict[str, tuple[Callable[[], list[tuple[tarfile.TarInfo, bytes | None]]], str, str]] = {
    "dotdot": (lambda: [_file("b/ok"), _file("b/../../evil")], "b/../../evil", "'..'"),
    "absolute": (lambda: [_file("/tmp/evil")], "/tmp/evil", "absolute path"),
    "symlink-out": (
        lambda: [_entry("b/link", tarfile.SYMTYPE, "../../../etc/passwd")], "b/link", "outside"
    ),
    "symlink-abs": (
        lambda: [_entry("b/link", tarfile.SYMTYPE, "/etc/passwd")], "b/link", "outside"
    ),
    "hardlink-out": (
        lambda: [_entry("b/hard", tarfile.LNKTYPE, "../etc/passwd")], "b/hard", "outside"
    ),
    "char-device": (lambda: [_entry("b/null", tarfile.CHRTYPE)], "b/null", "device file"),
    "block-device": (lambda: [_entry("b/sda", tarfile.BLKTYPE)], "b/sda", "device file"),
    "fifo": (lambda: [_entry("b/pipe", tarfile.FIFOTYPE)], "b/pipe", "FIFO"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_member_is_refused_by_name(case: str, tmp_path: Path) -> None:
    members, bad_name, reason = MALICIOUS[case]
    archive = _tar(tmp_path / "evil.tar", *members())
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError) as info:
        extract_archive(archive, dest)
    message = str(info.value)
    assert repr(bad_name) in message and reason in message
    assert list(dest.iterdir()) == []  # nothing extracted, not even the harmless members
    assert not (tmp_path / "evil").exists()


def test_symlink_inside_the_archive_is_allowed(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar", _file("b/real"),
                   _entry("b/sub/link", tarfile.SYMTYPE, "../real"))
    top = extract_archive(archive, tmp_path / "dest")
    assert (top / "sub" / "link").read_bytes() == b"payload"


def test_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match=r"junk\.tar is not a readable tar archive"):
        extract_archive(junk, tmp_path / "dest")


def test_two_top_level_entries_are_not_a_bundle(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "two.tar", _file("a/x"), _file("b/y"))
    with pytest.raises(ArchiveError, match="2 top-level entries"):
        extract_archive(archive, tmp_path / "dest")


def test_round_trip_verifies(rpi5_bundle: Path, tmp_path: Path) -> None:
    archive = write_archive(rpi5_bundle, tmp_path / f"{rpi5_bundle.name}.tar")
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]  # no partial file left
    with tarfile.open(archive) as tar:
        assert {m.uname for m in tar.getmembers()} == {""}
    top = extract_archive(archive, tmp_path / "dest")
    assert top.name == rpi5_bundle.name
    assert verify_bundle(top).ok


def test_archive_refuses_to_overwrite(rpi5_bundle: Path, tmp_path: Path) -> None:
    existing = tmp_path / "b.tar"
    existing.write_bytes(b"keep me")
    with pytest.raises(BundleError, match="already exists"):
        write_archive(rpi5_bundle, existing)
    assert existing.read_bytes() == b"keep me"


def test_load_bundle_accepts_a_tar(
    rpi5_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archive = write_archive(rpi5_bundle, tmp_path / "b.tar")
    bundle = load_bundle(archive)
    assert bundle.model_path.is_file()
    assert bundle.dir.is_relative_to(tmp_path / "cache")
    assert load_bundle(archive).dir == bundle.dir  # extracted once, then reused
