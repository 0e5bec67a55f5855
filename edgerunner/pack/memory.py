"""Predict the peak RSS of a llama-cpp-python process serving a model, part by part.

peak RSS ≈ weights + KV cache + compute buffers + logits + runtime overhead. Every part is
derived from the model's shapes and llama.cpp's code (llama-cpp-python 0.3.36's vendored
llama.cpp), so it holds for any architecture llama.cpp runs, not only the test model:

- weights: the quantized file as llama.cpp's quantizer will write it (quant_rules.py). It is
  memory-mapped and MAP_POPULATE'd on load (llama-mmap.cpp), so all of it is resident.
- KV cache: allocated and zero-filled at context creation (llama-kv-cache.cpp,
  ggml_backend_buffer_clear), so fully resident from the start.
- compute: llama.cpp *reserves* a buffer for its worst-case graph (prompt batch with every
  token's logits), but the kernel backs only the pages a graph actually writes. What a serving
  process touches is the live set of the largest graph it runs: a full ubatch attending over
  the whole context with one output row. That live set is modelled tensor by tensor below,
  plus ggml-cpu's separate work buffer (matmul operands converted to the weights' dot type;
  which conversions happen depends on the CPU, see converts_kq_to_f16).
- logits: llama.cpp's output buffer (n_vocab floats per output row). llama_context's
  output_reserve sizes it for max(n_outputs, n_seq_max) rows and clears it, so a context made
  for n_seq_max sequences holds n_seq_max rows from the start. llama-cpp-python also
  allocates a `scores` array of n_batch × n_vocab floats, but with logits_all=False it never
  writes it (llama.py `eval`), so those pages are never backed; with logits_all=True it holds
  n_ctx rows and fills them.
- overhead: Python, numpy, the llama.cpp libraries and the vocabulary's host structures,
  measured (see OVERHEAD_* below), plus the sampler state of each extra parallel stream.

With n_parallel streams (continuous batching) the context is created with n_seq_max
sequences and a unified KV cache (kv_unified): the streams share the n_ctx cells, so the KV
cache does not grow, except a trimmed sliding-window cache (swa_full=False), which keeps a
window for each sequence. What grows is the output buffer (above), the sampler state, the touched
compute graph's output stage (one logits row per stream) and, slightly, the reserve: graph_reserve
rounds the ubatch up to a multiple of n_seq_max tokens.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgerunner.bundle.manifest import KVType, MemoryEstimate
from edgerunner.errors import ModelError, QuantizeError
from edgerunner.pack.gguf_info import ModelInfo, TensorInfo
from edgerunner.pack.isa import REPACK_ISAS, isa_features
from edgerunner.pack.quant_rules import PRESETS, check_preset, row_bytes, tensor_bytes, tensor_types

logger = logging.getLogger(__name__)

MIB = 1 << 20
GGUF_ALIGNMENT = 32
# llama-context.cpp: cparams.n_ctx = GGML_PAD(n_ctx, 256); the SWA cache is padded the same way.
CTX_PAD = 256

# Measured on x86_64, Python 3.11, llama-cpp-python 0.3.36, by `python tools/bench/bench_memory.py
# --overhead` (fresh processes; VmRSS from /proc/self/status) and the shape matrix
# (tests/pack/test_shape_matrix.py), whose vocabularies run from 32k to 262k tokens:
# - what a serving process holds besides the model's buffers: the daemon's imports
#   (edgerunner.runtime.supervise.daemon: llama_cpp, uvicorn, starlette, paho, pydantic, numpy),
#   llama_backend_init, the Engine and its llama_context's host structures: 67 MiB, the same
#   for every shape of the matrix once the vocabulary's part (below) is taken out.
# - the vocabulary's host structures (llama-vocab.cpp): per token its id_to_token entry, its
#   token_to_id hash node and its piece in cache_token_to_piece, ~155 bytes (a vocab-only load:
#   4.6 MiB for 32000 tokens, 38.8 MiB for 262144); a token string longer than libstdc++'s 15
#   inline bytes lives on the heap in each of its copies, +72 bytes; a BPE merge is a node of
#   bpe_ranks (a std::map of two strings), ~196 bytes (SmolLM2's 48900 merges: 9.1 MiB).
# - per request: the sampler's candidate array (n_vocab llama_token_data of 12 bytes, built
#   for every sampled token) and the logits row it reads, ~20 bytes per token, plus ~1 MiB of
#   tokenizer lists and bookkeeping.
OVERHEAD_BASE_MB = 67.0
VOCAB_TOKEN_BYTES = 155
VOCAB_LONG_TOKEN_BYTES = 72
VOCAB_MERGE_BYTES = 196
OVERHEAD_REQUEST_MB = 1.0
REQUEST_PER_VOCAB_BYTES = 20

# Each stream of a batch samples with its own llama_sampler chain (runtime/engine/batch.py), which
# keeps, once it has sampled, a token-data buffer of n_vocab × sizeof(llama_token_data) = 12
# bytes (llama-sampler.h, llama_sampler_chain::cur), plus small fixed state: the dist
# sampler's two std::mt19937 (5 KB each), the penalties ring of last_n tokens and its count
# map (< 4 KB at last_n = 64). The first stream's sampler is in OVERHEAD_REQUEST_MB already.
# The n_vocab × 12 candidates a sampler call builds outside a chain are transient (freed per call).
SAMPLER_TOKEN_DATA_BYTES = 12
SAMPLER_FIXED_BYTES = 16 << 10


def _pad(value: int, to: int) -> int:
    return (value + to - 1) // to * to


# --- weights -------------------------------------------------------------------------------


def header_bytes(info: ModelInfo) -> int:
    """Bytes before the tensor data: the GGUF metadata and tensor table (kept by the quantizer)."""
    data = sum(_pad(t.n_bytes, GGUF_ALIGNMENT) for t in info.tensors)
    if info.file_size > data:
        return info.file_size - data
    # Synthetic model: token strings, scores and types plus a merges list dominate the header.
    return 4096 + 48 * info.n_vocab + sum(96 + len(t.name) for t in info.tensors)


def predict_weights(info: ModelInfo, quant: str) -> int:
    """Bytes of the model.gguf llama.cpp's quantizer writes from this source for the preset."""
    types = tensor_types(info, quant)
    data = sum(_pad(tensor_bytes(types[t.name], t.shape), GGUF_ALIGNMENT) for t in info.tensors)
    return header_bytes(info) + data


