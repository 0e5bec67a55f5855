"""Every bad input to pack/verify: a message naming the thing and the fix, exit code 1, and
nothing half-written in the output directory."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner, Result

from edgerunner.bundle.store import stage_bundle
from edgerunner.cli import main
from edgerunner.errors import BundleError
from edgerunner.pack.quantize import quantize


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_failed(result: Result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def assert_empty(out: Path) -> None:
    """Nothing was written: the directory is absent or empty (no partial stage either)."""
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_missing_model_file(out: Path) -> None:
    result = run("pack", "/no/such/model.gguf", "--profile", "rpi5", "-o", str(out))
    assert_failed(result, "/no/such/model.gguf does not exist", "hint: check the path")
    assert_empty(out)


def test_not_a_gguf(tmp_path: Path, out: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("this is a README, not weights\n")
    result = run("pack", str(fake), "--profile", "rpi5", "-o", str(out))
    assert_failed(result, "is not a GGUF file", "convert the model")
    assert_empty(out)


def test_truncated_gguf(default_model: Path, tmp_path: Path, out: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with default_model.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(default_model.stat().st_size // 2))
    result = run("pack", str(cut), "--profile", "rpi5", "-o", str(out))
    assert_failed(result, "cut.gguf is", "truncated", "download or convert the model again")
    assert_empty(out)


def test_unknown_architecture(tmp_path: Path, out: Path) -> None:
    path = tmp_path / "frob.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_name("frob")
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_vocab_size(64)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run("pack", str(path), "--profile", "rpi5", "-o", str(out))
    assert_failed(result, "unknown model architecture 'frobnicator'", "convert the model")
    assert_empty(out)


def test_unknown_profile_suggests_close_names(out: Path) -> None:
    result = run("pack", "--profile", "rpi55", "-o", str(out))
    assert_failed(result, "unknown device profile 'rpi55'", "did you mean", "rpi5")
    assert_empty(out)


def test_missing_profile_flag_is_a_usage_error(out: Path) -> None:
    result = run("pack", "-o", str(out))
    assert result.exit_code == 2
    assert "Missing option '--profile'" in result.output


def test_model_too_big_for_the_profile(default_model: Path, out: Path) -> None:
    # The Pi Zero 2 W has 512 MiB; keeping 300 MiB of it for other services leaves too little.
    result = run("pack", str(default_model), "--profile", "rpi-zero2w", "-o", str(out),
                 "--reserve-mb", "300")
    assert_failed(result, "does not fit rpi-zero2w", "300 MiB --reserve-mb",
                  "hint: a device with at least")
    assert_empty(out)


def test_output_dir_exists(rpi5_bundle: Path, default_model: Path) -> None:
    before = sorted(p.name for p in rpi5_bundle.parent.iterdir())
    manifest = (rpi5_bundle / "manifest.json").read_bytes()
    result = run("pack", str(default_model), "--profile", "rpi5", "-o", str(rpi5_bundle.parent))
    assert_failed(result, f"{rpi5_bundle} already exists", "pass a different -o")
    assert sorted(p.name for p in rpi5_bundle.parent.iterdir()) == before
    assert (rpi5_bundle / "manifest.json").read_bytes() == manifest


def test_tampered_bundle(rpi5_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(rpi5_bundle, tmp_path / "b"))
    model = copy / "model.gguf"
    with model.open("r+b") as handle:
        handle.seek(4096)
        byte = handle.read(1)
        handle.seek(4096)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = run("verify", str(copy))
    assert_failed(result, "sha256 model.gguf", "copy the bundle again or re-pack")


def test_malicious_archive(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("b/../../../etc/cron.d/evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"boom"))
    result = run("verify", str(archive))
    assert_failed(result, "member 'b/../../../etc/cron.d/evil'", "refusing to extract")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


# ------------------------------------------------- a real file size limit (no root needed)

# The child lowers its own RLIMIT_FSIZE, so writes past it fail with EFBIG at the OS boundary
# (as on FAT32 at 4 GiB); SIGXFSZ, which would kill it instead, is ignored first.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""


def run_limited(limit: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that may write files of at most `limit` bytes."""
    return subprocess.run([sys.executable, "-c", _LIMITED + code, str(limit), *args],
                          capture_output=True, text=True, timeout=600, check=False)


