"""F16 GGUF sources with the real shapes of Llama-3.2-1B and Qwen2.5-0.5B, written for tests.

Each file is what llama.cpp's convert_hf_to_gguf.py writes for the model (metadata keys, tensor
names, shapes and types), with all-zero weights stored as a hole: the header is written with
gguf's GGUFWriter and the tensor data region is a sparse extent of the right length. The planner
reads only the header, so a 2.4 GB source costs a few MB of disk and no time to fill.

The tokenizer is the default model's (SmolLM2's GPT-2 BPE), padded with unused tokens up to the
model's real vocabulary so token_embd has its real shape. `reused_vocab=True` keeps SmolLM2's
49152 tokens instead: that is how the eval-style sources of issue 9 were built, and it is why
that issue quotes 2239/1503 MiB for the 1B on rpi5-4gb rather than this module's real-vocab
numbers (the embedding and logits scale with the vocabulary). llama.cpp loads either.

`cached_info` keeps what read_model_info makes of each file beside it, so the planner tests do
not parse a 150k-token vocabulary on every run.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from json import dumps as json_dumps
from json import loads as json_loads
from pathlib import Path
from typing import Any

import gguf
import numpy as np

import edgerunner.pack.gguf_info
from edgerunner.pack.gguf_info import ModelInfo, read_model_info


@dataclass(frozen=True)
class Shape:
    """A decoder's hyperparameters as its Hugging Face config.json states them."""

    name: str
    arch: str  # llama.cpp architecture: the GGUF key prefix
    size_label: str
    n_layer: int  # num_hidden_layers
    n_embd: int  # hidden_size
    n_ff: int  # intermediate_size
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads
    n_vocab: int  # vocab_size
    n_ctx_train: int  # max_position_embeddings
    rope_theta: float
    rms_eps: float
    qkv_bias: bool = False
    llama3_rope: bool = False  # rope_scaling {"rope_type": "llama3"}: a rope_freqs tensor
    # Fields added later: left out of the cache key while at their default (cached_source), so
    # the files written before them keep their names.
    head_dim_override: int = 0  # config.json's head_dim where it is not hidden / heads (Qwen3)
    tied: bool = True  # tie_word_embeddings: no output.weight
    qk_norm: bool = False  # per-head RMS norms of Q and K (Qwen3, Gemma 3)
    sliding_window: int = 0  # the config's sliding_window, as the converter writes it
    fused: bool = False  # Phi-3: attn_qkv (q|k|v) and ffn_up (gate|up) are single tensors
    vocab: str = "bpe"  # "bpe": the default model's tokenizer padded; "spm": spm_tokenizer()

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.n_embd // self.n_head


# meta-llama/Llama-3.2-1B config.json: hidden_size 2048, 16 layers, 32 heads, 8 KV heads,
# head_dim 64, intermediate_size 8192, vocab 128256, max_position_embeddings 131072,
# rope_theta 500000 with llama3 rope scaling (factor 32, original 8192), rms_norm_eps 1e-5,
# tie_word_embeddings true.
LLAMA_3_2_1B = Shape(
    name="Llama 3.2 1B", arch="llama", size_label="1B", n_layer=16, n_embd=2048, n_ff=8192,
    n_head=32, n_head_kv=8, n_vocab=128256, n_ctx_train=131072, rope_theta=500000.0,
    rms_eps=1e-5, llama3_rope=True,
)
# Qwen/Qwen2.5-0.5B config.json: hidden_size 896, 24 layers, 14 heads, 2 KV heads,
# intermediate_size 4864, vocab 151936, max_position_embeddings 32768, rope_theta 1e6,
# rms_norm_eps 1e-6, tie_word_embeddings true; Qwen2 attention has q/k/v biases.
QWEN2_5_0_5B = Shape(
    name="Qwen2.5 0.5B", arch="qwen2", size_label="0.5B", n_layer=24, n_embd=896, n_ff=4864,
    n_head=14, n_head_kv=2, n_vocab=151936, n_ctx_train=32768, rope_theta=1000000.0,
    rms_eps=1e-6, qkv_bias=True,
)

