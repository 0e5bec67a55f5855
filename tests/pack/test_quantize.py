"""Real quantization of the test model with llama.cpp, through edgerunner.pack.quantize."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from edgerunner.errors import QuantizeError
from edgerunner.pack.quantize import ftype_for, quantize, supported_quants

PRESETS = ["Q4_0", "Q5_K_M", "Q8_0"]


@pytest.fixture(scope="module")
def quantized(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The default model quantized to three presets, with the progress each reported."""
    out = tmp_path_factory.mktemp("quantized")
    results: dict[str, object] = {}
    for quant in PRESETS:
        seen: list[tuple[int, int]] = []
        result = quantize(
            default_model, out / f"{quant}.gguf", quant, n_threads=2,
            progress=lambda done, total, seen=seen: seen.append((done, total)),  # type: ignore[misc]
            source_type="Q4_1",
        )
        results[quant] = (result, seen)
    return results


def _file_type(path: Path) -> int:
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=32, verbose=False, vocab_only=True)
    try:
        return int(llm.metadata["general.file_type"])
    finally:
        llm.close()


@pytest.mark.parametrize("quant", PRESETS)
def test_each_preset_writes_that_file_type(quantized: dict, quant: str) -> None:
    result, _ = quantized[quant]
    assert result.path.is_file()
    assert result.size == result.path.stat().st_size > 10_000_000
    assert result.quant == quant
    assert _file_type(result.path) == ftype_for(quant)


def test_presets_order_by_size(quantized: dict) -> None:
    sizes = [quantized[q][0].size for q in PRESETS]
    assert sizes == sorted(sizes), sizes


def test_progress_counts_every_tensor_in_order(quantized: dict) -> None:
    result, seen = quantized["Q4_0"]
    done = [d for d, _ in seen]
    assert done == sorted(done)
    assert seen[-1][0] == seen[-1][1] == result.n_tensors == 272  # SmolLM2-135M has 272 tensors


def test_requantizing_a_quantized_source_warns(quantized: dict) -> None:
    result, _ = quantized["Q8_0"]
    assert result.requantized
    assert any("requantizing a quantized model (Q4_1 -> Q8_0)" in w for w in result.warnings)


def test_quantized_model_generates_text(quantized: dict) -> None:
    result, _ = quantized["Q5_K_M"]
    llm = llama_cpp.Llama(str(result.path), n_ctx=128, n_batch=32, verbose=False, seed=1)
    try:
        out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] > 0
    assert out["choices"][0]["text"].strip()


def test_float_source_quantizes_without_warning(
    quantized: dict, tmp_path: Path
) -> None:
    # A float source is what a real user passes: make one from the Q8_0 file, then quantize it.
    q8, _ = quantized["Q8_0"]
    f16 = quantize(q8.path, tmp_path / "f16.gguf", "F16", n_threads=2, source_type="Q8_0")
    assert _file_type(f16.path) == llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    result = quantize(f16.path, tmp_path / "q4.gguf", "Q4_K_M", n_threads=2)
    assert not result.requantized
    assert result.warnings == []
    assert _file_type(result.path) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_unknown_preset_lists_the_known_ones(default_model: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="unknown quantization preset 'Q9_X'") as info:
        quantize(default_model, tmp_path / "x.gguf", "Q9_X", source_type="Q4_1")
    assert "Q4_K_M" in str(info.value.hint)
    assert "Q4_K_M" in supported_quants()
    assert not (tmp_path / "x.gguf").exists()


def test_llama_cpp_failure_names_the_cause_and_leaves_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(QuantizeError, match=r"could not quantize bogus\.gguf to Q4_0") as info:
        quantize(bogus, tmp_path / "out.gguf", "Q4_0", source_type="F16")
    assert "failed to" in info.value.message  # llama.cpp's own reason is carried along
    assert list(tmp_path.iterdir()) == [bogus]


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize(tmp_path / "nope.gguf", tmp_path / "out.gguf", "Q4_0", source_type="F16")