_CLI = "from edgerunner.cli import main\nmain(sys.argv[1:], prog_name='edgerunner')\n"


def test_file_size_limit_while_llama_cpp_writes(default_model: Path, out: Path) -> None:
    limit = 20_000_000  # the model is ~100 MB: llama.cpp's own write hits EFBIG mid-file
    done = run_limited(limit, _CLI, "pack", str(default_model), "--profile", "rpi5",
                       "-o", str(out))
    assert done.returncode == 1, done.stderr
    assert "file too large: writing" in done.stderr and "model.gguf" in done.stderr
    assert f"file size limit (`ulimit -f`: {limit} bytes)" in done.stderr
    assert "hint: raise it (`ulimit -f unlimited`)" in done.stderr
    assert "the partial file was removed" in done.stderr
    assert "Traceback" not in done.stderr
    assert_empty(out)


def test_file_size_limit_while_writing_the_archive(default_model: Path, rpi5_bundle: Path,
                                                   out: Path) -> None:
    # model.gguf fits; the .tar holding it and the side files does not.
    limit = (rpi5_bundle / "model.gguf").stat().st_size + 2048
    done = run_limited(limit, _CLI, "pack", str(default_model), "--profile", "rpi5",
                       "-o", str(out), "--archive")
    assert done.returncode == 1, done.stderr
    assert f"file too large: writing {out / rpi5_bundle.name}.tar reached" in done.stderr
    assert "nothing was left behind" in done.stderr and "Traceback" not in done.stderr
    assert_empty(out)


def test_file_size_limit_while_writing_bundle_files(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from edgerunner.bundle.store import stage_bundle\n"
        "from edgerunner.errors import BundleError\n"
        "try:\n"
        "    with stage_bundle(Path(sys.argv[1])) as stage:\n"
        "        stage.write_text('config.toml', 'x = 1\\n' * 200_000)\n"
        "except BundleError as exc:\n"
        "    print(exc)\n"
    )
    done = run_limited(2**20, code, str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert f"file too large: writing {tmp_path}/.b.partial-" in done.stdout
    assert "config.toml reached this process's file size limit (`ulimit -f`: 1048576 bytes)" in (
        done.stdout)
    assert "nothing was left behind" in done.stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- a real full disk (tmpfs)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: writes past it fail with ENOSPC, as on a full SD card.

    Mounting needs CAP_SYS_ADMIN; where the test runner lacks it these tests are skipped with
    the reason (a fake ENOSPC would not exercise llama.cpp's own write path), and the file size
    limit tests above still hit a real limit at the same writes.
    """
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_too_small_is_refused_before_quantizing(default_model: Path, tiny_disk: Path) -> None:
    result = run("pack", str(default_model), "--profile", "rpi5", "-o", str(tiny_disk))
    assert_failed(result, f"not enough disk space in {tiny_disk}", "free disk space")
    assert_empty(tiny_disk)


def test_disk_full_while_llama_cpp_writes(default_model: Path, tiny_disk: Path) -> None:
    # quantize() has no free-space pre-check, so llama.cpp really hits ENOSPC mid-file.
    target = tiny_disk / "model.gguf"
    with pytest.raises(BundleError, match=r"disk full while llama\.cpp wrote") as info:
        quantize(default_model, target, "Q8_0", n_threads=2, source_type="Q4_1")
    assert "the partial file was removed" in str(info.value)
    assert_empty(tiny_disk)


def test_disk_full_while_writing_bundle_files(tiny_disk: Path) -> None:
    with pytest.raises(BundleError, match="disk full while writing"), \
            stage_bundle(tiny_disk / "b") as stage:
        (stage.path / "filler").write_bytes(b"\0" * (24 * 2**20 - 8192))
        stage.write_text("config.toml", "x = 1\n" * 10_000)
    assert_empty(tiny_disk)
