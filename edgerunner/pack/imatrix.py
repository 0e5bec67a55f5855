"""Importance matrices for low-bit presets, computed the way llama.cpp's `imatrix` tool does.

For every weight matrix a decoder layer multiplies with (MUL_MAT with a `blk.*` weight), the
mean over the calibration text's tokens of the squared activation entering each of its
columns: llama.cpp's quantizer then spends its precision on the columns that carry signal
(llama_model_quantize's `imatrix`, llama_model_imatrix_data). The activations are read through
the context's eval callback (llama_context_params.cb_eval), as tools/imatrix/imatrix.cpp does:
asked first whether a node is wanted, then called again once it is computed.

Files: llama.cpp's GGUF imatrix format, `<weight>.in_sum2` (F32, sums of squares, one row
per matrix) and `<weight>.counts` (F32, how many rows were summed); the mean is their ratio
(tools/quantize/quantize.cpp, load_imatrix).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerunner.errors import ModelError, QuantizeError

logger = logging.getLogger(__name__)

# ggml.h at llama-cpp-python 0.3.36's llama.cpp: enum ggml_op, enum ggml_type, the limits.
GGML_OP_MUL_MAT = 29
GGML_TYPE_F32 = 0
_MAX_DIMS, _MAX_OP_PARAMS, _MAX_SRC, _MAX_NAME = 4, 64, 10, 64
# chunks of the calibration text an imatrix is computed over (of its 14 chunks of 512 tokens)
IMATRIX_CHUNKS = 12
# imatrix.cpp skips batches of fewer than 16 rows
_MIN_ROWS = 16
# Presets at or below this many bits per weight get an importance matrix (llama.cpp's IQ1/IQ2
# presets refuse to quantize without one; its K-quants below 4 bits lose far less with one).
IMATRIX_PRESETS = frozenset({
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
    "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
})


class _GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), the fields the callback reads."""


