"""Bundles: what pack writes, what verify catches, and that a write is all-or-nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgerunner._fs import sha256_file
from edgerunner.bundle import store as bundle_module
from edgerunner.bundle.store import (
    MANIFEST,
    load_bundle,
    read_manifest,
    rename_noreplace,
    stage_bundle,
    verify_bundle,
)
from edgerunner.errors import BundleError
from edgerunner.pack.default_model import DEFAULT_MODEL_SHA256


@pytest.fixture
def bundle_copy(rpi5_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle that a test may damage."""
    return Path(shutil.copytree(rpi5_bundle, tmp_path / rpi5_bundle.name))


def _edit_manifest(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_packed_bundle_has_every_file_hashed(rpi5_bundle: Path) -> None:
    manifest = read_manifest(rpi5_bundle)
    assert set(manifest.files) == {"model.gguf", "config.toml", "edgerunner.service"}
    for name, entry in manifest.files.items():
        assert entry.size == (rpi5_bundle / name).stat().st_size
        assert entry.sha256 == sha256_file(rpi5_bundle / name)
    assert manifest.name == rpi5_bundle.name
    assert manifest.name.startswith("SmolLM2-135M-Instruct-rpi5-8gb-")
    assert manifest.source.sha256 == DEFAULT_MODEL_SHA256
    assert manifest.source.architecture == "llama"
    assert manifest.source.file_type == "Q4_1"
    assert manifest.profile.name == "rpi5-8gb"
    assert manifest.llama_cpp_python_version == "0.3.36"
    assert manifest.prediction.memory.total_mb > manifest.prediction.memory.weights_mb > 0
    assert manifest.name.endswith(manifest.plan.quant)


def test_pack_leaves_only_the_bundle(rpi5_bundle: Path) -> None:
    assert [p.name for p in rpi5_bundle.parent.iterdir()] == [rpi5_bundle.name]
    assert oct(rpi5_bundle.stat().st_mode & 0o777) == oct(0o755)


def test_packed_bundle_verifies(rpi5_bundle: Path) -> None:
    report = verify_bundle(rpi5_bundle)
    assert report.ok, report.problems
    names = [c.name for c in report.checks]
    assert "sha256 model.gguf" in names and "llama-cpp-python version" in names


def test_load_bundle_gives_the_daemon_its_paths(rpi5_bundle: Path) -> None:
    bundle = load_bundle(rpi5_bundle)
    assert bundle.model_path == rpi5_bundle / "model.gguf"
    assert bundle.config_path.read_text().startswith("# edgerunner daemon settings")
    assert "[Service]" in bundle.unit_path.read_text()
    assert bundle.manifest.plan.n_ctx >= 16


def test_one_flipped_byte_is_caught_and_named(bundle_copy: Path) -> None:
    model = bundle_copy / "model.gguf"
    with model.open("r+b") as handle:
        handle.seek(model.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    report = verify_bundle(bundle_copy)
    assert not report.ok
    assert [c.name for c in report.problems] == ["sha256 model.gguf"]
    with pytest.raises(BundleError, match=r"sha256 model\.gguf: model\.gguf has sha256") as info:
        load_bundle(bundle_copy)
    assert "re-pack" in str(info.value)


def test_truncated_file_is_caught_by_size(bundle_copy: Path) -> None:
    with (bundle_copy / "config.toml").open("r+b") as handle:
        handle.truncate(10)
    problems = verify_bundle(bundle_copy).problems
    assert [c.name for c in problems] == ["size config.toml"]
    assert "truncated or altered" in problems[0].detail


def test_missing_and_unlisted_files(bundle_copy: Path) -> None:
    (bundle_copy / "edgerunner.service").unlink()
    (bundle_copy / "extra.bin").write_bytes(b"x")
    problems = {c.name: c.detail for c in verify_bundle(bundle_copy).problems}
    assert "is missing" in problems["file edgerunner.service"]
    assert "extra.bin not in the manifest" in problems["unlisted files"]


def test_manifest_path_escape_is_refused(bundle_copy: Path) -> None:
    data = json.loads((bundle_copy / MANIFEST).read_text())
    data["files"]["../outside"] = data["files"]["config.toml"]
    (bundle_copy / MANIFEST).write_text(json.dumps(data))
    problems = {c.name: c.detail for c in verify_bundle(bundle_copy).problems}
    assert "outside the bundle" in problems["file ../outside"]


def test_unknown_schema_version(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, schema_version=99)
    with pytest.raises(BundleError, match=r"manifest\.json has schema_version 99") as info:
        load_bundle(bundle_copy)
    assert "re-pack" in str(info.value)


def test_manifest_that_is_not_json(bundle_copy: Path) -> None:
    (bundle_copy / MANIFEST).write_text("{not json")
    report = verify_bundle(bundle_copy)
    assert [c.name for c in report.problems] == ["manifest.json"]
    assert "not readable JSON" in report.problems[0].detail


def test_manifest_with_unknown_field(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, surprise=1)
    with pytest.raises(BundleError, match="surprise: Extra inputs are not permitted"):
        read_manifest(bundle_copy)


def test_other_runtime_version_is_refused_with_what_to_do(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, llama_cpp_python_version="0.2.0")
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert "packed for 0.2.0, running 0.3.36" in message
    assert "install llama-cpp-python==0.2.0 or re-pack" in message


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path)


def _fake_root(root: Path, available_mb: int, limit: str, current: int) -> Path:
    """A fake / with /proc/meminfo, /proc/self/cgroup and one cgroup v2 directory."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemAvailable:   {available_mb * 1024} kB\n")
    (root / "proc/self/cgroup").write_text("0::/edgerunner.service\n")
    group = root / "sys/fs/cgroup/edgerunner.service"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(f"{limit}\n")
    (group / "memory.current").write_text(f"{current}\n")
    return root


def test_here_refuses_when_the_cgroup_limit_is_too_small(rpi5_bundle: Path, tmp_path: Path) -> None:
    root = _fake_root(tmp_path, 8000, str(64 * 2**20), 32 * 2**20)
    report = verify_bundle(rpi5_bundle, here=True, root=root)
    problems = {c.name: c.detail for c in report.problems}
    assert set(problems) == {"memory here"}
    assert "cgroup" in problems["memory here"] and "allows 32 MiB now" in problems["memory here"]
    assert "--max-ctx" in problems["memory here"]


def test_here_refuses_when_mem_available_is_too_small(rpi5_bundle: Path, tmp_path: Path) -> None:
    report = verify_bundle(rpi5_bundle, here=True, root=_fake_root(tmp_path, 20, "max", 0))
    problems = {c.name: c.detail for c in report.problems}
    assert "MemAvailable allows 20 MiB now" in problems["memory here"]


def test_here_passes_with_room(rpi5_bundle: Path, tmp_path: Path) -> None:
    report = verify_bundle(rpi5_bundle, here=True, root=_fake_root(tmp_path, 8000, "max", 0))
    check = next(c for c in report.checks if c.name == "memory here")
    assert check.ok and "MemAvailable allows 8000 MiB now" in check.detail


def test_stage_is_removed_when_the_build_fails(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    with pytest.raises(RuntimeError), stage_bundle(dest) as stage:
        stage.write_text("config.toml", "x = 1\n")
        assert stage.path.name.startswith(".b.partial-")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_a_destination_that_appeared_meanwhile(
    rpi5_bundle: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(rpi5_bundle)
    dest = tmp_path / "b"
    with pytest.raises(BundleError, match="already exists"), stage_bundle(dest) as stage:
        stage.write_text("config.toml", "x = 1\n")
        dest.mkdir()
        (dest / "someone-elses").write_text("keep")
        stage.commit(manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert [p.name for p in dest.iterdir()] == ["someone-elses"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "no-renameat2"])
def test_commit_never_replaces_an_empty_directory_that_appeared_meanwhile(
    rpi5_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool
) -> None:
    if not renameat2:  # a C library without renameat2: the checked rename must hold too
        monkeypatch.setattr(bundle_module, "_libc_renameat2", lambda: None)
    elif bundle_module._libc_renameat2() is None:
        pytest.skip("this C library has no renameat2")
    manifest = read_manifest(rpi5_bundle)
    dest = tmp_path / "b"
    with stage_bundle(dest) as stage:
        stage.write_text("config.toml", "x = 1\n")
        dest.mkdir()  # plain os.rename would swap the stage in for this empty directory
        with pytest.raises(BundleError, match=f"output directory {dest} already exists"):
            stage.commit(manifest)
        assert dest.is_dir() and list(dest.iterdir()) == []
        assert sorted(p.name for p in stage.path.iterdir()) == ["config.toml", MANIFEST]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_rename_noreplace_moves_onto_a_free_name(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("x")
    rename_noreplace(src, dst)
    assert not src.exists() and (dst / "f").read_text() == "x"
    other = tmp_path / "other"
    other.write_text("y")
    with pytest.raises(FileExistsError):
        rename_noreplace(dst, other)
    assert other.read_text() == "y" and (dst / "f").is_file()


def test_existing_destination_is_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="pass a different -o"), stage_bundle(tmp_path / "b"):
        pass