# Shapes of other architectures and sizes, as their config.json states them:
# Qwen/Qwen3-0.6B: hidden 1024, 28 layers, 16 heads over 8 KV heads of head_dim 128 (not
# hidden / heads), intermediate 3072, vocab 151936, 40960 positions, rope_theta 1e6, tied;
# Qwen3 attention has per-head q/k RMS norms and no biases.
QWEN3_0_6B = Shape(
    name="Qwen3 0.6B", arch="qwen3", size_label="0.6B", n_layer=28, n_embd=1024, n_ff=3072,
    n_head=16, n_head_kv=8, n_vocab=151936, n_ctx_train=40960, rope_theta=1000000.0,
    rms_eps=1e-6, head_dim_override=128, qk_norm=True,
)
# Qwen/Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960.
QWEN2_5_1_5B = Shape(
    name="Qwen2.5 1.5B", arch="qwen2", size_label="1.5B", n_layer=28, n_embd=1536, n_ff=8960,
    n_head=12, n_head_kv=2, n_vocab=151936, n_ctx_train=32768, rope_theta=1000000.0,
    rms_eps=1e-6, qkv_bias=True,
)
# google/gemma-3-1b-it: hidden 1152, 26 layers, 4 heads over 1 KV head of 256, intermediate
# 6912, vocab 262144 (a SentencePiece model), sliding window 512 on 5 of every 6 layers, tied.
GEMMA3_1B = Shape(
    name="Gemma 3 1B", arch="gemma3", size_label="1B", n_layer=26, n_embd=1152, n_ff=6912,
    n_head=4, n_head_kv=1, n_vocab=262144, n_ctx_train=32768, rope_theta=1000000.0,
    rms_eps=1e-6, head_dim_override=256, qk_norm=True, sliding_window=512, vocab="spm",
)
# HuggingFaceTB/SmolLM2-1.7B: hidden 2048, 24 layers, 32 heads, 32 KV heads (no GQA),
# intermediate 8192, vocab 49152 (the default model's tokenizer), rope_theta 130000, tied.
SMOLLM2_1_7B = Shape(
    name="SmolLM2 1.7B", arch="llama", size_label="1.7B", n_layer=24, n_embd=2048, n_ff=8192,
    n_head=32, n_head_kv=32, n_vocab=49152, n_ctx_train=8192, rope_theta=130000.0,
    rms_eps=1e-5,
)
# microsoft/Phi-3.5-mini-instruct: hidden 3072, 32 layers, 32 heads, 32 KV heads, intermediate
# 8192, vocab 32064 (SentencePiece), 131072 positions with LongRoPE factors, untied, fused
# qkv and gate|up; config.json's sliding_window 262144 is written to the GGUF, and llama.cpp
# ignores it (phi3.cpp: "Phi SWA is currently disabled").
PHI3_5_MINI = Shape(
    name="Phi 3.5 mini", arch="phi3", size_label="3.8B", n_layer=32, n_embd=3072, n_ff=8192,
    n_head=32, n_head_kv=32, n_vocab=32064, n_ctx_train=131072, rope_theta=10000.0,
    rms_eps=1e-5, tied=False, fused=True, sliding_window=262144, vocab="spm",
)
# meta-llama/Llama-3.2-3B: hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate 8192,
# vocab 128256, llama3 rope scaling, tied.
LLAMA_3_2_3B = Shape(
    name="Llama 3.2 3B", arch="llama", size_label="3B", n_layer=28, n_embd=3072, n_ff=8192,
    n_head=24, n_head_kv=8, n_vocab=128256, n_ctx_train=131072, rope_theta=500000.0,
    rms_eps=1e-5, llama3_rope=True,
)

F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
# Bumped when the file layout written here changes, so cached files are rewritten.
_LAYOUT_VERSION = 1


def _qkv(b: str, n_embd: int, q: int, kv: int, fused: bool) -> dict[str, Any]:
    """One layer's Q, K and V projections: three tensors, or Phi-3's one attn_qkv (q|k|v)."""
    if fused:
        return {b + "attn_qkv.weight": ((n_embd, q + 2 * kv), F16)}
    return {b + "attn_q.weight": ((n_embd, q), F16), b + "attn_k.weight": ((n_embd, kv), F16),
            b + "attn_v.weight": ((n_embd, kv), F16)}


