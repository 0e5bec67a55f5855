"""ModelInfo: what the planner needs to know about a model, read from its GGUF header."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgerunner.errors import ModelError

# Architectures whose sliding-window layers follow a fixed period when the GGUF carries no
# explicit per-layer pattern (llama.cpp hard-codes these in llama-model.cpp): every n-th layer
# is a full-attention layer, the rest use the window.
# libstdc++ keeps strings of up to 15 bytes inside the std::string (small-string optimisation)
_SSO_BYTES = 15
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2, "exaone4": 4}
# Architectures whose sliding window llama.cpp applies: their src/models/*.cpp read
# `{arch}.attention.sliding_window` into a windowed cache. A GGUF of another architecture may
# carry the key all the same, and llama.cpp gives every layer a full cache and one mask: Phi-3's
# converter writes config.json's sliding_window (262144, or 2047 for Phi-3-mini-4k), and
# phi3.cpp reads it only to switch it off ("Phi SWA is currently disabled").
_SWA_ARCHS = frozenset({
    "afmoe", "cohere2", "cohere2moe", "deepseek4", "dflash", "dots3note", "exaone-moe",
    "exaone4", "gemma-embedding", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma4-assistant",
    "gpt-oss", "granite_swa", "laguna", "lfm2", "llama4", "maple", "mellum", "mimo2",
    "modern-bert", "muse-glimmer", "olmo2", "plamo3", "smallthinker", "spark2_5", "step35",
})

# Architectures llama.cpp cannot run as a text generator, or that need a different
# runtime path than edgerunner's single-sequence decode.
_UNSUPPORTED = {"clip", "bert", "nomic-bert", "jina-bert-v2", "t5encoder", "wavtokenizer-dec"}


class TensorInfo(BaseModel):
    """One tensor's name, shape (ggml order: row length first) and stored type."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(..., min_length=1, description="GGUF tensor name, e.g. blk.0.attn_q.weight")
    shape: tuple[int, ...] = Field(..., description="Dimensions, row length first (ggml order)")
    type: str = Field(..., description="ggml type name, e.g. Q4_K")
    n_bytes: int = Field(..., ge=0, description="Bytes of tensor data in the file")

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class ModelInfo(BaseModel):
    """Architecture facts from the GGUF header. Synthetic instances drive planner tests."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("model", description="general.name or the file stem")
    architecture: str = Field("llama", description="general.architecture")
    file_type: str = Field("F16", description="Dominant weight type of the source, e.g. F16, Q4_1")
    n_params: int = Field(0, ge=0, description="Parameter count (sum of tensor elements)")
    n_layer: int = Field(..., ge=1, description="Transformer blocks")
    n_embd: int = Field(..., ge=1, description="Hidden size")
    n_ff: int = Field(0, ge=0, description="Feed-forward width")
    n_head: int = Field(..., ge=1, description="Attention heads")
    n_head_kv: list[int] = Field(..., description="KV heads per layer (GQA); 0 = no attention")
    key_length: int = Field(..., ge=1, description="Per-head key width")
    value_length: int = Field(..., ge=1, description="Per-head value width")
    sliding_window: int = Field(0, ge=0, description="Window of SWA layers (0 = none)")
    swa_layers: list[bool] = Field(default_factory=list, description="Per layer: uses the window")
    n_vocab: int = Field(..., ge=1, description="Vocabulary size")
    n_merges: int = Field(0, ge=0, description="BPE merges (tokenizer.ggml.merges)")
    n_long_tokens: int = Field(
        0, ge=0, description="Token strings longer than 15 bytes (held on the heap, not inline)"
    )
    n_ctx_train: int = Field(..., ge=1, description="Training context length")
    file_size: int = Field(0, ge=0, description="Bytes on disk")
    tensors: list[TensorInfo] = Field(default_factory=list, description="Every tensor")
    tensor_types: dict[str, int] = Field(default_factory=dict, description="Tensors per type")
    chat_template: str | None = Field(None, description="tokenizer.chat_template")

    @property
    def n_embd_k_gqa(self) -> list[int]:
        """Per layer key width of the KV cache (kv heads × key length)."""
        return [h * self.key_length for h in self.n_head_kv]

    @property
    def n_embd_v_gqa(self) -> list[int]:
        return [h * self.value_length for h in self.n_head_kv]

    @property
    def fused_qkv(self) -> bool:
        """Q, K and V come from one attn_qkv projection (Phi-3, GPT-NeoX-style checkpoints)."""
        return any(t.name.endswith(".attn_qkv.weight") for t in self.tensors)

    @property
    def has_swa(self) -> bool:
        return self.sliding_window > 0 and any(self.swa_layers)


class _HeaderReader(gguf.GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memmap instead of the memmap itself.

    Same bytes, same fields; np.memmap's per-slice __array_finalize__ made parsing a 49k-token
    vocabulary take ~1.8 s, most of `pack`'s overhead. This is 3x faster.
    """

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: Any = None
    ) -> Any:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = offset + int(np.dtype(dtype).itemsize) * count
        arr = plain[offset:end].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def read_model_info(path: Path) -> ModelInfo:
    """Read a GGUF header with the gguf package and translate it into ModelInfo."""
    if not path.exists():
        raise ModelError(f"model file {path} does not exist", hint="check the path")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a GGUF file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
            hint="convert the model with llama.cpp's convert_hf_to_gguf.py first",
        )
    try:
        reader = _HeaderReader(path, "r")
    except (ValueError, IndexError, OSError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path} is a damaged or truncated GGUF file: {exc}",
            hint="download or convert the model again",
        ) from exc
    size = path.stat().st_size
    tensors = []
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelError(
                f"{path} is truncated: tensor {t.name} ends at byte {end}, file has {size}",
                hint="download or convert the model again",
            )
        tensors.append(TensorInfo(
            name=t.name, shape=tuple(int(x) for x in t.shape),
            type=t.tensor_type.name, n_bytes=int(t.n_bytes),
        ))
    return _info_from_header(reader, path, tensors, size)


