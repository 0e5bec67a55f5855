"""Extraction on a Python without PEP 706's tarfile filters (Debian 12's python3 is 3.11.2):
check_members alone still refuses every unsafe member, and a bundle still round-trips."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from edgerunner.bundle import archive
from edgerunner.bundle.store import verify_bundle
from edgerunner.errors import ArchiveError
from tests.bundle.test_archive import MALICIOUS, _tar


@pytest.fixture
def no_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "_DATA_FILTER", False)
    monkeypatch.setattr(archive, "_FILTER_ERRORS", ())
    real = tarfile.TarFile.extractall

    def without_filter(self: tarfile.TarFile, *args: object, **kwargs: object) -> None:
        assert "filter" not in kwargs, "Python 3.11.2 has no filter argument"
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "extractall", without_filter)


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_unsafe_members_refused_without_filters(case: str, tmp_path: Path,
                                                no_filters: None) -> None:
    members, _name, reason = MALICIOUS[case]
    bad = _tar(tmp_path / "evil.tar", *members())
    with pytest.raises(ArchiveError, match=reason):
        archive.extract_archive(bad, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_round_trip_without_filters(rpi5_bundle: Path, tmp_path: Path,
                                    no_filters: None) -> None:
    tar = archive.write_archive(rpi5_bundle, tmp_path / "b.tar", arcname=rpi5_bundle.name)
    assert verify_bundle(archive.extract_archive(tar, tmp_path / "dest")).ok
