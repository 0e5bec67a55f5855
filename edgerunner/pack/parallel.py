"""How many streams decode together (n_parallel) and how many cells the prefix cache gets.

Both share the plan's n_ctx cells (a unified KV cache), so neither grows the KV cache: the
streams cost their output rows, samplers and batch arithmetic, the prefix cache its cells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgerunner.bundle.manifest import PREFIX_CACHE_ENTRIES, MemoryEstimate, RuntimePlan
from edgerunner.errors import PlanError

PARALLEL_CHOICES = (1, 2, 4, 8)
# A slot's share of the cells left after the prefix cache: one prompt batch (n_batch 512,
# what the plan evaluates a prompt in) and, behind a cached system prompt, a question and an
# answer of a few hundred tokens each. Less, and a fully loaded daemon turns requests away
# with context_length_exceeded that a single stream would have served.
MIN_SLOT_CELLS = 512
# Most chat apps' system prompts run to about a thousand tokens; the cache is worth keeping
# when it can hold one and still leave the requests half the cells.
SYSTEM_PROMPT_CELLS = 1024
# Home Assistant's Assist prompt with its tool list is about 3,600 tokens (25 entities, 20
# tools; tools/bench/bench_tools.py --prompt-only): a context that can give it these cells and
# still leave the requests half does, or every Assist turn evaluates it again.
TOOLS_PROMPT_CELLS = 4096
PREFIX_CACHE_SHARE = 4  # n_ctx // 4: a bounded share, the rest is the streams'
# Aggregate speed must grow at least this much for one more doubling of the streams to pay
# for its memory and the slower streams it makes.
MIN_AGGREGATE_GAIN = 1.05

Memory = Callable[[int, int], MemoryEstimate]  # (n_parallel, n_seq_max) -> estimate


@dataclass
class ParallelChoice:
    """n_parallel and the prefix cache for one plan, with what they are predicted to cost."""

    n_parallel: int
    prefix_cache_cells: int
    memory: MemoryEstimate
    stream_tps: float
    aggregate_tps: float
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def prefix_cache_cells(n_ctx: int) -> int:
    """Cells for the shared-prefix cache: a quarter of n_ctx, raised to hold a system prompt
    with tools (or, below that, a plain one) when that leaves the requests half the cells;
    none below that."""
    if n_ctx < 2 * SYSTEM_PROMPT_CELLS:
        return 0
    prompt = TOOLS_PROMPT_CELLS if n_ctx >= 2 * TOOLS_PROMPT_CELLS else SYSTEM_PROMPT_CELLS
    return max(n_ctx // PREFIX_CACHE_SHARE, prompt)


def n_seq_max(n_parallel: int, prefix_cells: int) -> int:
    """The sequences llama.cpp's context is made for (RuntimePlan.n_seq_max's rule)."""
    return RuntimePlan(n_parallel=n_parallel, prefix_cache_cells=prefix_cells).n_seq_max


def choose_parallel(
    n_ctx: int, budget_mb: float, min_tps: float, stream_tps: Callable[[int], float],
    memory: Memory, forced: int | None = None,
) -> ParallelChoice:
    """The most streams that each decode at ≥ min_tps, fit the budget, get ≥ MIN_SLOT_CELLS
    each and still add aggregate speed; `forced` overrides (with warnings when it breaks one)."""
    prefix = prefix_cache_cells(n_ctx)
    if prefix and memory(1, n_seq_max(1, prefix)).total_mb > budget_mb:
        prefix = 0
        reasons = [f"prefix cache off: the output rows of its {PREFIX_CACHE_ENTRIES} sequences "
                   f"do not fit {budget_mb:.0f} MiB next to n_ctx {n_ctx}"]
    else:
        reasons = [_prefix_reason(n_ctx, prefix)]
    slot_cells = n_ctx - prefix
    if forced is not None:
        choice = _forced(forced, n_ctx, prefix, budget_mb, min_tps, stream_tps, memory)
        choice.reasons = [*reasons, *choice.reasons]
        return choice

    best = 1
    why_not = ""
    for n in PARALLEL_CHOICES[1:]:
        est = memory(n, n_seq_max(n, prefix))
        if slot_cells // n < MIN_SLOT_CELLS:
            why_not = (f"{n} would leave each {slot_cells // n} cells < {MIN_SLOT_CELLS} of the "
                       f"{slot_cells} the prefix cache leaves")
        elif stream_tps(n) < min_tps:
            why_not = f"{n} would decode each at {stream_tps(n):.1f} tok/s < {min_tps:g}"
        elif est.total_mb > budget_mb:
            why_not = f"{n} would need {est.total_mb:.0f} MiB > {budget_mb:.0f} MiB"
        elif n * stream_tps(n) < MIN_AGGREGATE_GAIN * best * stream_tps(best):
            why_not = (f"{n} would add no speed: {n * stream_tps(n):.1f} tok/s in all, as "
                       f"{best} (the batch's arithmetic is the limit)")
        else:
            best, why_not = n, ""
            continue
        break
    est = memory(best, n_seq_max(best, prefix))
    tps = stream_tps(best)
    what = (f"n_parallel {best}: {best} streams at {tps:.1f} tok/s each, "
            f"{best * tps:.1f} tok/s in all" if best > 1 else "n_parallel 1: one stream")
    reasons.append(what + (f"; {why_not}" if why_not else ""))
    return ParallelChoice(best, prefix, est, round(tps, 2), round(best * tps, 2), reasons)


def _forced(
    n: int, n_ctx: int, prefix: int, budget_mb: float, min_tps: float,
    stream_tps: Callable[[int], float], memory: Memory,
) -> ParallelChoice:
    est = memory(n, n_seq_max(n, prefix))
    tps = stream_tps(n)
    warnings = []
    if (n_ctx - prefix) // n < MIN_SLOT_CELLS:
        warnings.append(f"--parallel {n} leaves each stream {(n_ctx - prefix) // n} of "
                        f"{n_ctx - prefix} cells when all are busy (< {MIN_SLOT_CELLS})")
    if tps < min_tps:
        warnings.append(f"--parallel {n}: each stream is predicted at {tps:.1f} tok/s "
                        f"< {min_tps:g}")
    if est.total_mb > budget_mb:
        raise PlanError(
            f"--parallel {n} needs {est.total_mb:.0f} MiB at n_ctx {n_ctx}, and "
            f"{budget_mb:.0f} MiB are available",
            hint="lower --parallel, or --max-ctx to free memory for the streams",
        )
    reason = (f"n_parallel {n}: forced with --parallel; {tps:.1f} tok/s each, "
              f"{n * tps:.1f} tok/s in all")
    return ParallelChoice(n, prefix, est, round(tps, 2), round(n * tps, 2), [reason], warnings)


def _prefix_reason(n_ctx: int, prefix: int) -> str:
    if prefix == 0:
        return (f"prefix cache off: n_ctx {n_ctx} < {2 * SYSTEM_PROMPT_CELLS} cannot hold a "
                f"{SYSTEM_PROMPT_CELLS}-token system prompt and leave requests half the cells")
    return (f"prefix cache {prefix} cells (of n_ctx {n_ctx}, up to {PREFIX_CACHE_ENTRIES} "
            "prompts): a repeated system prompt is evaluated once, not per request")