_DRY_RUN_LINE = re.compile(
    r"\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(?P<src>\w+),\s+"
    r"size\s+=\s+[\d.]+\s+MiB(?:\s+->\s+[\d.]+\s+MiB\s+\((?P<dst>\w+)\))?"
)


def dry_run_types(path: Path, quant: str, imatrix: bool = False) -> dict[str, str]:
    """The type of every tensor, as llama.cpp's own quantizer decides it (dry_run, no output).
    `imatrix`: as with an importance matrix (a placeholder: the dry run reads no values)."""
    import ctypes

    import llama_cpp

    from edgerunner.pack.llama_log import capture_llama_log

    preset = check_preset(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[preset]
    params.allow_requantize = True
    params.dry_run = True
    params.nthread = 1
    if imatrix:
        value = (ctypes.c_float * 1)(1.0)
        entries = (llama_cpp.llama_model_imatrix_data * 2)()
        entries[0].name, entries[0].size = b"placeholder", 1
        entries[0].data = ctypes.cast(value, ctypes.POINTER(ctypes.c_float))
        entries[1].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with tempfile.TemporaryDirectory(prefix="er-dry-") as tmp, capture_llama_log() as lines:
        out = Path(tmp) / "never-written.gguf"
        status = llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), params)
    text = "".join(lines)
    if status != 0:
        raise QuantizeError(
            f"llama.cpp's dry run of {quant} on {path} failed: {text.strip()[-300:]}",
            hint="check that the file is a GGUF llama.cpp can load",
        )
    types: dict[str, str] = {}
    for match in _DRY_RUN_LINE.finditer(text):
        types[match["name"]] = (match["dst"] or match["src"]).upper()
    if not types:
        raise QuantizeError(f"could not read llama.cpp's dry-run log for {path}")
    return types


