"""Temperature and power state from sysfs, and the policy that slows the daemon when it runs hot.

Sources, all optional (a value is None when its file is absent or unreadable):
- ``/sys/class/thermal/thermal_zone*/{type,temp}``: temp in millidegrees Celsius;
- Raspberry Pi firmware ``get_throttled`` (``/sys/devices/platform/soc/soc:firmware/get_throttled``
  on Pi 1-4 kernels, under ``soc@<addr>`` on Pi 5): the mailbox word printed as hex without 0x,
  bits as `vcgencmd get_throttled` documents them (see THROTTLE_BITS in runtime/health.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from edgerunner.profiles import ThermalSpec
from edgerunner.runtime.health import THROTTLE_BITS as THROTTLE_BITS
from edgerunner.runtime.health import ThermalLevel, ThermalState, ThrottleFlags

logger = logging.getLogger(__name__)

_THROTTLED_GLOBS = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/soc*/soc*:firmware/get_throttled",
    "sys/devices/platform/*firmware/get_throttled",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThermalZone(_Model):
    """One /sys/class/thermal/thermal_zone* entry."""

    zone: str = Field(..., description="Directory name, e.g. thermal_zone0")
    type: str = Field("", description="What the zone measures, e.g. cpu-thermal")
    temp_c: float | None = Field(None, description="Temperature in °C (None if unreadable)")


class ThermalReading(_Model):
    """Every temperature and power flag this machine exposes, read once."""

    zones: list[ThermalZone] = Field(default_factory=list, description="Every thermal zone")
    max_c: float | None = Field(None, description="Hottest zone in °C (None: no sensor)")
    throttled: ThrottleFlags | None = Field(None, description="Pi firmware flags where present")


def read_thermal(root: str | Path = "/") -> ThermalReading:
    """Read every thermal zone and the Pi throttled flags under ``root`` (a fake tree in tests)."""
    base = Path(root)
    zones = []
    for folder in sorted(base.glob("sys/class/thermal/thermal_zone*"), key=_zone_order):
        temp = _read(folder / "temp")
        temp_c = None
        if temp is not None:
            try:
                temp_c = int(temp) / 1000.0
            except ValueError:
                logger.debug("unparsable temperature %r in %s", temp, folder)
        kind = _read(folder / "type") or ""
        zones.append(ThermalZone(zone=folder.name, type=kind, temp_c=temp_c))
    temps = [z.temp_c for z in zones if z.temp_c is not None]
    return ThermalReading(
        zones=zones, max_c=max(temps) if temps else None, throttled=_read_throttled(base)
    )


def _zone_order(path: Path) -> tuple[int, str]:
    suffix = path.name.removeprefix("thermal_zone")
    return (int(suffix), "") if suffix.isdigit() else (1 << 30, path.name)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:  # absent, or a zone whose driver refuses reads (EINVAL/ENODATA)
        return None


def _read_throttled(base: Path) -> ThrottleFlags | None:
    for pattern in _THROTTLED_GLOBS:
        for path in sorted(base.glob(pattern)):
            text = _read(path)
            if text is None:
                continue
            try:
                return ThrottleFlags.from_word(int(text, 16))
            except ValueError:
                logger.debug("unparsable get_throttled %r in %s", text, path)
    return None


class ThermalGovernor:
    """Trades speed for temperature: drop a thread per reading above the soft limit, add one back
    per reading once it is ``hysteresis_c`` below, and rest between requests when the firmware
    throttles or the throttle temperature is reached.

    Fewer threads draw less power while decode, which is memory-bound, slows less than in
    proportion; a pause lets the SoC cool when even one thread is too much.
    """

    def __init__(
        self, spec: ThermalSpec, base_threads: int, hysteresis_c: float = 5.0,
        hot_pause_s: float = 2.0,
    ) -> None:
        if base_threads < 1:
            raise ValueError("base_threads must be at least 1")
        self.spec = spec
        self.base_threads = base_threads
        self.hysteresis_c = hysteresis_c
        self.hot_pause_s = hot_pause_s
        self.state = ThermalState(level="unknown", threads=base_threads)

    def update(self, reading: ThermalReading) -> ThermalState:
        """Fold one reading into the state and return it."""
        temp = reading.max_c
        flags = reading.throttled
        threads = self.state.threads
        if temp is not None and temp >= self.spec.throttle_c:
            new = ThermalState(level="hot", threads=1, pause_s=self.hot_pause_s, temp_c=temp,
                               reason=f"{temp:.1f}°C ≥ throttle {self.spec.throttle_c:g}°C")
        elif flags is not None and flags.slowing_now:
            new = ThermalState(level="hot", threads=1, pause_s=self.hot_pause_s, temp_c=temp,
                               reason=f"firmware throttling (get_throttled 0x{flags.raw:x})")
        elif temp is not None and temp >= self.spec.soft_limit_c:
            new = ThermalState(level="warm", threads=max(1, threads - 1), temp_c=temp,
                               reason=f"{temp:.1f}°C ≥ soft limit {self.spec.soft_limit_c:g}°C")
        elif flags is not None and flags.under_voltage:
            # A weak supply browns out under full load: draw less until it recovers.
            new = ThermalState(level="warm", threads=max(1, threads - 1), temp_c=temp,
                               reason="under-voltage")
        elif temp is None:
            new = ThermalState(level="unknown", threads=min(self.base_threads, threads + 1),
                               reason="no temperature sensor")
        elif temp <= self.spec.soft_limit_c - self.hysteresis_c:
            threads = min(self.base_threads, threads + 1)
            level: ThermalLevel = "normal" if threads == self.base_threads else "warm"
            new = ThermalState(level=level, threads=threads, temp_c=temp,
                               reason="" if level == "normal" else "cooling down")
        else:  # inside the hysteresis band: hold the thread count, stop pausing
            level = "normal" if threads == self.base_threads else "warm"
            new = ThermalState(level=level, threads=threads, temp_c=temp,
                               reason="" if level == "normal" else "holding until it cools")
        if new.threads != self.state.threads or new.level != self.state.level:
            logger.info("thermal: %s, %d threads%s (%s)", new.level, new.threads,
                        f", {new.pause_s:g}s pause" if new.pause_s else "", new.reason or "ok")
        self.state = new
        return new

