"""llama.cpp's per-tensor type choice for a quantization preset, ported to Python.

A preset such as Q4_K_M does not put every tensor into Q4_K: llama.cpp bumps some attn_v and
ffn_down tensors, keeps the output matrix at Q6_K, falls back to 32-block types for rows whose
length is not a multiple of 256, and never touches 1-D tensors. The file size (and so the
weights' share of RAM) follows from those choices, so they are ported here rule for rule from
llama-cpp-python 0.3.36's vendored `src/llama-quant.cpp` (`tensor_allows_quantization`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`, `llama_ftype_get_default_type`), for
the presets edgerunner offers. `measure_weights_dry_run` in memory.py cross-checks this port
against llama.cpp's own `dry_run`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgerunner.errors import PlanError
from edgerunner.pack.gguf_info import ModelInfo, TensorInfo

# Preset name -> llama_ftype value (include/llama.h), which llama_model_quantize takes.
PRESETS: dict[str, int] = {
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_0": 2, "Q4_1": 3, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_0": 8, "Q5_1": 9, "Q5_K_S": 16, "Q5_K_M": 17,
    "Q6_K": 18, "Q8_0": 7, "F16": 1, "BF16": 32,
}

# llama_ftype_get_default_type: the type most tensors of a preset get.
_DEFAULT_TYPE = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K", "Q8_0": "Q8_0", "F16": "F16", "BF16": "BF16",
}

# tensor_type_fallback: a 256-block type on rows not divisible by 256 becomes this 32-block type.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_UNQUANTIZED = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}

# Substrings of tensor names tensor_allows_quantization() keeps at their source type.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight",
    "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = {"position_embd.weight", "token_types.weight"}

# Architectures whose 80-layer GQA models llama.cpp types as LLM_TYPE_70B (attn_v gets Q5_K).
_TYPE_70B_ARCHS = {"llama", "qwen2"}


def block_info(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def row_bytes(type_name: str, n_per_row: int) -> int:
    """ggml_row_size: bytes of one row of n_per_row elements."""
    block, size = block_info(type_name)
    return n_per_row // block * size


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this shape (ggml order, row length first) stored as type_name."""
    rows = 1
    for dim in shape[1:]:
        rows *= dim
    return rows * row_bytes(type_name, shape[0])


def check_preset(quant: str) -> str:
    """Normalise a preset name, or raise naming the valid ones."""
    name = quant.upper()
    if name not in PRESETS:
        raise PlanError(
            f"unknown quantization preset {quant!r}",
            hint=f"choose one of {', '.join(PRESETS)}",
        )
    return name


@dataclass
class _State:
    """quantize_state_impl: counters that make the choice depend on tensor order."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    n_ffn_down: int = 0
    i_ffn_down: int = 0
    has_tied_embeddings: bool = True


def _layer_of(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _category(name: str) -> str:
    """tensor_get_category."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, category in (
        ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if needle in name:
            return category
    return "other"