def measure_weights_dry_run(path: Path, quant: str) -> int:
    """Bytes of the quantized file, from the tensor types llama.cpp's dry_run reports."""
    from edgerunner.pack.gguf_info import read_model_info

    info = read_model_info(path)
    types = dry_run_types(path, quant)
    missing = {t.name for t in info.tensors} - set(types)
    if missing:
        raise ModelError(f"llama.cpp's dry run did not report {sorted(missing)[:3]} of {path}")
    data = sum(_pad(tensor_bytes(types[t.name], t.shape), GGUF_ALIGNMENT) for t in info.tensors)
    return header_bytes(info) + data


# --- weights as resident memory -------------------------------------------------------------

# ggml-cpu/repack.cpp (ggml_repack_get_optimal_repack_type): weight types the CPU backend
# re-lays out into its CPU_REPACK buffer, by ISA feature, with the row-count multiple each
# layout needs. Tried in this order; the first match wins.
_REPACK_RULES: dict[str, list[tuple[frozenset[str], int]]] = {
    "Q4_0": [(frozenset({"avx2"}), 8), (frozenset({"neon", "i8mm"}), 4),
             (frozenset({"neon", "dotprod"}), 4)],
    "Q4_K": [(frozenset({"avx2"}), 8), (frozenset({"neon", "i8mm"}), 8),
             (frozenset({"neon", "dotprod"}), 8)],
    "Q2_K": [(frozenset({"avx512"}), 8)],
    "Q5_K": [(frozenset({"neon", "i8mm"}), 8), (frozenset({"neon", "dotprod"}), 8)],
    "Q6_K": [(frozenset({"neon", "i8mm"}), 8), (frozenset({"neon", "dotprod"}), 8)],
    "IQ4_NL": [(frozenset({"avx2"}), 8), (frozenset({"neon", "dotprod"}), 4)],
    "Q8_0": [(frozenset({"neon", "i8mm"}), 4), (frozenset({"neon", "dotprod"}), 4)],
}


def _repacked(type_name: str, rows: int, features: frozenset[str]) -> bool:
    for needs, multiple in _REPACK_RULES.get(type_name, []):
        if needs <= features and rows % multiple == 0:
            return True
    return False


def tied_embeddings(info: ModelInfo) -> bool:
    """Whether the model has no output matrix, so llama.cpp uses token_embd as its lm_head."""
    names = {t.name for t in info.tensors}
    return "token_embd.weight" in names and "output.weight" not in names


def matmul_weights(info: ModelInfo) -> list[TensorInfo]:
    """The weights llama.cpp feeds to MUL_MAT / MUL_MAT_ID: what a repack rule may claim.

    Token embeddings are read with GET_ROWS, which the repacked layout does not serve, so they
    stay where they are. But with tied embeddings llama-model.cpp creates the output matrix
    as a TENSOR_DUPLICATED copy of token_embd for the output layer, whose buffer types include
    CPU_REPACK: that copy is a MUL_MAT weight like any other (on a Pi 5, Q8_0's
    q8_0_4x4 rule repacks it: `repack tensor token_embd.weight with q8_0_4x4`).
    """
    weights = [t for t in info.tensors if "token_embd" not in t.name and len(t.shape) >= 2]
    if tied_embeddings(info):
        weights += [t for t in info.tensors if t.name == "token_embd.weight"]
    return weights


def repacked_tensors(info: ModelInfo, quant: str, cpu_features: Iterable[str] = ()) -> list[str]:
    """Names of the weights llama.cpp repacks on this CPU (the tied output copy as token_embd,
    as llama.cpp's `repack tensor ... with ...` debug line names it)."""
    features = frozenset(cpu_features)
    if not features:
        return []
    types = tensor_types(info, quant)
    return [t.name for t in matmul_weights(info) if _repacked(types[t.name], t.shape[1], features)]


