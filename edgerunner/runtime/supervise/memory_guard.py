"""Memory guards: how much memory is left (MemAvailable, cgroup v2 or v1, PSI), whether the plan
fits at start, whether new work may be admitted, and whether our own RSS broke its ceiling.

Every path is read under a configurable root (edgerunner.host.memory), so tests point it at a fake
/proc + /sys tree; anything absent (no cgroup limit, no PSI) is simply skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edgerunner.bundle.manifest import MemoryEstimate, RuntimePlan
from edgerunner.errors import NoFitError
from edgerunner.host.memory import MemoryProbe, MemorySnapshot
from edgerunner.runtime.protocol import RequestError
from edgerunner.runtime.supervise.ticker import Ticker

logger = logging.getLogger(__name__)

MIB = 2**20
MIN_CTX = 256  # below this a chat template plus a question no longer fits


# ------------------------------------------------------------------------------ start-up fit


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


# ---------------------------------------------------------------------------- running guard

GuardState = Literal["ok", "pressure"]


class MemoryGuard:
    """Polls memory; refuses new work under pressure; reports an RSS over its ceiling once."""

    def __init__(
        self,
        probe: MemoryProbe,
        *,
        reserve_mb: float,
        psi_full_limit: float,
        rss_ceiling_mb: float | None,
        poll_s: float = 1.0,
        on_rss_exceeded: Callable[[float, float], None] | None = None,
        on_poll: Callable[[MemorySnapshot], None] | None = None,
    ) -> None:
        self.probe = probe
        self.reserve_mb = reserve_mb
        self.psi_full_limit = psi_full_limit
        self.rss_ceiling_mb = rss_ceiling_mb
        self.poll_s = poll_s
        self.on_rss_exceeded = on_rss_exceeded
        self.on_poll = on_poll
        self.state: GuardState = "ok"
        self.reason = ""
        self.last: MemorySnapshot | None = None
        self.peak_rss_mb = 0.0
        self.rss_exceeded = False
        self.refusals = 0
        self._ticker = Ticker("memory-guard", poll_s, self.check)

    def check(self) -> MemorySnapshot:
        """Read once and update the state (the poll thread calls this)."""
        snap = self.probe.read()
        self.last = snap
        self.peak_rss_mb = max(self.peak_rss_mb, snap.rss_mb)
        reason = ""
        if snap.headroom_mb < self.reserve_mb:
            reason = (f"only {snap.headroom_mb:.0f} MiB free ({snap.source}), "
                      f"below the {self.reserve_mb:.0f} MiB reserve")
        elif snap.psi_full_avg10 is not None and snap.psi_full_avg10 > self.psi_full_limit:
            reason = (f"memory pressure stall {snap.psi_full_avg10:.1f}% (PSI full avg10) "
                      f"above {self.psi_full_limit:g}%")
        new: GuardState = "pressure" if reason else "ok"
        if new != self.state:
            if new == "pressure":
                logger.warning("memory pressure: %s; refusing new work", reason)
            else:
                logger.warning("memory pressure over; accepting work again")
        self.state, self.reason = new, reason
        ceiling = self.rss_ceiling_mb
        if ceiling is not None and snap.rss_mb > ceiling and not self.rss_exceeded:
            self.rss_exceeded = True
            logger.error("RSS %.0f MiB exceeds the %.0f MiB ceiling", snap.rss_mb, ceiling)
            if self.on_rss_exceeded is not None:
                self.on_rss_exceeded(snap.rss_mb, ceiling)
        if self.on_poll is not None:
            self.on_poll(snap)
        return snap

    def admit(self) -> None:
        """Raise RequestError(memory_pressure) while memory is short (the scheduler's hook)."""
        if self.state == "pressure":
            self.refusals += 1
            retry = float(max(1, math.ceil(self.poll_s * 2)))
            raise RequestError(
                "memory_pressure",
                f"the device is short of memory ({self.reason}); retry in a few seconds",
                retry_after=retry,
            )

    def start(self) -> None:
        """Check now, then poll from a background thread until stop()."""
        self.check()
        self._ticker.start()

    def stop(self) -> None:
        """Stop polling."""
        self._ticker.stop()