def _allows_quantization(t: TensorInfo) -> bool:
    """tensor_allows_quantization with quantize_output_tensor=True, only_copy=False."""
    n_dims = max((i + 1 for i, d in enumerate(t.shape) if d > 1), default=1)  # ggml_n_dims
    if n_dims < 2:
        return False
    name = t.name
    if not name.endswith("weight") or name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(needle in name for needle in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def _n_expert(info: ModelInfo) -> int:
    counts = [t.shape[2] for t in info.tensors if "_exps" in t.name and len(t.shape) >= 3]
    return max(counts, default=1)


def _pick(
    qs: _State, info: ModelInfo, t: TensorInfo, preset: str, new_type: str, n_expert: int
) -> str:
    """llama_tensor_get_type_impl, for edgerunner's presets (no imatrix, no IQ/TQ types)."""
    category = _category(t.name)
    arch = info.architecture
    n_gqa = info.n_head // max(1, max(info.n_head_kv, default=1))
    is_70b = arch in _TYPE_70B_ARCHS and info.n_layer == 80 and n_gqa > 1

    if category == "output" or (qs.has_tied_embeddings and category == "token_embd"):
        block, _ = block_info(new_type)
        if arch == "falcon" or t.shape[0] % block != 0:
            return "Q8_0"
        return new_type if new_type == "Q8_0" else "Q6_K"
    if category == "token_embd":
        return new_type
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        if preset == "Q2_K":
            new_type = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            new_type = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif preset == "Q3_K_L":
            new_type = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M"):
            if _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
                new_type = "Q6_K"
        elif preset == "Q4_K_S" and qs.i_attention_wv < 4:
            new_type = "Q5_K"
        if is_70b and new_type in ("Q3_K", "Q4_K"):
            new_type = "Q5_K"
        if n_expert == 8:
            new_type = "Q8_0"
        qs.i_attention_wv += 1
        return new_type
    if category == "attn_k":
        return "Q8_0" if n_expert == 8 else new_type
    if category == "ffn_down":
        i_layer = _layer_of(t.name) if n_expert > 1 else qs.i_ffn_down
        n_layer = qs.n_ffn_down
        falcon = arch == "falcon"
        if preset == "Q2_K":
            new_type = "Q3_K"
        elif preset == "Q3_K_M":
            new_type = ("Q5_K" if i_layer < n_layer // 16
                        else "Q4_K" if not falcon or _use_more_bits(i_layer, n_layer) else "Q3_K")
        elif preset == "Q3_K_L":
            new_type = "Q4_K" if falcon else "Q5_K"
        elif preset == "Q4_K_M":
            if falcon:
                new_type = ("Q6_K" if i_layer < n_layer // 16
                            else "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new_type = "Q6_K"
        elif preset == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = "Q6_K"
        elif preset == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new_type = "Q5_K"
        qs.i_ffn_down += 1
        return new_type
    if category == "attn_output":
        if arch != "falcon":
            if n_expert == 8:
                if preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new_type = "Q5_K"
            elif preset == "Q2_K":
                new_type = "Q3_K"
            elif preset == "Q3_K_M":
                new_type = "Q4_K"
            elif preset == "Q3_K_L":
                new_type = "Q5_K"
        elif preset == "Q3_K_L":
            new_type = "Q4_K"
        return new_type
    return new_type


def _fallback(t: TensorInfo, new_type: str) -> str:
    """tensor_type_fallback: rows whose length the block size does not divide."""
    block, _ = block_info(new_type)
    if t.shape[0] % block == 0:
        return new_type
    result = _FALLBACK.get(new_type, new_type)
    if t.shape[0] % block_info(result)[0] != 0:
        result = "F16"
    return result


def ordered_tensors(info: ModelInfo) -> list[TensorInfo]:
    """Tensors in llama_model_loader's weights_map order: by block number, then by name."""
    return sorted(info.tensors, key=lambda t: (_layer_of(t.name), t.name))


def tensor_types(info: ModelInfo, quant: str) -> dict[str, str]:
    """The ggml type llama_model_quantize gives each tensor for this preset."""
    preset = check_preset(quant)
    default = _DEFAULT_TYPE[preset]
    tensors = ordered_tensors(info)
    qs = _State(n_ffn_down=info.n_layer)
    for t in tensors:
        category = _category(t.name)
        if category in ("attn_v", "attn_qkv", "attn_kv_b"):
            qs.n_attention_wv += 1
        if category == "output":
            qs.has_tied_embeddings = False
    n_expert = _n_expert(info)
    quantized_preset = default not in _UNQUANTIZED
    result: dict[str, str] = {}
    for t in tensors:
        if not _allows_quantization(t):
            result[t.name] = t.type
            continue
        new_type = default
        if quantized_preset:
            new_type = _fallback(t, _pick(qs, info, t, preset, new_type, n_expert))
        result[t.name] = new_type
    return result
