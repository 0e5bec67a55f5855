"""The running memory guard: how much memory is left (MemAvailable, cgroup v2 or v1, PSI),
whether new work may be admitted, and whether our own RSS broke its ceiling (whether the plan fits
at start: runtime.supervise.fit).

Every path is read under a configurable root (edgerunner.host.memory), so tests point it at a fake
/proc + /sys tree; anything absent (no cgroup limit, no PSI) is simply skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

from edgerunner.host.memory import MemoryProbe, MemorySnapshot
from edgerunner.runtime.protocol import RequestError
from edgerunner.runtime.supervise.ticker import Ticker

logger = logging.getLogger(__name__)

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