def repacked_bytes(info: ModelInfo, quant: str, cpu_features: Iterable[str] = ()) -> int:
    """Bytes of matmul weights llama.cpp copies into its CPU_REPACK buffer on this CPU."""
    types = tensor_types(info, quant)
    shapes = {t.name: t.shape for t in info.tensors}
    return sum(tensor_bytes(types[name], shapes[name])
               for name in repacked_tensors(info, quant, cpu_features))


def tied_copy_bytes(info: ModelInfo, quant: str, cpu_features: Iterable[str] = ()) -> int:
    """Bytes of the tied output copy when llama.cpp repacks it: an extra tensor in CPU_REPACK
    next to the token_embd GET_ROWS reads, without mmap too (a Pi 5 loading SmolLM2 Q4_1
    without mmap: `CPU model buffer size = 92.10 MiB` + `CPU_REPACK ... = 28.69 MiB`). A copy
    no rule claims shares the original's buffer and costs nothing."""
    if "token_embd.weight" not in repacked_tensors(info, quant, cpu_features):
        return 0
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    return tensor_bytes(tensor_types(info, quant)[embd.name], embd.shape)


def _quantizer_order(t: TensorInfo) -> tuple[int, str]:
    """Where llama.cpp's quantizer writes a tensor: it walks the loader's weights_map, whose
    weight_name_comparer sorts by layer ("blk.%d.", -1 for none), then by name."""
    match = re.match(r"blk\.(\d+)\.", t.name)
    return (int(match.group(1)) if match else -1, t.name)


def mapped_bytes(info: ModelInfo, quant: str, cpu_features: Iterable[str] = ()) -> int:
    """The CPU_Mapped buffer: the file's span from the first to the last tensor not repacked.

    llama-model.cpp maps, per buffer type, the range its tensors cover (get_mapping_range);
    a repacked tensor lives in CPU_REPACK instead, and llama-mmap.cpp unmaps the file's ends
    outside every used range. So repacked tensors at either end of the file leave the mapping;
    those in between stay mapped next to their repacked copy. The original token_embd of a
    tied model stays (GET_ROWS reads it); only its output copy is repacked.
    """
    types = tensor_types(info, quant)
    moved = set(repacked_tensors(info, quant, cpu_features)) - {"token_embd.weight"}
    offset, first, last = 0, -1, 0
    for t in sorted(info.tensors, key=_quantizer_order):
        size = tensor_bytes(types[t.name], t.shape)
        if t.name not in moved:
            first = offset if first < 0 else first
            last = offset + size
        offset += _pad(size, GGUF_ALIGNMENT)
    return last - max(first, 0)


def prefer_mmap(info: ModelInfo, quant: str, cpu_features: Iterable[str] = ()) -> bool:
    """mmap unless it costs memory: repacked weights inside the mapped span stay resident
    twice. A repacked tied output copy costs the same either way, and then mmap wins (its
    pages are the page cache's, and load is faster)."""
    facts = quant_facts(info, quant, cpu_features)
    return facts.resident(mmap=True) <= facts.resident(mmap=False)


def resident_weight_bytes(
    info: ModelInfo, quant: str, cpu_features: Iterable[str] = (), mmap: bool = True
) -> int:
    """Weights as RSS. With mmap the file is mapped and pre-faulted (llama-mmap.cpp,
    MAP_POPULATE) and the ends outside the used tensors are unmapped (mapped_bytes); repacked
    tensors inside that span exist twice, the mapped original and the anonymous copy. Without
    mmap every tensor is read into an anonymous buffer once, plus a repacked tied output copy
    (tied_copy_bytes)."""
    return quant_facts(info, quant, cpu_features).resident(mmap)


def weights_by_isa(info: ModelInfo, quant: str, mmap: bool,
                   isas: Iterable[str] = REPACK_ISAS) -> dict[str, float]:
    """Resident weights (MiB) with this preset and residency on each repack ISA: what the same
    bundle holds when a CPU other than its profile's serves it."""
    return {isa: round(quant_facts(info, quant, isa_features(isa)).resident(mmap) / MIB, 2)
            for isa in isas}


