"""Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), with progress."""

from __future__ import annotations

import ctypes
import difflib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp

from edgerunner.bundle.store import reached_size_limit, too_large_error
from edgerunner.errors import BundleError, QuantizeError
from edgerunner.pack.llama_log import llama_log_hook

if TYPE_CHECKING:
    from edgerunner.pack.imatrix import Imatrix

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (tensors done, tensors total) as llama.cpp works through the model."""

# Source precisions llama.cpp quantizes without allow_requantize; anything else is a requantize.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

# llama.cpp reports per-tensor progress only through its log: "[  12/ 272] blk.0.attn_k.weight ..."
_TENSOR_LINE = re.compile(rb"^\[\s*(\d+)/\s*(\d+)\]")
# ggml's log levels in the bundled llama.cpp (llama-cpp-python's own table predates DEBUG=1).
_GGML_LOG_WARN, _GGML_LOG_ERROR = 3, 4

# Below this much free space after a failed write, the failure was the disk filling up.
_FULL_BELOW_BYTES = 1 << 20

@dataclass
class QuantizeResult:
    """What one quantization produced."""

    path: Path
    quant: str
    size: int
    seconds: float
    n_tensors: int
    requantized: bool
    warnings: list[str] = field(default_factory=list)


def ftype_for(quant: str) -> int:
    """llama.cpp's LLAMA_FTYPE_* constant for a preset name like Q4_K_M."""
    name = quant.upper()
    const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    value = getattr(llama_cpp, const, None)
    if not isinstance(value, int):
        raise QuantizeError(
            f"unknown quantization preset {quant!r}",
            hint=f"use one of {', '.join(supported_quants())}",
        )
    return value


def check_architecture(architecture: str, path: Path | None = None) -> None:
    """Refuse, before any work, an architecture that llama.cpp's converter tables do not know."""
    import gguf

    known = sorted(set(gguf.MODEL_ARCH_NAMES.values()))
    if architecture in known:
        return
    close = difflib.get_close_matches(architecture, known, n=3, cutoff=0.6)
    where = f"{path}: " if path else ""
    raise QuantizeError(
        f"{where}unknown model architecture {architecture!r}: llama.cpp cannot load or quantize it",
        hint=(f"did you mean {', '.join(close)}? " if close else "")
        + "check general.architecture, or convert the model with a recent llama.cpp",
    )


def supported_quants() -> list[str]:
    """Every preset name the installed llama.cpp knows."""
    names = ["F32"]
    for const in dir(llama_cpp):
        if const.startswith("LLAMA_FTYPE_MOSTLY_"):
            names.append(const.removeprefix("LLAMA_FTYPE_MOSTLY_"))
    return names


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    *,
    n_threads: int | None = None,
    progress: Progress | None = None,
    source_type: str | None = None,
    imatrix: Imatrix | None = None,
) -> QuantizeResult:
    """Quantize src into dst with preset `quant`; dst is removed again if llama.cpp fails.

    source_type is the source's file type (e.g. "F16", "Q4_1"); given it, no header is re-read.
    `imatrix` (pack.imatrix) is handed to llama.cpp's quantizer as llama_model_imatrix_data.
    """
    ftype = ftype_for(quant)
    if not src.is_file():
        raise QuantizeError(f"model file {src} does not exist", hint="check the path")
    if source_type is None:
        from edgerunner.pack.gguf_info import read_model_info

        source_type = read_model_info(src).file_type
    requantize = source_type.upper() not in FLOAT_TYPES
    warnings = []
    if requantize:
        message = (
            f"requantizing a quantized model ({source_type} -> {quant.upper()}): quality suffers, "
            "and a larger preset cannot restore precision the source lost; pack from an F16/BF16 "
            "GGUF for best results"
        )
        logger.info(message)  # returned to the caller, who decides how loudly to say it
        warnings.append(message)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or 0
    params.allow_requantize = requantize
    keep_alive: list[object] = []
    if imatrix is not None:
        from edgerunner.pack.imatrix import imatrix_param

        pointer, keep_alive = imatrix_param(imatrix)
        params.imatrix = pointer

    log = _LogHook(progress)
    start = time.perf_counter()
    with llama_log_hook(log.on_log):
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    seconds = time.perf_counter() - start
    del keep_alive
    if rc != 0:
        full = _disk_full(dst.parent)
        written = _size(dst)
        dst.unlink(missing_ok=True)
        # llama.cpp only says "iostream error" for EFBIG too; a file that stopped exactly at a
        # size limit hit it (the kernel writes up to the limit before it refuses).
        if reached_size_limit(written):
            raise too_large_error(dst, cleanup="the partial file was removed")
        if full:
            # A full disk is an output problem, reported like every other failed bundle write.
            raise BundleError(
                f"disk full while llama.cpp wrote {dst}",
                hint="free disk space or pass a different -o; the partial file was removed",
            )
        cause = log.errors[-1] if log.errors else f"llama_model_quantize returned {rc}"
        raise QuantizeError(
            f"llama.cpp could not quantize {src.name} to {quant}: {cause}",
            hint=_hint_for(cause),
        )
    size = dst.stat().st_size
    logger.info("quantized %s -> %s (%s, %d tensors, %.2f s, %d bytes)",
                src, dst, quant, log.total, seconds, size)
    return QuantizeResult(
        path=dst, quant=quant.upper(), size=size, seconds=seconds,
        n_tensors=log.total, requantized=requantize, warnings=warnings,
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _disk_full(directory: Path) -> bool:
    # llama.cpp only says "iostream error"; a write that failed for lack of space leaves the
    # filesystem full to the last block, because the kernel writes short before it refuses.
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _FULL_BELOW_BYTES


def _hint_for(cause: str) -> str:
    if "requantiz" in cause.lower():
        return "pack from an F16/BF16 GGUF"
    return "check that the source is a complete GGUF that llama.cpp can load"


class _LogHook:
    """Counts llama.cpp's per-tensor log lines for progress; keeps warnings and errors."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.done = 0
        self.total = 0
        self.errors: list[str] = []

    def on_log(self, level: int, text: bytes) -> None:
        match = _TENSOR_LINE.match(text)
        if match:
            self.done, self.total = int(match.group(1)), int(match.group(2))
            if self.progress is not None:
                self.progress(self.done, self.total)
            return
        if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR):
            line = text.decode("utf-8", "replace").strip()
            logger.debug("llama.cpp: %s", line)
            if level == _GGML_LOG_ERROR and line:
                self.errors.append(line)
