"""Route llama.cpp's log to Python for a block of code (some facts are only logged).

llama.cpp has one process-wide log callback, so every user goes through `llama_log_hook`: one
lock keeps two hooks from stealing the callback from each other, and the block's end hands the
log back to llama-cpp-python's own handler.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_lock = threading.Lock()

LogHandler = Callable[[int, bytes], None]  # (ggml log level, raw text of one log call)


@contextmanager
def llama_log_hook(on_log: LogHandler) -> Iterator[None]:
    """Send everything llama.cpp logs inside the block to `on_log`."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def _forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        on_log(level, text)

    with _lock:
        llama_cpp.llama_log_set(_forward, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect what llama.cpp logs inside the block, as text."""
    chunks: list[str] = []
    with llama_log_hook(lambda _level, text: chunks.append(text.decode("utf-8", "replace"))):
        yield chunks
