"""llama.cpp's per-tensor type choice for a quantization preset, ported to Python.

A preset such as Q4_K_M does not put every tensor into Q4_K: llama.cpp bumps some attn_v and
ffn_down tensors, keeps the output matrix at Q6_K, falls back to 32-block types for rows whose
length is not a multiple of 256, and never touches 1-D tensors. The file size (and so the
weights' share of RAM) follows from those choices, so they are ported here rule for rule from
llama-cpp-python 0.3.36's vendored `src/llama-quant.cpp` (`tensor_allows_quantization`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`, `llama_ftype_get_default_type`), for
the presets edgerunner offers. `measure_weights_dry_run` in memory.py cross-checks this port
against llama.cpp's own `dry_run`.

Some choices depend on whether the quantizer is given an importance matrix (IQ3_XXS's attn_v and
ffn_down; Q4_0's and Q5_0's first ffn_down layers), so tensor_types takes that too. The IQ2/IQ3
presets need one: llama.cpp refuses IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS tensors without it.
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
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29,
    "IQ3_XXS": 23, "IQ3_XS": 22, "IQ3_S": 26, "IQ3_M": 27,
}
# Presets llama.cpp quantizes only with an importance matrix (tensor_requires_imatrix: their
# IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS tensors), or that are meant for one (IQ3_S/IQ3_M are IQ3_XXS's
# siblings, measured in llama.cpp's tables with one): candidates only when an imatrix is used.
IMATRIX_ONLY = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
                          "IQ3_M"})
_IQ2 = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"})

# llama_ftype_get_default_type: the type most tensors of a preset get.
_DEFAULT_TYPE = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K", "Q8_0": "Q8_0", "F16": "F16", "BF16": "BF16",
    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S",
    "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
}

# tensor_type_fallback: a 256-block type on rows not divisible by 256 becomes this 32-block type.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL",
             "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL"}

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
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True
    has_imatrix: bool = False


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
    """llama_tensor_get_type_impl, for edgerunner's presets (no IQ1/IQ4/TQ types)."""
    category = _category(t.name)
    arch = info.architecture
    n_gqa = info.n_head // max(1, max(info.n_head_kv, default=1))
    is_70b = arch in _TYPE_70B_ARCHS and info.n_layer == 80 and n_gqa > 1
    iq2_s_m = preset in ("IQ2_S", "IQ2_M")

    if category == "output" or (qs.has_tied_embeddings and category == "token_embd"):
        block, _ = block_info(new_type)
        if arch == "falcon" or t.shape[0] % block != 0:
            return "Q8_0"
        if preset in _IQ2 or preset == "IQ3_XXS":
            return "Q5_K"
        return new_type if new_type == "Q8_0" else "Q6_K"
    if category == "token_embd":
        if preset in ("IQ2_XXS", "IQ2_XS"):
            return "Q2_K"
        if iq2_s_m or preset == "IQ3_XXS":
            return "IQ3_S"
        return new_type
    if preset in _IQ2:
        if category in ("attn_v", "attn_qkv", "attn_kv_b"):
            new_type = "Q4_K" if n_gqa >= 4 or n_expert >= 4 else "IQ3_S" if iq2_s_m else "Q2_K"
            qs.i_attention_wv += 1
        elif n_expert == 8 and category == "attn_k":
            new_type = "Q4_K"
        elif category == "ffn_down":
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new_type = "IQ3_S" if iq2_s_m else "Q2_K"
            qs.i_ffn_down += 1
        elif category == "attn_output":
            if n_expert == 8:
                new_type = "Q5_K"
            elif iq2_s_m:
                new_type = "IQ3_S"
        return new_type
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        if preset == "Q2_K":
            new_type = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif preset == "IQ3_XXS":
            new_type = "Q4_K" if n_gqa >= 4 else "IQ3_XXS" if qs.has_imatrix else "IQ3_S"
        elif (preset in ("IQ3_XS", "IQ3_S") and n_gqa >= 4) or preset == "IQ3_M":
            new_type = "Q4_K"
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
        if n_expert == 8:
            return "Q8_0"
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(preset, new_type)
    if category == "attn_q":
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(preset, new_type)
    if category == "ffn_down":
        i_layer = _layer_of(t.name) if n_expert > 1 else qs.i_ffn_down
        n_layer = qs.n_ffn_down
        falcon = arch == "falcon"
        if preset == "Q2_K":
            new_type = "Q3_K"
        elif preset == "IQ3_XXS" and not qs.has_imatrix:
            new_type = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
        elif preset == "Q3_K_M":
            new_type = ("Q5_K" if i_layer < n_layer // 16
                        else "Q4_K" if not falcon or _use_more_bits(i_layer, n_layer) else "Q3_K")
        elif preset == "IQ3_M" and (i_layer < n_layer // 8 or (
                n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new_type = "Q4_K"
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
        elif preset in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            # llama.cpp guards the first ffn_down layers against Q4_0/Q5_0 with an imatrix
            new_type = "Q4_1" if preset == "Q4_0" else "Q5_1"
        qs.i_ffn_down += 1
        return new_type
    if category == "attn_output":
        if arch != "falcon":
            if n_expert == 8:
                if preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ3_XS",
                              "IQ3_XXS", "IQ3_S", "IQ3_M"):
                    new_type = "Q5_K"
            else:
                new_type = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K",
                            "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(preset, new_type)
        elif preset == "Q3_K_L":
            new_type = "Q4_K"
        return new_type
    if category in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if category == "ffn_gate" else "i_ffn_up"
        i_layer = _layer_of(t.name) if n_expert > 1 else getattr(qs, counter)
        n_layer = qs.n_ffn_down  # n_ffn_gate = n_ffn_up = n_ffn_down: the layer count
        if preset == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "IQ3_XXS"
        setattr(qs, counter, getattr(qs, counter) + 1)
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


def tensor_types(info: ModelInfo, quant: str, imatrix: bool | None = None) -> dict[str, str]:
    """The ggml type llama_model_quantize gives each tensor for this preset (`imatrix`: the
    quantizer is given an importance matrix; None: as pack does, for the IMATRIX_ONLY presets).
    A user's own imatrix on Q4_0/Q5_0 (pack --imatrix) bumps their first ffn_down layers to
    Q4_1/Q5_1: imatrix=True says so; the plan assumes pack's default."""
    preset = check_preset(quant)
    default = _DEFAULT_TYPE[preset]
    tensors = ordered_tensors(info)
    if imatrix is None:  # pack's default: an importance matrix for the presets made for one
        imatrix = preset in IMATRIX_ONLY
    qs = _State(n_ffn_down=info.n_layer, has_imatrix=imatrix)
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