# a self-referencing ctypes struct gets its fields after the class exists
_GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * _MAX_DIMS),
    ("nb", ctypes.c_size_t * _MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * _MAX_SRC),
    ("view_src", ctypes.POINTER(_GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * _MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def wants_imatrix(quant: str) -> bool:
    """Whether pack computes an importance matrix for this preset by default."""
    return quant.upper() in IMATRIX_PRESETS


@dataclass
class Imatrix:
    """Sums of squared activations per weight matrix, and how many rows went into each."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat, n_cols) f64
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat,) rows
    n_chunks: int = 0
    seconds: float = 0.0

    def means(self) -> dict[str, np.ndarray]:
        """name -> mean squared activation per column, flattened as llama.cpp wants it."""
        out = {}
        for name, sums in self.sums.items():
            # in float32, as the GGUF file holds them: a saved matrix means the same
            counts = np.maximum(self.counts[name], 1).astype(np.float32)
            out[name] = (sums.astype(np.float32) / counts[:, None]).ravel()
        return out

    def add(self, name: str, n_mat: int, rows: np.ndarray) -> None:
        """Accumulate activations rows (n_mat, n_rows, n_cols) entering matrix `name`."""
        squares = np.einsum("mrc,mrc->mc", rows, rows, dtype=np.float64)
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, rows.shape[-1]), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        self.sums[name] += squares
        self.counts[name] += rows.shape[1]


def _activations(src1: _GgmlTensor) -> np.ndarray:
    """src1's data as (ne3 * ne2, ne1, ne0) float32, strides honoured (host memory)."""
    ne, nb = list(src1.ne), list(src1.nb)
    size = nb[3] * ne[3] if ne[3] else 0
    buffer = (ctypes.c_char * size).from_address(src1.data)
    flat = np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8)
    view = np.lib.stride_tricks.as_strided(
        flat.view(np.float32) if nb[0] == 4 and size % 4 == 0 else flat,
        shape=(ne[3], ne[2], ne[1], ne[0]), strides=(nb[3], nb[2], nb[1], nb[0]),
        writeable=False)
    return np.ascontiguousarray(view, dtype=np.float32).reshape(ne[3] * ne[2], ne[1], ne[0])


class _Collector:
    def __init__(self) -> None:
        self.imatrix = Imatrix()
        self.error: BaseException | None = None

    def __call__(self, tensor: int, ask: bool, _user: int) -> bool:
        try:
            t = _GgmlTensor.from_address(tensor)
            if t.op != GGML_OP_MUL_MAT or not t.src[0] or not t.src[1]:
                return not ask
            src0, src1 = t.src[0].contents, t.src[1].contents
            name = src0.name.decode("utf-8", "replace")
            if ask:
                return (name.startswith("blk.") and src1.type == GGML_TYPE_F32
                        and src1.ne[1] >= _MIN_ROWS)
            rows = _activations(src1)
            # a 2D weight (the usual case) sees every (i2, i3) slice of the activations
            n_mat = int(src0.ne[2] * src0.ne[3])
            if n_mat == 1:
                rows = rows.reshape(1, -1, rows.shape[-1])
            self.imatrix.add(name, n_mat, rows)
        except BaseException as exc:  # a Python error must not unwind through C
            self.error = exc
            return False
        return True


def _decode_chunks(
    ctx: Any, batch: Any, chunks: list[list[int]], collector: _Collector,
    progress: Callable[[str, int, int], None] | None,
) -> None:
    """Decode each chunk in a fresh cache, every position an output; the callback collects."""
    import llama_cpp

    for i, chunk in enumerate(chunks):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch.n_tokens = len(chunk)
        for pos, token in enumerate(chunk):
            batch.token[pos], batch.pos[pos] = token, pos
            batch.n_seq_id[pos], batch.seq_id[pos][0] = 1, 0
            batch.logits[pos] = True
        rc = llama_cpp.llama_decode(ctx, batch)
        if collector.error is not None:
            raise collector.error
        if rc != 0:
            raise ModelError(f"llama_decode failed ({rc}) computing the imatrix")
        if progress is not None:
            progress("computing imatrix", i + 1, len(chunks))


def compute_imatrix(
    model_path: Path, chunks: list[list[int]], *, n_threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Imatrix:
    """llama.cpp's importance matrix of `model_path` over token chunks (one context each)."""
    import llama_cpp

    start = time.perf_counter()
    collector = _Collector()
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise ModelError(f"llama.cpp could not load {model_path} to compute an imatrix")
    try:
        n_ctx = max(len(c) for c in chunks)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = n_threads or 1
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context for {model_path}")
        try:
            if progress is not None:
                progress("computing imatrix", 0, len(chunks))
            # every position an output, as imatrix.cpp asks: else the last layer only
            # computes the last token's rows, too few for the callback
            batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            try:
                _decode_chunks(ctx, batch, chunks, collector, progress)
            finally:  # freed when a chunk fails too
                llama_cpp.llama_batch_free(batch)
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    result = collector.imatrix
    result.n_chunks, result.seconds = len(chunks), time.perf_counter() - start
    if not result.sums:
        raise ModelError(f"no matrix multiplication of {model_path} reached the imatrix callback")
    logger.info("imatrix: %d matrices over %d chunks in %.1f s", len(result.sums), len(chunks),
                result.seconds)
    return result


def write_imatrix(imatrix: Imatrix, path: Path, dataset: str = "") -> None:
    """Save in llama.cpp's GGUF imatrix format (what `llama-imatrix -o x.gguf` writes)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    if dataset:
        writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", imatrix.n_chunks)
    for name in sorted(imatrix.sums):
        writer.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32))
        counts = imatrix.counts[name].astype(np.float32).reshape(-1, 1)
        writer.add_tensor(f"{name}.counts", counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> Imatrix:
    """Read llama.cpp's GGUF imatrix format (`<weight>.in_sum2` and `<weight>.counts`)."""
    import gguf

    if not path.is_file():
        raise QuantizeError(f"imatrix file {path} does not exist", hint="check the path")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise QuantizeError(
            f"{path} is not a GGUF imatrix: {exc}",
            hint="pass the .gguf file llama.cpp's `llama-imatrix` writes") from exc
    tensors = {t.name: t for t in reader.tensors}
    result = Imatrix()
    for name, tensor in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        weight = name.removesuffix(".in_sum2")
        counts_tensor = tensors.get(f"{weight}.counts")
        if counts_tensor is None:
            raise QuantizeError(f"{path}: {weight} has in_sum2 but no counts")
        counts = np.asarray(counts_tensor.data, dtype=np.float64).ravel()
        sums = np.asarray(tensor.data, dtype=np.float64).reshape(len(counts), -1)
        result.sums[weight] = sums
        result.counts[weight] = counts.astype(np.int64)
    if not result.sums:
        raise QuantizeError(f"{path} holds no `.in_sum2` tensors: not a GGUF imatrix",
                            hint="pass the .gguf file llama.cpp's `llama-imatrix` writes")
    field_ = reader.fields.get("imatrix.chunk_count")
    result.n_chunks = int(field_.contents()) if field_ is not None else 0
    return result


def imatrix_param(imatrix: Imatrix) -> tuple[object, list[object]]:
    """(pointer for llama_model_quantize_params.imatrix, the buffers it points into: keep them
    alive until quantizing is done). A null name ends the array."""
    import llama_cpp

    means = imatrix.means()
    keep: list[object] = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for i, (name, values) in enumerate(sorted(means.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [data, encoded]
        entries[i].name = encoded
        entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = data.size
    entries[len(means)].name = None
    keep.append(entries)
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), keep