def _info_from_header(
    reader: gguf.GGUFReader, path: Path, tensors: list[TensorInfo], size: int
) -> ModelInfo:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelError(f"{path} has no general.architecture key", hint="reconvert the model")
    if arch in _UNSUPPORTED:
        raise ModelError(
            f"{path} is a {arch!r} model, which edgerunner cannot serve as a chat model",
            hint="use a decoder-only text model (llama, qwen2, gemma, phi3, ...)",
        )

    def key(name: str) -> Any:
        return _field(reader, f"{arch}.{name}")

    n_layer = key("block_count")
    n_embd = key("embedding_length")
    n_head = key("attention.head_count")
    if n_layer is None or n_embd is None or n_head is None:
        raise ModelError(
            f"{path}: architecture {arch!r} lacks {arch}.block_count / embedding_length / "
            "attention.head_count, so edgerunner cannot size its memory",
            hint="use a decoder-only transformer GGUF converted by a recent llama.cpp",
        )
    n_head = _first(n_head)
    head_kv_raw = key("attention.head_count_kv")
    if head_kv_raw is None:
        head_kv = [n_head] * n_layer
    elif isinstance(head_kv_raw, list):
        head_kv = [int(h) for h in head_kv_raw]
    else:
        head_kv = [int(head_kv_raw)] * n_layer
    head_dim = n_embd // n_head
    window = int(key("attention.sliding_window") or 0) if arch in _SWA_ARCHS else 0
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else 0)
    if not n_vocab:
        heads = ("output.weight", "token_embd.weight")
        output = next((t for t in tensors if t.name in heads), None)
        n_vocab = output.shape[-1] if output else 1
    merges = reader.fields.get("tokenizer.ggml.merges")
    long_tokens = 0
    if tokens is not None:
        long_tokens = sum(1 for i in tokens.data if len(tokens.parts[i]) > _SSO_BYTES)
    file_type_id = _field(reader, "general.file_type")
    counts = Counter(t.type for t in tensors)
    return ModelInfo(
        name=str(_field(reader, "general.name") or path.stem),
        architecture=arch,
        file_type=_file_type_name(file_type_id, counts),
        n_params=sum(t.n_elements for t in tensors),
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=int(_first(key("feed_forward_length") or 0)),
        n_head=n_head,
        n_head_kv=head_kv,
        key_length=int(key("attention.key_length") or head_dim),
        value_length=int(key("attention.value_length") or head_dim),
        sliding_window=window,
        swa_layers=_swa_layers(arch, n_layer, window, key("attention.sliding_window_pattern")),
        n_vocab=int(n_vocab),
        n_merges=len(merges.data) if merges is not None else 0,
        n_long_tokens=long_tokens,
        n_ctx_train=int(key("context_length") or 2048),
        file_size=size,
        tensors=tensors,
        tensor_types=dict(counts),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, list) else int(value)


def _swa_layers(arch: str, n_layer: int, window: int, pattern: Any) -> list[bool]:
    if window <= 0:
        return [False] * n_layer
    if isinstance(pattern, list):
        return [bool(p) for p in pattern[:n_layer]]
    period = int(pattern) if pattern else _SWA_PERIOD.get(arch, 0)
    if period <= 0:
        return [True] * n_layer  # every layer windowed (e.g. mistral-style SWA)
    return [(i % period) < period - 1 for i in range(n_layer)]


def _file_type_name(file_type_id: Any, counts: Counter[str]) -> str:
    if file_type_id is not None:
        try:
            name = gguf.LlamaFileType(int(file_type_id)).name
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    quantized = {k: v for k, v in counts.items() if k not in ("F32",)}
    return max(quantized, key=lambda k: quantized[k]) if quantized else "F32"