# --- context shapes ------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextShape:
    """What llama.cpp makes of the requested context parameters."""

    n_ctx: int  # cells of the full-attention cache (rounded up to 256)
    n_ctx_swa: int  # cells of the sliding-window cache
    n_batch: int
    n_ubatch: int


def context_shape(
    info: ModelInfo, n_ctx: int, n_batch: int = 512, n_ubatch: int = 512, swa_full: bool = True,
    n_seq_max: int = 1,
) -> ContextShape:
    """Round n_ctx and the batch sizes the way llama-cpp-python + llama-context.cpp do.
    `n_seq_max`: the sequences of the (unified) cache, which a trimmed SWA cache holds a
    window for each."""
    batch = min(n_ctx, n_batch)  # llama.py: self.n_batch = min(n_ctx, n_batch)
    ubatch = min(batch, n_ubatch)
    cells = _pad(n_ctx, CTX_PAD)
    swa_cells = cells
    if info.has_swa and not swa_full:
        # llama-kv-cache-iswa.cpp, with kv_unified (as the Engine creates every context):
        # GGML_PAD(min(size_base, n_swa * n_seq_max + n_ubatch), 256)
        window = info.sliding_window * max(1, n_seq_max)
        swa_cells = _pad(min(cells, window + ubatch), CTX_PAD)
    return ContextShape(n_ctx=cells, n_ctx_swa=swa_cells, n_batch=batch, n_ubatch=ubatch)


def kv_cells(info: ModelInfo, shape: ContextShape) -> list[int]:
    """KV cells per layer (0 for layers without attention)."""
    cells = []
    for il, heads in enumerate(info.n_head_kv):
        swa = il < len(info.swa_layers) and info.swa_layers[il] and info.sliding_window > 0
        cells.append(0 if heads == 0 else shape.n_ctx_swa if swa else shape.n_ctx)
    return cells


def kv_bytes(
    info: ModelInfo, n_ctx: int, kv_type: KVType = "f16", n_batch: int = 512,
    n_ubatch: int = 512, swa_full: bool = True, n_seq_max: int = 1,
) -> int:
    """Bytes of the KV cache: per layer cells × (row(K) + row(V)) in the cache's type."""
    shape = context_shape(info, n_ctx, n_batch, n_ubatch, swa_full, n_seq_max)
    ggml_type = kv_type.upper()
    total = 0
    layers = zip(kv_cells(info, shape), info.n_embd_k_gqa, info.n_embd_v_gqa, strict=True)
    for cells, k, v in layers:
        total += cells * (row_bytes(ggml_type, k) + row_bytes(ggml_type, v))
    return total


# --- compute graph -------------------------------------------------------------------------


def _dot_bytes(weight_type: str, n: int) -> int:
    """Bytes of an f32 activation row converted to the weight type's vec_dot type (ggml-cpu)."""
    if weight_type in ("F16", "BF16"):
        return 2 * n
    if weight_type == "F32":
        return 0
    return n * 36 // 32 + 4  # Q8_0 / Q8_1 / Q8_K rows: a little over one byte per element


def converts_kq_to_f16(cpu_features: Iterable[str] = ()) -> bool:
    """Whether ggml-cpu converts an F32 operand to F16 in its work buffer before multiplying
    it by the F16 KV cache (attention without flash attention: K·Q and V·kq).

    llamafile's tinyBLAS (ggml-cpu/llamafile/sgemm.cpp, case GGML_TYPE_F16) multiplies F16 by
    F16 on x86 (F16C) and on ARM with FP16 vector arithmetic (the Pi 5's A76), so ggml converts
    the F32 operand first. On ARM without it (armv8.0: the Pi 4's A72, the Zero 2 W's A53) it
    multiplies F16 by F32 directly, and the conversion is never written. Measured under qemu
    (cortex-a72, n_ctx 2048, 512-token ubatches): 7 MiB less resident for 4 heads, 15 MiB for
    8, the size of kq in F16. Unknown features: assume the conversion.
    """
    features = frozenset(cpu_features)
    return not ("neon" in features and "fp16" not in features)


