"""llama.cpp's model and context for a plan: the part of start-up everything else waits for.

It imports only llama_cpp and the plan, so the daemon can start opening the weights as soon as
it knows the plan (`open_in_background`) and import the rest of the serving code meanwhile:
llama.cpp reads and places the weights without holding the GIL, on one core.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from edgerunner.bundle.manifest import RuntimePlan

KV_GGML_TYPE = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}


def llama_kwargs(plan: RuntimePlan, n_threads: int | None = None) -> dict[str, Any]:
    """Llama() keyword arguments for a plan (also used by the raw baseline in tools/)."""
    kv = KV_GGML_TYPE[plan.kv_type]
    return {
        "n_ctx": plan.n_ctx,
        "n_batch": plan.n_batch,
        "n_ubatch": min(plan.n_ubatch, plan.n_batch),
        "n_threads": n_threads or plan.n_threads,
        "n_threads_batch": n_threads or plan.n_threads,
        "type_k": kv,
        "type_v": kv,
        # llama.cpp quantizes the V cache only with flash attention on
        "flash_attn": plan.flash_attn or plan.kv_type != "f16",
        "swa_full": plan.swa_full,
        "use_mmap": plan.mmap,
        "use_mlock": plan.mlock,
        "n_gpu_layers": 0,
        "verbose": False,
    }


def served_plan(plan: RuntimePlan, *, n_parallel: int | None = None,
                prefix_cache_cells: int | None = None) -> RuntimePlan:
    """The plan as served: `serve --parallel` and a prefix cache size applied, so that
    n_seq_max, the slots and the cache budget all come from one place."""
    overrides = {k: v for k, v in {"n_parallel": n_parallel,
                                   "prefix_cache_cells": prefix_cache_cells}.items()
                 if v is not None}
    return plan.model_copy(update=overrides)


class BatchLlama(llama_cpp.Llama):
    """Llama whose model and context parameters take what llama-cpp-python has no keyword for:
    `use_extra_bufts` (the preflight's fallback) and `n_seq_max` with a unified KV cache (the
    sequences continuous batching decodes together). Only its model and context are used: the
    batch API (runtime.batch) generates, not Llama's single-sequence calls."""

    def __init__(self, *args: Any, use_extra_bufts: bool = True, n_seq_max: int = 1,
                 **kwargs: Any) -> None:
        # read by the setters below, which Llama.__init__ goes through before loading
        self._use_extra_bufts = use_extra_bufts
        self._n_seq_max = n_seq_max
        super().__init__(*args, **kwargs)

    # Llama.__init__ assigns self.model_params / self.context_params once and then fills them
    # in, so the assignment is where these fields can be set
    @property
    def model_params(self) -> llama_cpp.llama_model_params:
        return self._model_params

    @model_params.setter
    def model_params(self, params: llama_cpp.llama_model_params) -> None:
        params.use_extra_bufts = self._use_extra_bufts
        self._model_params = params

    @property
    def context_params(self) -> llama_cpp.llama_context_params:
        return self._context_params

    @context_params.setter
    def context_params(self, params: llama_cpp.llama_context_params) -> None:
        params.n_seq_max = self._n_seq_max
        params.kv_unified = True  # all sequences share the n_ctx cells
        self._context_params = params


@dataclass(frozen=True)
class Opened:
    """Weights and context, opened, and what that took."""

    llm: BatchLlama
    seconds: float


def open_weights(model_path: Path, plan: RuntimePlan, n_threads: int | None = None,
                 extra_bufts: bool = True) -> Opened:
    """Load the weights and create the context as the (served) plan says; llama.cpp's
    ValueError or RuntimeError propagates."""
    started = time.perf_counter()
    llm = BatchLlama(str(model_path), **llama_kwargs(plan, n_threads),
                     use_extra_bufts=extra_bufts, n_seq_max=plan.n_seq_max)
    return Opened(llm, time.perf_counter() - started)


def open_in_background(model_path: Path, plan: RuntimePlan, n_threads: int | None = None,
                       extra_bufts: bool = True) -> concurrent.futures.Future[Opened]:
    """`open_weights` on a thread of its own; hand the future to `Engine.load`."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgerunner-weights")
    opening = pool.submit(open_weights, model_path, plan, n_threads, extra_bufts)
    pool.shutdown(wait=False)  # its one thread ends with the load
    return opening