def _gate_up(b: str, n_embd: int, n_ff: int, fused: bool) -> dict[str, Any]:
    """One layer's gate and up projections: two tensors, or Phi-3's one ffn_up (gate|up)."""
    if fused:
        return {b + "ffn_up.weight": ((n_embd, 2 * n_ff), F16)}
    return {b + "ffn_gate.weight": ((n_embd, n_ff), F16),
            b + "ffn_up.weight": ((n_embd, n_ff), F16)}


def tensors(shape: Shape, n_vocab: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Tensor name -> (shape in ggml order, type), as convert_hf_to_gguf.py writes them."""
    d, kv = shape.head_dim, shape.n_head_kv * shape.head_dim
    out: dict[str, tuple[tuple[int, ...], Any]] = {
        "token_embd.weight": ((shape.n_embd, n_vocab), F16),
        "output_norm.weight": ((shape.n_embd,), F32),
    }
    if not shape.tied:
        out["output.weight"] = ((shape.n_embd, n_vocab), F16)
    if shape.llama3_rope:
        out["rope_freqs.weight"] = ((d // 2,), F32)
    if shape.arch == "phi3":  # LongRoPE's per-dimension factors
        out["rope_factors_long.weight"] = ((d // 2,), F32)
        out["rope_factors_short.weight"] = ((d // 2,), F32)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = ((shape.n_embd,), F32)
        out.update(_qkv(b, shape.n_embd, shape.n_head * d, kv, shape.fused))
        if shape.qkv_bias:
            out[b + "attn_q.bias"] = ((shape.n_head * d,), F32)
            out[b + "attn_k.bias"] = ((kv,), F32)
            out[b + "attn_v.bias"] = ((kv,), F32)
        if shape.qk_norm:
            out[b + "attn_q_norm.weight"] = ((d,), F32)
            out[b + "attn_k_norm.weight"] = ((d,), F32)
        out[b + "attn_output.weight"] = ((shape.n_head * d, shape.n_embd), F16)
        out[b + "ffn_norm.weight"] = ((shape.n_embd,), F32)
        out.update(_gate_up(b, shape.n_embd, shape.n_ff, shape.fused))
        out[b + "ffn_down.weight"] = ((shape.n_ff, shape.n_embd), F16)
        if shape.arch == "gemma3":
            out[b + "post_attention_norm.weight"] = ((shape.n_embd,), F32)
            out[b + "post_ffw_norm.weight"] = ((shape.n_embd,), F32)
    return out


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer keys of a GGUF, as plain values."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    chat_template: str | None


def read_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of an existing GGUF (the default model's)."""
    reader = gguf.GGUFReader(path, "r")

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return Tokenizer(
        model=get("tokenizer.ggml.model"), pre=get("tokenizer.ggml.pre"),
        tokens=list(get("tokenizer.ggml.tokens")),
        token_types=list(get("tokenizer.ggml.token_type")),
        merges=list(get("tokenizer.ggml.merges") or []), bos=get("tokenizer.ggml.bos_token_id"),
        eos=get("tokenizer.ggml.eos_token_id"), chat_template=get("tokenizer.chat_template"),
    )


def write_f16_source(
    shape: Shape, tokenizer: Tokenizer, path: Path, reused_vocab: bool = False
) -> None:
    """Write an F16 GGUF of this shape whose tensor data is a zero-filled hole."""
    n_vocab = len(tokenizer.tokens) if reused_vocab else shape.n_vocab
    if n_vocab < len(tokenizer.tokens):
        raise ValueError(f"{shape.name}'s vocabulary is smaller than the tokenizer's")
    pad = n_vocab - len(tokenizer.tokens)
    tokens = tokenizer.tokens + [f"<|unused_{i}|>" for i in range(pad)]
    types = tokenizer.token_types + [int(gguf.TokenType.UNUSED)] * pad

    tmp = path.with_suffix(f".{os.getpid()}.partial")  # concurrent runs never share one
    w = gguf.GGUFWriter(tmp, shape.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(shape.name)
    w.add_size_label(shape.size_label)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_vocab_size(n_vocab)
    if shape.sliding_window:
        w.add_sliding_window(shape.sliding_window)
    w.add_tokenizer_model(tokenizer.model)
    _add_tokenizer(w, tokenizer, tokens, types, scores=shape.vocab == "spm", chat_template=True)
    data = 0
    for name, (dims, ttype) in tensors(shape, n_vocab).items():
        block, size = gguf.GGML_QUANT_SIZES[ttype]
        n_bytes = int(np.prod(dims)) // block * size
        # GGUFWriter takes numpy's (row-major) shape: the reverse of ggml's.
        dtype = np.dtype(np.float16 if ttype == F16 else np.float32)
        w.add_tensor_info(name, tuple(reversed(dims)), dtype, n_bytes)
        data += gguf.GGUFWriter.ggml_pad(n_bytes, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    out = w.fout[0]
    start = gguf.GGUFWriter.ggml_pad(out.tell(), w.data_alignment)
    out.truncate(start + data)  # the weights: a hole that reads as zeros
    w.close()
    tmp.replace(path)


def cached_source(
    shape: Shape, tokenizer_from: Path, cache_dir: Path | None = None, reused_vocab: bool = False,
) -> Path:
    """The F16 source for this shape, written on first use and then reused.

    Keyed by the shape, the tokenizer file (the default model is pinned by sha256, so its name
    and size identify it), the layout written here and the gguf package's version.
    """
    identity = (_shape_identity(shape), tokenizer_from.name, tokenizer_from.stat().st_size,
                reused_vocab, _LAYOUT_VERSION, version("gguf"))
    key = hashlib.sha256(repr(identity).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = cache_dir or cache / "edgerunner" / "shapes"
    directory.mkdir(parents=True, exist_ok=True)
    stem = shape.name.lower().replace(" ", "-") + ("-reused-vocab" if reused_vocab else "")
    path = directory / f"{stem}-f16-{key}.gguf"
    if not path.exists():
        tokenizer = (spm_tokenizer(shape.n_vocab) if shape.vocab == "spm"
                     else read_tokenizer(tokenizer_from))
        write_f16_source(shape, tokenizer, path, reused_vocab)
    return path


def _shape_identity(shape: Shape) -> dict[str, Any]:
    """asdict(shape) without the fields added after the first sources were cached, while they
    hold their defaults: an old shape's key, and so its file, stays the same."""
    identity = asdict(shape)
    for field in fields(Shape)[fields(Shape).index(_FIRST_ADDED_FIELD):]:
        if identity[field.name] == field.default:
            del identity[field.name]
    return identity


_FIRST_ADDED_FIELD = next(f for f in fields(Shape) if f.name == "head_dim_override")


def cached_info(
    shape: Shape, tokenizer_from: Path, cache_dir: Path | None = None, reused_vocab: bool = False,
) -> ModelInfo:
    """read_model_info of the shape's source, kept as JSON beside it.

    Parsing a 150k-token vocabulary takes the gguf reader seconds; the JSON is keyed by the
    reader's own source, so a change to gguf_info.py reads the GGUF again.
    """
    path = cached_source(shape, tokenizer_from, cache_dir, reused_vocab)
    reader = Path(edgerunner.pack.gguf_info.__file__).read_bytes()
    saved = path.with_name(f"{path.stem}-info-{hashlib.sha256(reader).hexdigest()[:12]}.json")
    if saved.exists():
        return ModelInfo.model_validate_json(saved.read_text())
    info = read_model_info(path)
    partial = saved.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(info.model_dump_json())
    partial.replace(saved)
    return info


# --- the shape matrix: small-layer models with real (random) weights, served for real --------


@dataclass(frozen=True)
class MatrixShape:
    """A decoder small enough to serve in a test, with the vocabulary and attention geometry
    of a real one: what scales with the vocabulary (embeddings, output, logits, tokenizer) is
    real size, the layers are few and narrow."""

    name: str
    arch: str  # "llama", "gemma3" (sliding-window layers, period 6) or "phi3" (fused qkv)
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_layer: int
    tied: bool
    vocab: str  # "bpe": the default model's tokenizer padded; "spm": a generated SentencePiece
    quant: str  # the preset the matrix packs it to
    sliding_window: int = 0

    @property
    def gqa(self) -> int:
        return self.n_head // self.n_head_kv


# Vocabularies 32k/128k/262k, tied and untied output, GQA 1/4/8, head sizes 64/128/256, one
# sliding-window model (Gemma 3 270M's geometry: 640-wide, 4 heads over 1 KV head of 256,
# 262144 tokens, tied). The presets exercise x86's repack rules (Q4_0, Q4_K) and ARM's (Q8_0,
# Q6_K, the tied output copy).
MATRIX = [
    MatrixShape("v32k-untied-gqa1-h64", "llama", 32000, 256, 4, 4, 64, 512, 2, tied=False,
                vocab="spm", quant="Q4_0"),
    MatrixShape("v128k-tied-gqa4-h128", "llama", 128256, 512, 8, 2, 128, 1024, 2, tied=True,
                vocab="bpe", quant="Q8_0"),
    MatrixShape("v128k-untied-gqa8-h64", "llama", 128256, 256, 8, 1, 64, 768, 2, tied=False,
                vocab="bpe", quant="Q4_K_M"),
    MatrixShape("v262k-tied-swa-gqa4-h256", "gemma3", 262144, 640, 4, 1, 256, 2048, 6,
                tied=True, vocab="spm", quant="Q4_K_M", sliding_window=512),
    # Phi-3's layout: one attn_qkv and one gate|up projection, untied, and the sliding_window
    # key its converter writes (262144, as Phi-3.5-mini's) that llama.cpp ignores for phi3.
    # Sixteen heads and a 32k vocabulary: without flash attention KQ outgrows the logits, so
    # the attention layer, not the output, sets the compute buffer.
    MatrixShape("v32k-untied-fusedqkv-gqa4-h64", "phi3", 32000, 1024, 16, 4, 64, 1024, 2,
                tied=False, vocab="spm", quant="Q8_0", sliding_window=262144),
]
_MATRIX_LAYOUT_VERSION = 1


def spm_tokenizer(n_vocab: int) -> Tokenizer:
    """A generated SentencePiece vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then
    letter strings with and without the word-start mark, scored by rank."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 2
    types += [int(gguf.TokenType.BYTE)] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        word, k = "", i
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        for piece in ("\u2581" + word, word):
            if len(tokens) < n_vocab:
                tokens.append(piece)
                types.append(int(gguf.TokenType.NORMAL))
        i += 1
    return Tokenizer(model="llama", pre="default", tokens=tokens, token_types=types, merges=[],
                     bos=1, eos=2, chat_template=None)


def matrix_tensors(shape: MatrixShape) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Tensor name -> (shape in ggml order, type) for a matrix shape."""
    q, kv = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    fused = shape.arch == "phi3"  # attn_qkv = q|k|v, ffn_up = gate|up
    out: dict[str, tuple[tuple[int, ...], Any]] = {
        "token_embd.weight": ((shape.n_embd, shape.n_vocab), F16),
        "output_norm.weight": ((shape.n_embd,), F32),
    }
    if not shape.tied:
        out["output.weight"] = ((shape.n_embd, shape.n_vocab), F16)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = ((shape.n_embd,), F32)
        out.update(_qkv(b, shape.n_embd, q, kv, fused))
        out[b + "attn_output.weight"] = ((q, shape.n_embd), F16)
        out[b + "ffn_norm.weight"] = ((shape.n_embd,), F32)
        out.update(_gate_up(b, shape.n_embd, shape.n_ff, fused))
        out[b + "ffn_down.weight"] = ((shape.n_ff, shape.n_embd), F16)
        if shape.arch == "gemma3":
            out[b + "attn_q_norm.weight"] = ((shape.head_dim,), F32)
            out[b + "attn_k_norm.weight"] = ((shape.head_dim,), F32)
            out[b + "post_attention_norm.weight"] = ((shape.n_embd,), F32)
            out[b + "post_ffw_norm.weight"] = ((shape.n_embd,), F32)
    return out


def write_matrix_source(shape: MatrixShape, tokenizer: Tokenizer, path: Path) -> None:
    """An F16 GGUF of this shape with random weights (norms 1), loadable and servable."""
    if len(tokenizer.tokens) > shape.n_vocab:
        raise ValueError(f"{shape.name}'s vocabulary is smaller than the tokenizer's")
    pad = shape.n_vocab - len(tokenizer.tokens)
    tokens = tokenizer.tokens + [f"<|unused_{i}|>" for i in range(pad)]
    types = tokenizer.token_types + [int(gguf.TokenType.UNUSED)] * pad
    rng = np.random.default_rng(zlib.crc32(shape.name.encode()))
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    w = gguf.GGUFWriter(tmp, shape.arch)
    w.add_name(shape.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(shape.n_layer)
    w.add_context_length(32768)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(shape.n_vocab)
    if shape.sliding_window:
        w.add_sliding_window(shape.sliding_window)
    w.add_tokenizer_model(tokenizer.model)
    _add_tokenizer(w, tokenizer, tokens, types, scores=True, chat_template=False)
    for name, (dims, ttype) in matrix_tensors(shape).items():
        rows = tuple(reversed(dims))  # numpy order
        if ttype == F32:
            w.add_tensor(name, np.ones(rows, dtype=np.float32))
        else:
            data = rng.standard_normal(rows, dtype=np.float32) * np.float32(0.02)
            w.add_tensor(name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)


def matrix_source(shape: MatrixShape, tokenizer_from: Path, cache_dir: Path | None = None) -> Path:
    """The shape's F16 source, generated on first use and kept in the shapes cache."""
    identity = (asdict(shape), tokenizer_from.name, tokenizer_from.stat().st_size,
                _MATRIX_LAYOUT_VERSION, version("gguf"))
    key = hashlib.sha256(repr(identity).encode()).hexdigest()[:12]
    directory = cache_dir or _cache_dir()
    path = directory / f"matrix-{shape.name}-f16-{key}.gguf"
    if not path.exists():
        tokenizer = (spm_tokenizer(shape.n_vocab) if shape.vocab == "spm"
                     else read_tokenizer(tokenizer_from))
        write_matrix_source(shape, tokenizer, path)
    return path


def matrix_model(shape: MatrixShape, tokenizer_from: Path, cache_dir: Path | None = None) -> Path:
    """The shape quantized to its preset by llama.cpp's quantizer (cached next to the source)."""
    import llama_cpp

    from edgerunner.pack.quant_rules import PRESETS

    source = matrix_source(shape, tokenizer_from, cache_dir)
    target = source.with_name(source.stem.replace("-f16-", f"-{shape.quant.lower()}-") + ".gguf")
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = PRESETS[shape.quant]
        params.nthread = 2
        tmp = target.with_suffix(f".{os.getpid()}.partial")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {shape.quant}")
        tmp.replace(target)
    return target


def _cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = cache / "edgerunner" / "shapes"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# What a serving process holds, measured in a fresh interpreter: the daemon's imports, the
# Engine loading the model as the plan says (llama.cpp's log captured), one request filling
# the context, VmHWM read at the end.
_SERVE_CHILD = r"""
import dataclasses, json, sys
args = json.loads(sys.argv[1])
import edgerunner.runtime.supervise.daemon  # everything the daemon imports
from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.pack.llama_log import capture_llama_log
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.protocol import CompletionRequest
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
engine = Engine(args["model"], RuntimePlan.model_validate(args["plan"]), name="matrix",
                n_threads=args["threads"])
with capture_llama_log() as lines:
    engine.load()
loaded = status("VmRSS")
prepared = engine.prepare(CompletionRequest(prompt="a", max_tokens=args["max_tokens"],
                                            temperature=0.0), args["max_tokens"])
first = args["first_token"]
tokens = [first + i % 1000 for i in range(args["prompt_tokens"])]
prepared = dataclasses.replace(prepared, prompt_tokens=tokens)
outcome = engine.run(prepared, None, lambda: False)
print(json.dumps({"log": "".join(lines), "loaded": loaded, "VmHWM": status("VmHWM"),
                  "VmRSS": status("VmRSS"), "filled": outcome.prompt_tokens +
                  outcome.completion_tokens}))
"""

_BUFFER_LINES = {
    "CPU": r"\bCPU model buffer size =\s+([\d.]+) MiB",
    "CPU_Mapped": r"CPU_Mapped model buffer size =\s+([\d.]+) MiB",
    "CPU_REPACK": r"CPU_REPACK model buffer size =\s+([\d.]+) MiB",
    "KV": r"llama_kv_cache: size =\s+([\d.]+) MiB",
    "compute": r"CPU compute buffer size =\s+([\d.]+) MiB",
    "output": r"CPU\s+output buffer size =\s+([\d.]+) MiB",
}


@dataclass
class Served:
    """What one served request cost: VmHWM and llama.cpp's buffers as it logged them (MiB)."""

    vmhwm_mb: float
    loaded_mb: float
    filled: int
    buffers: dict[str, float]
    log: str


def predicted_buffers(info: ModelInfo, quant: str, n_ctx: int, *, flash_attn: bool,
                      features: list[str], mmap: bool) -> dict[str, float]:
    """edgerunner.pack.memory's figure (MiB) for each buffer llama.cpp logs, as buffer_parts
    names them: the resident weights (the repacked copies included), the repack buffer, KV,
    output, compute."""
    from edgerunner.pack.memory import (
        MIB,
        kv_bytes,
        output_buffer_bytes,
        quant_facts,
        reserved_compute_bytes,
    )

    facts = quant_facts(info, quant, features)
    return {"weights": facts.resident(mmap) / MIB, "repack": facts.repacked_bytes / MIB,
            "kv": kv_bytes(info, n_ctx) / MIB, "output": output_buffer_bytes(info) / MIB,
            "compute": reserved_compute_bytes(info, n_ctx, flash_attn=flash_attn) / MIB}


def buffer_parts(buffers: dict[str, float], mmap: bool) -> dict[str, float | None]:
    """llama.cpp's logged buffers (Served.buffers) as predicted_buffers names them; None
    where llama.cpp logged no such buffer."""
    repack = buffers.get("CPU_REPACK", 0.0)
    return {"weights": buffers.get("CPU_Mapped" if mmap else "CPU", 0.0) + repack,
            "repack": repack, "kv": buffers.get("KV"), "output": buffers.get("output"),
            "compute": buffers.get("compute")}


def serve_and_measure(model: Path, plan: Any, prompt_tokens: int, max_tokens: int = 4,
                      threads: int = 2, first_token: int = 300) -> Served:
    """Serve one request of `prompt_tokens` + `max_tokens` in a fresh process, as the daemon
    would; its peak RSS and llama.cpp's buffer sizes."""
    import re
    import subprocess
    import sys

    args = {"model": str(model), "plan": plan.model_dump(), "threads": threads,
            "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "first_token": first_token}
    done = subprocess.run([sys.executable, "-c", _SERVE_CHILD, json_dumps(args)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"serving {model} failed: {done.stderr[-2000:]}")
    got = json_loads(done.stdout.strip().splitlines()[-1])
    buffers: dict[str, float] = {}
    for name, pattern in _BUFFER_LINES.items():
        found = re.findall(pattern, got["log"])
        if found:
            buffers[name] = sum(float(x) for x in found)
    return Served(vmhwm_mb=got["VmHWM"], loaded_mb=got["loaded"], filled=got["filled"],
                  buffers=buffers, log=got["log"])


def f16_from_default(default_model: Path) -> Path:
    """The default model's weights dequantized to F16 by llama.cpp (a Q4_1 -> F16 requantize):
    real weights, a reference for relative quality figures. Cached beside the shapes."""
    import llama_cpp

    from edgerunner.pack.default_model import DEFAULT_MODEL_SHA256
    from edgerunner.pack.quant_rules import PRESETS

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = cache / "edgerunner" / "shapes"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"SmolLM2-135M-Instruct-{DEFAULT_MODEL_SHA256[:12]}-f16.gguf"
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = PRESETS["F16"]
        params.allow_requantize = True
        params.nthread = 2
        tmp = target.with_suffix(f".{os.getpid()}.partial")
        if llama_cpp.llama_model_quantize(str(default_model).encode(), str(tmp).encode(),
                                          params) != 0:
            raise RuntimeError("llama.cpp could not dequantize the default model to F16")
        tmp.replace(target)
    return target


def _add_tokenizer(w: Any, tokenizer: Any, tokens: list[Any], types: list[int], *,
                   scores: bool, chat_template: bool) -> None:
    """The tokenizer's keys, as both synthetic writers put them (scores for a llama-type
    vocabulary and the chat template only where the caller asks)."""
    if tokenizer.pre:
        w.add_tokenizer_pre(tokenizer.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores and tokenizer.model == "llama":
        w.add_token_scores([-float(i) for i in range(len(tokens))])
    if tokenizer.merges:
        w.add_token_merges(tokenizer.merges)
    if tokenizer.bos is not None:
        w.add_bos_token_id(tokenizer.bos)
    if tokenizer.eos is not None:
        w.add_eos_token_id(tokenizer.eos)
    if chat_template and tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