def graph_bytes(
    info: ModelInfo, n_tokens: int, n_kv: int, n_kv_swa: int, n_outputs: int,
    flash_attn: bool, weight_type: str = "Q8_0", kq_to_f16: bool = True,
) -> tuple[int, int]:
    """(compute buffer, CPU work buffer) live at the peak of one decoder graph.

    Mirrors the tensors llama-graph.cpp allocates for a standard decoder layer; ggml-alloc
    reuses memory between layers, so the peak is the largest single stage plus the inputs
    that stay alive for the whole graph. `kq_to_f16`: see converts_kq_to_f16.
    """
    f32 = 4
    t = n_tokens
    n_embd, n_head = info.n_embd, info.n_head
    dk, dv = info.key_length, info.value_length
    n_ff = info.n_ff or 4 * n_embd
    heads_kv = max(info.n_head_kv, default=0)
    mask_elem = 2 if flash_attn else f32
    # an iSWA cache (llama-kv-cache-iswa.cpp) is two caches: a second mask, a second set of
    # row indices for its windowed layers, even at the same size
    caches = 2 if info.has_swa else 1
    # Inputs: token ids, positions, KQ mask(s), cache row indices, output ids.
    masks = n_kv * t * mask_elem + (n_kv_swa * t * mask_elem if info.has_swa else 0)
    inputs = t * 4 + t * 4 + masks + caches * t * 8 + n_outputs * 4
    if not flash_attn:
        inputs += caches * t * heads_kv * dv * 8  # v_idxs: one index per element of the V^T
    embd = t * n_embd * f32
    residual = 2 * t * n_embd * f32  # layer input kept for the skip connection + current
    q_k_v = t * (n_head * dk + heads_kv * (dk + dv)) * f32
    if flash_attn:
        attn = embd + residual + q_k_v + t * n_head * dv * f32
        attn_work = t * n_head * dk * 2  # Q converted to f16 for the K·Q dot products
    else:
        # kq (soft_max runs in place on it), allocated above what the layer holds then: the
        # layer input and the blocks ggml-alloc's best fit left below it, three rows of n_embd
        # and two of the heads' width (none of those where a fused attn_qkv yields Q, K and V
        # as views of one projection). Measured against llama.cpp's reserve across head
        # counts, head sizes, GQA ratios, widths and contexts (llama, qwen2, qwen3, gemma3,
        # phi3), to the MiB; Q, K and V themselves are dead or inside those blocks by then.
        kq = n_kv * t * n_head * f32
        q_rows = 0 if info.fused_qkv else 2 * t * n_head * dk * f32
        attn = 3 * embd + q_rows + kq
        # kq converted to f16 for V·kq (the larger of the two conversions)
        attn_work = n_kv * t * n_head * 2 if kq_to_f16 else 0
    ffn = embd + residual + t * (n_embd + 3 * n_ff) * f32  # norm, up, gate, the gated product
    ffn_work = _dot_bytes(weight_type, n_ff) * t
    # The lm_head stage: by then the inputs and the residual stream are dead (ggml-alloc
    # frees a tensor after its last use), only the selected rows and their logits live.
    output = n_outputs * (2 * n_embd + info.n_vocab) * f32
    compute = max(inputs + max(attn, ffn), output)
    return compute, max(attn_work, ffn_work)


