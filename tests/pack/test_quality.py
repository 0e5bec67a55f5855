"""Measured quality (pack.quality) and importance matrices (pack.imatrix) against llama.cpp,
on the default model's real weights dequantized to F16."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.errors import QuantizeError
from edgerunner.pack.imatrix import (
    compute_imatrix,
    read_imatrix,
    wants_imatrix,
    write_imatrix,
)
from edgerunner.pack.packer import pack
from edgerunner.pack.planner import PlanOptions
from edgerunner.pack.quality import (
    CALIBRATION_FILE,
    calibration_chunks,
    calibration_sha256,
    measure_quality,
)
from edgerunner.pack.quantize import quantize
from edgerunner.profiles import resolve_profile

CHUNKS = 2


def _independent_kld(source: Path, packed: Path, n_chunks: int) -> tuple[float, float, int]:
    """Mean KLD and top-1 agreement computed here, with numpy, from both models' logits over
    the calibration text's first chunks of 512 tokens (BOS first where the model adds one,
    as llama.cpp's perplexity does; the second half scored)."""
    text = CALIBRATION_FILE.read_bytes()
    logits: dict[Path, list[np.ndarray]] = {}
    for path in (source, packed):
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True,
                              n_threads=2, verbose=False)
        tokens = llm.tokenize(text, add_bos=False)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        first = [llm.token_bos()] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        rows = []
        for i in range(n_chunks):
            chunk = [*first, *tokens[i * 512 + len(first):(i + 1) * 512]]
            llm.reset()
            llm.eval(chunk)
            rows.append(np.array(llm.scores[256:511], dtype=np.float64))
        llm.close()
        logits[path] = rows
    p_logits, q_logits = np.concatenate(logits[source]), np.concatenate(logits[packed])

    def logp(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = logp(p_logits), logp(q_logits)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    top1 = (p_logits.argmax(axis=1) == q_logits.argmax(axis=1)).mean()
    return float(kld.mean()), float(top1), len(kld)


@pytest.fixture(scope="module")
def f16_bundle(default_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The F16 source packed to Q4_K_M for rpi5, quality measured on CHUNKS chunks."""
    out = tmp_path_factory.mktemp("f16-pack")
    return pack(default_f16, resolve_profile("rpi5"), out, PlanOptions(quant="Q4_K_M"),
                quality_chunks=CHUNKS, n_threads=2).path


def test_manifest_quality_agrees_with_an_independent_kld(
    f16_bundle: Path, default_f16: Path
) -> None:
    manifest = BundleManifest.model_validate_json((f16_bundle / "manifest.json").read_text())
    quality = manifest.quality
    assert quality is not None and quality.measured
    assert quality.n_chunks == CHUNKS and quality.n_scored == CHUNKS * 255
    assert quality.text_sha256 == calibration_sha256()
    kld, top1, n = _independent_kld(default_f16, f16_bundle / "model.gguf", CHUNKS)
    assert n == quality.n_scored
    assert quality.mean_kld == pytest.approx(kld, rel=1e-3)
    assert quality.top1_agreement == pytest.approx(top1, abs=1e-9)
    assert 0 < quality.mean_kld < 1 and 0.5 < quality.top1_agreement <= 1
    assert quality.ppl_ratio == pytest.approx(quality.ppl / quality.ppl_source)
    # Q4_K_M keeps 4 bits: no imatrix, and the manifest says why
    assert manifest.imatrix is not None and manifest.imatrix.used == "none"
    assert "4 bits" in manifest.imatrix.reason


def test_q2_k_with_an_imatrix_measures_lower_kld_than_without(
    default_f16: Path, tmp_path: Path
) -> None:
    assert wants_imatrix("Q2_K") and not wants_imatrix("Q4_K_M")
    imatrix = compute_imatrix(default_f16, calibration_chunks(default_f16, 4),
                              n_threads=2)
    # every matmul weight of the 30 layers (q, k, v, output, gate, up, down), means > 0
    assert len(imatrix.sums) == 30 * 7
    assert all(v.min() > 0 for v in imatrix.means().values())
    plain = quantize(default_f16, tmp_path / "plain.gguf", "Q2_K", n_threads=2)
    guided = quantize(default_f16, tmp_path / "guided.gguf", "Q2_K", n_threads=2,
                      imatrix=imatrix)
    without = measure_quality(default_f16, plain.path, n_chunks=CHUNKS, n_threads=2)
    with_ = measure_quality(default_f16, guided.path, n_chunks=CHUNKS, n_threads=2)
    assert with_.mean_kld < without.mean_kld

    # llama.cpp's file format round-trips: the saved matrix quantizes to the same bytes
    saved = tmp_path / "imatrix.gguf"
    write_imatrix(imatrix, saved, dataset=CALIBRATION_FILE.name)
    again = quantize(default_f16, tmp_path / "again.gguf", "Q2_K", n_threads=2,
                     imatrix=read_imatrix(saved))
    assert again.path.read_bytes() == guided.path.read_bytes()


def test_pack_takes_a_users_imatrix_file_and_records_it(
    default_f16: Path, tmp_path: Path
) -> None:
    imatrix = compute_imatrix(default_f16, calibration_chunks(default_f16, 2), n_threads=2)
    saved = tmp_path / "mine.gguf"
    write_imatrix(imatrix, saved)
    result = pack(default_f16, resolve_profile("rpi5"), tmp_path / "out",
                  PlanOptions(quant="Q3_K_S"), quality_chunks=0, imatrix=saved, n_threads=2)
    record = result.manifest.imatrix
    assert record is not None and record.used == "file"
    assert record.path == str(saved.resolve()) and record.entries == 210
    assert result.manifest.quality is not None and not result.manifest.quality.measured
    assert "--quality-chunks 0" in result.manifest.quality.reason
    off = pack(default_f16, resolve_profile("rpi5"), tmp_path / "off",
               PlanOptions(quant="Q3_K_S"), quality_chunks=0, imatrix=False, n_threads=2)
    assert off.manifest.imatrix is not None and off.manifest.imatrix.used == "none"
    assert "--no-imatrix" in off.manifest.imatrix.reason


def test_a_file_that_is_not_an_imatrix_is_refused(default_model: Path) -> None:
    with pytest.raises(QuantizeError, match="in_sum2"):
        read_imatrix(default_model)


def test_a_quantized_source_is_not_measured_and_says_why(rpi5_bundle: Path) -> None:
    manifest = BundleManifest.model_validate_json((rpi5_bundle / "manifest.json").read_text())
    assert manifest.quality is not None and not manifest.quality.measured
    assert "already quantized (Q4_1)" in manifest.quality.reason


def test_old_manifests_without_quality_still_load(rpi5_bundle: Path) -> None:
    data = json.loads((rpi5_bundle / "manifest.json").read_text())
    data.pop("quality"), data.pop("imatrix")
    old = BundleManifest.model_validate(data)
    assert old.quality is None and old.imatrix is None


def test_the_calibration_text_ships_with_its_licence() -> None:
    readme = (CALIBRATION_FILE.parent / "README.md").read_text()
    assert "public domain" in readme and CALIBRATION_FILE.name in readme
    assert len(CALIBRATION_FILE.read_text().split()) > 3000


def test_a_failed_decode_frees_the_imatrix_batch(default_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A token the vocabulary does not have makes llama_decode fail: ModelError, and the batch
    llama_batch_init made is freed all the same (the real functions, watched)."""
    from edgerunner.errors import ModelError

    made, freed = [], []
    init, free = llama_cpp.llama_batch_init, llama_cpp.llama_batch_free
    monkeypatch.setattr(llama_cpp, "llama_batch_init",
                        lambda *a: made.append(1) or init(*a))
    monkeypatch.setattr(llama_cpp, "llama_batch_free", lambda b: freed.append(1) or free(b))
    with pytest.raises(ModelError, match="llama_decode failed"):
        compute_imatrix(default_model, [[1] * 31 + [10**9]], n_threads=1)
    assert made == freed == [1]
