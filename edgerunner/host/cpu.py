"""The CPUs this process may use and their ISA features, read under a root like host.memory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from edgerunner.host._proc import ancestors, read_text, self_cgroups, v1_group

# cpuinfo flag → profile ISA feature. Arm: "Features" (asimd = NEON on aarch64, asimddp =
# dot product, asimdhp = FP16 arithmetic); armv7 prints "neon"; x86 prints "flags".
FEATURE_FLAGS = {
    "asimd": "neon", "neon": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve",
    "asimdhp": "fp16", "avx": "avx", "avx2": "avx2", "avx512f": "avx512", "f16c": "f16c",
    "fma": "fma",
}
_ORDER = ["neon", "fp16", "dotprod", "i8mm", "sve", "avx", "avx2", "avx512", "f16c", "fma"]


def cpu_features(cpuinfo: str) -> list[str]:
    """ISA features named in /proc/cpuinfo text, in the profile's vocabulary."""
    found = {FEATURE_FLAGS[word] for line in cpuinfo.splitlines()
             if line.lower().startswith(("flags", "features")) for word in line.split()
             if word in FEATURE_FLAGS}
    return [feature for feature in _ORDER if feature in found]


def host_cpu_features(root: Path = Path("/")) -> list[str]:
    """This machine's ISA features (what decides llama.cpp's repack rules here)."""
    return cpu_features(read_text(Path(root) / "proc/cpuinfo") or "")


@dataclass(frozen=True)
class CpuBudget:
    """How many CPUs this process may keep busy, and what limits it."""

    affinity: int  # CPUs in the scheduler affinity mask
    quota: float | None  # cgroup CPU quota in CPUs (cpu.max / cfs_quota_us), None if unlimited
    quota_path: str | None

    @property
    def cpus(self) -> int:
        """Whole CPUs: the affinity mask, capped at the quota (rounded down, at least 1)."""
        if self.quota is None:
            return max(1, self.affinity)
        return max(1, min(self.affinity, math.floor(self.quota + 1e-9)))

    def describe(self) -> str:
        quota = ("no cgroup CPU quota" if self.quota is None else
                 f"cgroup quota {self.quota:g} CPUs ({self.quota_path})")
        return f"{self.affinity} CPUs in the affinity mask, {quota}"


def cpu_budget(root: Path = Path("/"), affinity: int | None = None) -> CpuBudget:
    """The CPUs this process may use: sched_getaffinity and the cgroup quota, v2 and v1."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    quotas = _cgroup_quotas(Path(root))
    quota = min(quotas, default=None)
    return CpuBudget(affinity, quota[0] if quota else None, quota[1] if quota else None)


def decode_threads(planned: int, budget: CpuBudget) -> int:
    """Threads to decode with: the plan's, but never more than the CPUs we may use.

    More threads than CPUs makes ggml's threads wait on each other at every barrier: a 4-thread
    plan on 2 CPUs decoded at 0.59x of 2 threads on this project's test machine.
    """
    return max(1, min(planned, budget.cpus))


def _cgroup_quotas(root: Path) -> list[tuple[float, str]]:
    # every quota from our group up to the root binds; the tightest wins
    found = []
    top = root / "sys/fs/cgroup"
    for hier, controllers, path in self_cgroups(root):
        if hier == "0" and not controllers:
            chain, read = ancestors(top, top / path.lstrip("/")), _v2_quota
        elif "cpu" in controllers and (node := v1_group(top, controllers, path, "cpu")):
            chain, read = ancestors(top, node), _v1_quota
        else:
            continue
        found += [(quota, str(group)) for group in chain if (quota := read(group)) is not None]
    return found


def _v2_quota(node: Path) -> float | None:
    # cpu.max: "max 100000" (unlimited) or "<quota> <period>" in microseconds
    fields = (read_text(node / "cpu.max") or "").split()
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    return int(fields[0]) / int(fields[1]) if int(fields[1]) else None


def _v1_quota(node: Path) -> float | None:
    # cfs_quota_us is -1 when unlimited
    quota = (read_text(node / "cpu.cfs_quota_us") or "").strip()
    period = (read_text(node / "cpu.cfs_period_us") or "").strip()
    if not quota.isdigit() or not period.isdigit() or not int(period):
        return None
    return int(quota) / int(period)