def reserved_compute_bytes(
    info: ModelInfo, n_ctx: int, n_batch: int = 512, n_ubatch: int = 512,
    flash_attn: bool = False, swa_full: bool = True, n_seq_max: int = 1,
) -> int:
    """What llama.cpp reserves (and logs as `CPU compute buffer size`): the prompt graph over
    the full cache with a logits row for every token of the ubatch. Virtual, not resident.

    With a unified KV cache the graph's shapes do not depend on the sequences, but
    llama_context::graph_reserve rounds the ubatch's tokens up to a multiple of n_seq_max
    (its outputs stay min(n_ubatch, n_outputs_max) = n_ubatch)."""
    shape = context_shape(info, n_ctx, n_batch, n_ubatch, swa_full, n_seq_max)
    tokens = _pad(shape.n_ubatch, max(1, n_seq_max))
    compute, _ = graph_bytes(
        info, tokens, shape.n_ctx, shape.n_ctx_swa, shape.n_ubatch, flash_attn
    )
    return compute


def _n_kv_used(cells: int, used: int) -> int:
    """llama_kv_cache::get_n_kv: the graph spans the used cells, padded to 256."""
    return min(cells, max(CTX_PAD, _pad(used, CTX_PAD)))


def touched_compute_bytes(
    info: ModelInfo, shape: ContextShape, filled: int, flash_attn: bool, weight_type: str,
    n_outputs: int = 1, kq_to_f16: bool = True,
) -> int:
    """Resident compute + work memory after a prompt of `filled` tokens, ubatch by ubatch."""
    peak_compute = peak_work = 0
    done = 0
    # Token-by-token decoding after the prompt is the same graph with n_tokens = 1.
    while done < filled or done == 0:
        t = min(shape.n_ubatch, max(1, filled - done))
        done += t
        n_kv = _n_kv_used(shape.n_ctx, done)
        n_kv_swa = _n_kv_used(shape.n_ctx_swa, done)
        compute, work = graph_bytes(
            info, t, n_kv, n_kv_swa, min(n_outputs, t), flash_attn, weight_type, kq_to_f16
        )
        peak_compute, peak_work = max(peak_compute, compute), max(peak_work, work)
    return peak_compute + peak_work


# --- the estimate --------------------------------------------------------------------------


def output_buffer_bytes(info: ModelInfo, n_seq_max: int = 1, n_outputs: int = 1) -> int:
    """llama.cpp's output buffer: output_reserve allocates max(n_outputs, n_seq_max) logits rows
    of n_vocab floats, and clears them (resident from context creation)."""
    return info.n_vocab * 4 * max(n_outputs, n_seq_max)


def sampler_state_bytes(info: ModelInfo, n_parallel: int = 1) -> int:
    """The samplers of the streams beyond the first (the first is in the measured overhead)."""
    per_stream = info.n_vocab * SAMPLER_TOKEN_DATA_BYTES + SAMPLER_FIXED_BYTES
    return max(0, n_parallel - 1) * per_stream


def vocab_bytes(info: ModelInfo) -> int:
    """The vocabulary's host structures in llama.cpp: tokens, their long strings, BPE merges."""
    return (VOCAB_TOKEN_BYTES * info.n_vocab + VOCAB_LONG_TOKEN_BYTES * info.n_long_tokens
            + VOCAB_MERGE_BYTES * info.n_merges)


def request_bytes(info: ModelInfo) -> int:
    """What serving one request adds beyond the graph: the sampler's candidates, bookkeeping."""
    return int(OVERHEAD_REQUEST_MB * MIB) + REQUEST_PER_VOCAB_BYTES * info.n_vocab


def overhead_bytes(info: ModelInfo, n_parallel: int = 1) -> int:
    """Python + libraries + the Engine (measured), the vocabulary's host structures, one
    request's sampling, and the sampler state of each extra parallel stream."""
    return (int(OVERHEAD_BASE_MB * MIB) + vocab_bytes(info) + request_bytes(info)
            + sampler_state_bytes(info, n_parallel))


@dataclass(frozen=True)
class QuantFacts:
    """What a preset does to the weights; computed once per (model, preset, CPU)."""

    file_bytes: int  # the model.gguf llama.cpp writes
    data_bytes: int  # its tensor data (what decoding reads per token, at most)
    repacked_bytes: int  # weights llama.cpp copies into CPU_REPACK on this CPU
    mapped_bytes: int  # the CPU_Mapped span that stays mapped next to them
    dominant_type: str  # the type most weight elements end up in
    copy_bytes: int = 0  # the tied output copy among the repacked: held twice, mmap or not

    def resident(self, mmap: bool) -> int:
        """Weights as RSS (see resident_weight_bytes)."""
        if mmap:
            return self.mapped_bytes + self.repacked_bytes
        return self.data_bytes + self.copy_bytes


