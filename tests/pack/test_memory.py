"""The memory model against the real llama.cpp: quantized file sizes, dry-run tensor types,
the KV cache and compute buffer llama.cpp reports."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from edgerunner.pack.gguf_info import ModelInfo, TensorInfo, read_model_info
from edgerunner.pack.llama_log import capture_llama_log
from edgerunner.pack.memory import (
    MIB,
    context_shape,
    dry_run_types,
    estimate_memory,
    kv_bytes,
    mapped_bytes,
    measure_weights_dry_run,
    predict_weights,
    prefer_mmap,
    quant_facts,
    repacked_bytes,
    repacked_tensors,
    reserved_compute_bytes,
    tied_embeddings,
)
from edgerunner.pack.quant_rules import PRESETS, tensor_bytes, tensor_types

REAL_PRESETS = ["Q2_K", "Q4_K_M", "Q5_0", "Q8_0", "F16"]


def _quantize(source: Path, preset: str, out: Path) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[preset]
    params.allow_requantize = True
    params.nthread = 2
    target = out / f"{preset}.gguf"
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0
    return target


@pytest.fixture(scope="session")
def quantized(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test model quantized for real to several presets (a few seconds)."""
    out = tmp_path_factory.mktemp("quantized")
    return {preset: _quantize(default_model, preset, out) for preset in REAL_PRESETS}


@pytest.fixture(scope="session")
def default_info(default_model: Path) -> ModelInfo:
    return read_model_info(default_model)


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_predicted_file_size_matches_the_real_quantizer(
    default_info: ModelInfo, quantized: dict[str, Path], preset: str
) -> None:
    actual = quantized[preset].stat().st_size
    predicted = predict_weights(default_info, preset)
    assert abs(predicted - actual) / actual < 0.01
    # and the tensor types llama.cpp chose are the ones the port predicts
    written = {t.name: t.type for t in read_model_info(quantized[preset]).tensors}
    assert tensor_types(default_info, preset) == written


