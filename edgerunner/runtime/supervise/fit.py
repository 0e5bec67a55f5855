"""The start-up fit: the plan as packed if it fits the memory there is, else n_ctx shrunk to
fit (unless strict), else NoFitError (exit code 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgerunner.bundle.manifest import MemoryEstimate, RuntimePlan
from edgerunner.errors import NoFitError

MIN_CTX = 256  # below this a chat template plus a question no longer fits


@dataclass(frozen=True)
class Fit:
    """The plan the daemon will actually load, and why."""

    plan: RuntimePlan
    predicted_mb: float
    headroom_mb: float
    shrunk: bool
    reason: str


def scaled_estimate(memory: MemoryEstimate, plan_ctx: int) -> Callable[[int], float]:
    """Predicted MiB for another n_ctx: the KV cache scales with the cells, the rest stays."""
    def estimate(n_ctx: int) -> float:
        return memory.total_mb - memory.kv_mb + memory.kv_mb * n_ctx / plan_ctx
    return estimate


def fit_plan(
    plan: RuntimePlan,
    estimate: Callable[[int], float],
    headroom_mb: float,
    reserve_mb: float,
    *,
    strict: bool,
    already_resident_mb: float = 0.0,
) -> Fit:
    """Keep the plan if it fits with the reserve; else shrink n_ctx (not with strict) or NoFitError.

    `already_resident_mb` is memory the estimate counts that this process already holds
    (the Python runtime), which is therefore not needed out of the headroom again.
    """
    budget = headroom_mb - reserve_mb + already_resident_mb
    need = estimate(plan.n_ctx)
    if need <= budget:
        return Fit(plan, need, headroom_mb, False,
                   f"plan needs {need:.0f} MiB, {budget:.0f} MiB available after the reserve")
    if strict:
        raise NoFitError(
            f"the plan needs {need:.0f} MiB (n_ctx {plan.n_ctx}) but only {budget:.0f} MiB are "
            f"free after the {reserve_mb:.0f} MiB reserve, and --strict forbids shrinking it",
            "free memory, raise the service's MemoryMax, or drop --strict to shrink n_ctx",
            needed_mb=need,
        )
    # largest multiple of 256 (llama.cpp pads n_ctx to 256 anyway) that fits
    for n_ctx in range((plan.n_ctx - 1) // 256 * 256, MIN_CTX - 1, -256):
        got = estimate(n_ctx)
        if got <= budget:
            return Fit(plan.model_copy(update={"n_ctx": n_ctx}), got, headroom_mb, True,
                       f"plan needs {need:.0f} MiB at n_ctx {plan.n_ctx} but {budget:.0f} MiB "
                       f"are free after the reserve; shrank n_ctx to {n_ctx} ({got:.0f} MiB)")
    floor = estimate(MIN_CTX)
    raise NoFitError(
        f"nothing fits: even n_ctx {MIN_CTX} needs {floor:.0f} MiB, only {budget:.0f} MiB are "
        f"free after the {reserve_mb:.0f} MiB reserve",
        "free memory, lower memory_reserve_mb, or pack a smaller quant for this device",
        needed_mb=floor,
    )