def quant_facts(info: ModelInfo, quant: str, cpu_features: Iterable[str] = ()) -> QuantFacts:
    """Weights-side facts of a preset, for repeated estimates at many context sizes."""
    types = tensor_types(info, quant)
    sizes: dict[str, int] = {}
    for t in info.tensors:
        sizes[types[t.name]] = sizes.get(types[t.name], 0) + t.n_elements
    file_bytes = predict_weights(info, quant)
    return QuantFacts(
        file_bytes=file_bytes,
        data_bytes=file_bytes - header_bytes(info),
        repacked_bytes=repacked_bytes(info, quant, cpu_features),
        mapped_bytes=mapped_bytes(info, quant, cpu_features),
        copy_bytes=tied_copy_bytes(info, quant, cpu_features),
        dominant_type=max(sizes, key=lambda k: sizes[k]) if sizes else quant.upper(),
    )


def estimate_memory(
    info: ModelInfo, quant: str, n_ctx: int, kv_type: KVType = "f16", n_batch: int = 512,
    n_ubatch: int = 512, flash_attn: bool = False, swa_full: bool = True,
    filled: int | None = None, logits_all: bool = False, cpu_features: Iterable[str] = (),
    mmap: bool = True, facts: QuantFacts | None = None, n_parallel: int = 1,
    n_seq_max: int | None = None,
) -> MemoryEstimate:
    """Predicted peak RSS, by part, of serving `info` quantized to `quant` with these settings.

    `filled` is how many tokens the context holds at the moment of interest; the default,
    a full context, is the worst case a server reaches. `cpu_features` (the profile's ISA
    features) decide which weights llama.cpp repacks; `mmap` whether the file is mapped.
    `facts` (from quant_facts) saves recomputing the weights side for many contexts.
    `n_parallel` streams decode together in a context made for `n_seq_max` sequences
    (RuntimePlan.n_seq_max: the streams plus the prefix cache's; default n_parallel), all
    sharing the n_ctx cells (a trimmed SWA cache holds n_seq_max windows).
    """
    if kv_type != "f16" and not flash_attn:
        raise ValueError("a quantized KV cache needs flash attention in llama.cpp")
    seqs = max(n_parallel, n_seq_max or n_parallel)
    shape = context_shape(info, n_ctx, n_batch, n_ubatch, swa_full, seqs)
    used = shape.n_ctx if filled is None else max(1, min(filled, shape.n_ctx))
    facts = facts or quant_facts(info, quant, cpu_features)
    weights = facts.resident(mmap)
    kv = kv_bytes(info, n_ctx, kv_type, n_batch, n_ubatch, swa_full, seqs)
    # a batch step asks one logits row of each stream (the last prompt token or the next one)
    compute = touched_compute_bytes(info, shape, used, flash_attn, facts.dominant_type,
                                    n_outputs=n_parallel,
                                    kq_to_f16=converts_kq_to_f16(cpu_features))
    logits = output_buffer_bytes(info, seqs)
    if logits_all:
        logits = info.n_vocab * 4 * shape.n_batch + info.n_vocab * 4 * used
    return MemoryEstimate(
        weights_mb=round(weights / MIB, 2),
        kv_mb=round(kv / MIB, 2),
        compute_mb=round(compute / MIB, 2),
        logits_mb=round(logits / MIB, 2),
        overhead_mb=round(overhead_bytes(info, n_parallel) / MIB, 2),
    )


def mib(n_bytes: float) -> float:
    """Bytes to MiB."""
    return n_bytes / MIB


def ceil_mb(value: float) -> int:
    """Round a MiB figure up to a whole MiB (what a user can set as a limit)."""
    return math.ceil(value)
