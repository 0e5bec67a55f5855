"""Capture llama.cpp's log output for a block of code (some numbers are only logged)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()


@contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect what llama.cpp logs inside the block, then restore llama-cpp-python's logger."""
    import llama_cpp
    from llama_cpp import _logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def _collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", errors="replace"))

    with _lock:
        llama_cpp.llama_log_set(_collect, ctypes.c_void_p(0))
        try:
            yield chunks
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