def _write_f16_llama(path: Path, n_embd: int = 256, n_ff: int = 512, n_layer: int = 8,
                     n_head: int = 4, n_head_kv: int = 1, n_vocab: int = 512) -> None:
    """A tiny llama-architecture F16 GGUF whose rows suit every K-quant (256 columns)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layer)
    writer.add_context_length(1024)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    head = n_embd // n_head

    def add(name: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols)).astype(np.float16) * np.float16(0.02)
        writer.add_tensor(name, data)

    add("token_embd.weight", n_vocab, n_embd)
    add("output.weight", n_vocab, n_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(b + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(b + "attn_q.weight", n_head * head, n_embd)
        add(b + "attn_k.weight", n_head_kv * head, n_embd)
        add(b + "attn_v.weight", n_head_kv * head, n_embd)
        add(b + "attn_output.weight", n_embd, n_head * head)
        add(b + "ffn_gate.weight", n_ff, n_embd)
        add(b + "ffn_up.weight", n_ff, n_embd)
        add(b + "ffn_down.weight", n_embd, n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def f16_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "tiny-llama-f16.gguf"
    _write_f16_llama(path)
    return path


@pytest.mark.parametrize(
    "preset", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"]
)
def test_k_quant_mixtures_match_llama_cpp_dry_run(f16_llama: Path, preset: str) -> None:
    """On rows K-quants accept, every attn_v / ffn_down / output bump matches llama.cpp."""
    info = read_model_info(f16_llama)
    assert tensor_types(info, preset) == dry_run_types(f16_llama, preset)
    assert predict_weights(info, preset) == measure_weights_dry_run(f16_llama, preset)


def test_dry_run_agrees_on_the_test_model(default_model: Path, default_info: ModelInfo) -> None:
    for preset in ("Q3_K_M", "Q6_K"):
        assert tensor_types(default_info, preset) == dry_run_types(default_model, preset)


def _grab(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"llama.cpp did not log {pattern!r}"
    return match[1]


def _context_log(model: Path, n_ctx: int, kv: str, flash_attn: bool) -> str:
    kv_type = llama_cpp.GGML_TYPE_Q8_0 if kv == "q8_0" else llama_cpp.GGML_TYPE_F16
    with capture_llama_log() as lines:
        llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, type_k=kv_type, type_v=kv_type,
                              flash_attn=flash_attn, n_threads=1, verbose=True)
        llm.close()
    return "".join(lines)


@pytest.mark.parametrize(("n_ctx", "kv", "flash_attn"),
                         [(512, "f16", False), (1000, "q8_0", True), (3000, "f16", True)])
def test_kv_and_compute_buffers_match_what_llama_cpp_reports(
    default_model: Path, default_info: ModelInfo, n_ctx: int, kv: str, flash_attn: bool
) -> None:
    text = _context_log(default_model, n_ctx, kv, flash_attn)
    cells = int(_grab(r"n_ctx\s+=\s+(\d+)", text))
    kv_mib = float(_grab(r"llama_kv_cache: size =\s+([\d.]+) MiB", text))
    compute_mib = float(_grab(r"CPU compute buffer size =\s+([\d.]+) MiB", text))
    assert context_shape(default_info, n_ctx).n_ctx == cells
    assert kv_bytes(default_info, n_ctx, "q8_0" if kv == "q8_0" else "f16") / MIB == (
        pytest.approx(kv_mib, abs=0.01))
    reserved = reserved_compute_bytes(default_info, n_ctx, flash_attn=flash_attn) / MIB
    assert reserved == pytest.approx(compute_mib, rel=0.10)


def test_sliding_window_cache_size_follows_llama_cpp_rule() -> None:
    info = ModelInfo(n_layer=4, n_embd=256, n_head=4, n_head_kv=[2] * 4, key_length=64,
                     value_length=64, n_vocab=1000, n_ctx_train=32768, sliding_window=1024,
                     swa_layers=[True, False, True, False])
    trimmed = context_shape(info, 8000, swa_full=False)
    assert trimmed.n_ctx == 8192  # GGML_PAD(8000, 256)
    assert trimmed.n_ctx_swa == 1536  # GGML_PAD(min(8192, 1024 + 512), 256)
    assert context_shape(info, 8000, swa_full=True).n_ctx_swa == 8192
    per_cell = 2 * (2 * 64) * 2  # K and V rows, f16
    assert kv_bytes(info, 8000, swa_full=False) == 2 * (8192 + 1536) * per_cell


def test_quantized_kv_needs_flash_attention(default_info: ModelInfo) -> None:
    with pytest.raises(ValueError, match="flash attention"):
        estimate_memory(default_info, "Q8_0", 2048, kv_type="q8_0", flash_attn=False)


def test_repacked_weights_count_twice_only_with_mmap(default_info: ModelInfo) -> None:
    features = ["avx2"]  # Q4_0 rows in multiples of 8 are repacked on AVX2
    repacked = repacked_bytes(default_info, "Q4_0", features)
    assert repacked > 0 and repacked_bytes(default_info, "Q4_0", []) == 0
    mapped = estimate_memory(default_info, "Q4_0", 512, cpu_features=features, mmap=True)
    loaded = estimate_memory(default_info, "Q4_0", 512, cpu_features=features, mmap=False)
    facts = quant_facts(default_info, "Q4_0", features)
    # with mmap: the mapped span plus the repacked copies; without: every tensor once
    assert mapped.weights_mb == pytest.approx((facts.mapped_bytes + repacked) / MIB, abs=0.01)
    assert loaded.weights_mb == pytest.approx(facts.data_bytes / MIB, abs=0.01)


PI5 = ["neon", "fp16", "dotprod"]  # Cortex-A76: ggml's armv8.2_2 variant (dotprod + fp16)
PI4 = ["neon"]  # Cortex-A72 / A53: the armv8.0 variant, which has no repack rule that applies

# What llama.cpp 0.3.36 logged for the default model under `make test-arm` (qemu-aarch64
# -cpu cortex-a76, ggml's runtime CPU variants): MiB of `CPU_Mapped` and `CPU_REPACK model
# buffer size`, and how many `repack tensor` lines it printed (the lane's five presets, and
# the other ten through tools/arm/probe.py once: every preset edgerunner offers).
LANE_A76 = {
    "Q4_0": (85.30, 85.64, 211), "Q4_1": (92.10, 28.69, 1), "Q4_K_M": (98.87, 47.54, 45),
    "Q6_K": (129.37, 130.14, 211), "Q8_0": (135.50, 136.27, 211),
    "Q2_K": (81.94, 71.40, 181), "Q3_K_S": (81.94, 71.40, 181), "Q3_K_M": (87.00, 78.63, 151),
    "Q3_K_L": (90.84, 81.69, 151), "Q4_K_S": (95.61, 43.24, 31), "Q5_0": (98.43, 28.69, 1),
    "Q5_1": (104.76, 28.69, 1), "Q5_K_S": (103.18, 46.09, 31), "Q5_K_M": (105.21, 49.23, 45),
    "F16": (256.63, 0.0, 0),
}


@pytest.mark.parametrize("preset", sorted(LANE_A76))
def test_buffers_match_what_llama_cpp_logs_on_a_pi5_cpu(
    default_info: ModelInfo, preset: str
) -> None:
    mapped, repack, n_repacked = LANE_A76[preset]
    assert mapped_bytes(default_info, preset, PI5) / MIB == pytest.approx(mapped, abs=0.005)
    assert repacked_bytes(default_info, preset, PI5) / MIB == pytest.approx(repack, abs=0.005)
    assert len(repacked_tensors(default_info, preset, PI5)) == n_repacked
    # the Pi 4's variant repacks nothing and maps the whole file
    assert repacked_bytes(default_info, preset, PI4) == 0
    data = quant_facts(default_info, preset, PI4).data_bytes
    assert mapped_bytes(default_info, preset, PI4) / MIB == pytest.approx(data / MIB, abs=0.01)


def test_tied_embeddings_output_copy_is_repacked_on_arm(default_info: ModelInfo) -> None:
    """SmolLM2 has no output.weight: llama.cpp duplicates token_embd (Q8_0 here: 576-wide rows
    fall back from Q6_K) as the output matrix, and NEON + dotprod repacks that copy."""
    assert tied_embeddings(default_info)
    embd = next(t for t in default_info.tensors if t.name == "token_embd.weight")
    for preset in ("Q4_1", "Q5_0", "Q5_1"):  # no rule for the layers' type: only the copy
        assert tensor_types(default_info, preset)["token_embd.weight"] == "Q8_0"
        assert repacked_tensors(default_info, preset, PI5) == ["token_embd.weight"]
        assert repacked_bytes(default_info, preset, PI5) == tensor_bytes("Q8_0", embd.shape)
    # x86 has no Q8_0 rule: on AVX2 the copy stays where it is
    assert "token_embd.weight" not in repacked_tensors(default_info, "Q4_0", ["avx2"])
    # i8mm takes the same Q8_0 rows (q8_0_4x8)
    assert "token_embd.weight" in repacked_tensors(default_info, "Q8_0", ["neon", "i8mm"])


def test_without_mmap_the_repacked_tied_copy_still_counts(default_info: ModelInfo) -> None:
    """llama.cpp under cortex-a76 with use_mmap=False: Q4_1 `CPU model buffer size = 92.10 MiB`
    + `CPU_REPACK = 28.69 MiB`; Q4_0 28.82 + 85.64. The copy is held next to the original."""
    for preset, (cpu_mib, repack_mib) in {"Q4_1": (92.10, 28.69), "Q4_0": (28.82, 85.64)}.items():
        facts = quant_facts(default_info, preset, PI5)
        assert facts.resident(mmap=False) / MIB == pytest.approx(cpu_mib + repack_mib, abs=0.01)
    # on x86 (AVX2) the copy is not repacked: Q4_0 without mmap is the file's data once
    # (measured: CPU 28.82 + CPU_REPACK 56.95 MiB)
    facts = quant_facts(default_info, "Q4_0", ["avx2"])
    assert facts.copy_bytes == 0
    assert facts.resident(mmap=False) / MIB == pytest.approx(28.82 + 56.95, abs=0.01)
    # Q4_1 on a Pi 5 costs the same mapped or not: mmap is kept; Q4_0 is cheaper unmapped
    assert prefer_mmap(default_info, "Q4_1", PI5)
    assert not prefer_mmap(default_info, "Q4_0", PI5)


def test_untied_models_repack_their_output_matrix_not_the_embeddings(f16_llama: Path) -> None:
    info = read_model_info(f16_llama)
    assert not tied_embeddings(info)
    names = repacked_tensors(info, "Q4_0", PI5)
    assert "output.weight" in names and "token_embd.weight" not in names


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_repacks_only_types_with_an_arm_rule(
    default_info: ModelInfo, preset: str
) -> None:
    """ggml-cpu/repack.cpp on NEON + dotprod: Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL and Q8_0 (with
    the row multiple each layout needs); F16, BF16, Q2_K, Q3_K, Q4_1, Q5_0, Q5_1 stay put."""
    types = tensor_types(default_info, preset)
    names = repacked_tensors(default_info, preset, PI5)
    assert {types[n] for n in names} <= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0"}
    shapes = {t.name: t.shape for t in default_info.tensors}
    multiple = {"Q4_0": 4, "Q8_0": 4, "IQ4_NL": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8}
    assert all(shapes[n][1] % multiple[types[n]] == 0 for n in names)
    facts = quant_facts(default_info, preset, PI5)
    assert facts.mapped_bytes <= facts.data_bytes
    assert facts.resident(mmap=True) == facts.mapped_bytes + facts.repacked_bytes


def test_mapped_span_follows_the_quantizers_tensor_order() -> None:
    """llama.cpp writes tensors sorted by (layer, name); a repacked tensor at the end of that
    order leaves the CPU_Mapped span, one in the middle does not."""
    def tensor(name: str, rows: int) -> TensorInfo:
        return TensorInfo(name=name, shape=(256, rows), type="F16", n_bytes=256 * rows * 2)

    # blk.10 sorts after blk.2 by layer, though not by name; ffn_up is last in its layer
    tensors = [tensor("blk.10.ffn_up.weight", 64), tensor("blk.2.attn_q.weight", 64),
               tensor("blk.10.attn_q.weight", 63), tensor("token_embd.weight", 100),
               tensor("output.weight", 100)]
    info = ModelInfo(n_layer=11, n_embd=256, n_head=4, n_head_kv=[1] * 11, key_length=64,
                     value_length=64, n_vocab=100, n_ctx_train=1024, tensors=tensors)
    q8 = {n: tensor_bytes("Q8_0", (256, r)) for n, r in
          [("out", 100), ("embd", 100), ("l2", 64), ("l10q", 63), ("l10up", 64)]}
    assert set(repacked_tensors(info, "Q8_0", PI5)) == {
        "blk.10.ffn_up.weight", "blk.2.attn_q.weight", "output.weight"}  # 63 rows: no rule
    # file order: output, token_embd, blk.2.attn_q, blk.10.attn_q, blk.10.ffn_up (repacked,
    # last: unmapped); output (repacked, first) leaves too; blk.2.attn_q stays in the span
    span = q8["embd"] + q8["l2"] + q8["l10q"]
    assert mapped_bytes(info, "Q8_0", PI5) == span
    # nothing moves on the Pi 4: the whole data, blk.10.attn_q padded to GGUF's 32-byte alignment
    assert mapped_bytes(info, "Q8_0", PI4) == sum(q8.values()) + (-q8["l10q"]) % 32


def test_estimate_grows_with_context_and_shrinks_with_q8_kv(default_info: ModelInfo) -> None:
    small = estimate_memory(default_info, "Q8_0", 1024, flash_attn=True)
    large = estimate_memory(default_info, "Q8_0", 4096, flash_attn=True)
    quant_kv = estimate_memory(default_info, "Q8_0", 4096, kv_type="q8_0", flash_attn=True)
    assert small.total_mb < large.total_mb
    assert quant_kv.kv_mb == pytest.approx(large.kv_mb * 34 / 64, rel=0.001)


def test_kq_is_converted_to_f16_only_where_tinyblas_multiplies_f16_by_f16(
    default_info: ModelInfo,
) -> None:
    """Without flash attention, ggml converts kq to F16 for V·kq on x86 and on the Pi 5 (its
    F16 kernels take F16 operands); on the Pi 4's and Zero 2 W's armv8.0 cores llamafile
    multiplies the F16 cache by F32 directly, and that work buffer is never written (the ARM
    lane measures it: tools/arm/lane.py, the A72's flash-attention-off cells)."""
    n_ctx, n_ubatch = 2048, 512
    x86, pi5, pi4 = (estimate_memory(default_info, "Q8_0", n_ctx, flash_attn=False,
                                     cpu_features=features, mmap=False)
                     for features in (["avx", "avx2", "f16c", "fma"], PI5, PI4))
    kq_f16 = n_ctx * n_ubatch * default_info.n_head * 2
    ffn_q8 = (default_info.n_ff * 36 // 32 + 4) * n_ubatch  # the work buffer's other user
    assert x86.compute_mb == pi5.compute_mb
    assert pi5.compute_mb - pi4.compute_mb == pytest.approx((kq_f16 - ffn_q8) / MIB, abs=0.01)
    with_fa = [estimate_memory(default_info, "Q8_0", n_ctx, flash_attn=True, cpu_features=f,
                               mmap=False).compute_mb for f in (PI5, PI4)]
    assert with_fa[0] == with_fa[1]
