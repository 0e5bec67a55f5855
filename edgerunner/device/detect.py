"""`profiles detect`: a DeviceProfile for the machine this runs on, read from /proc and /sys.

Every file is read under a configurable root so tests can hand in a fake tree; anything missing
falls back to what Python itself can see (platform, os.cpu_count) or the profile's defaults.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgerunner.host.cpu import cpu_features
from edgerunner.host.memory import cgroup_limits, meminfo_kb
from edgerunner.profiles import DeviceProfile

logger = logging.getLogger(__name__)

# /proc/cpuinfo "CPU part" for Arm Ltd (implementer 0x41) cores, from Arm's TRMs (MIDR_EL1).
ARM_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
    0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77", 0xD40: "Neoverse-V1", 0xD41: "Cortex-A78",
    0xD42: "Cortex-A78AE", 0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710",
    0xD48: "Cortex-X2", 0xD49: "Neoverse-N2", 0xD4D: "Cortex-A715", 0xD4E: "Cortex-X3",
    0xD4F: "Neoverse-V2", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720", 0xD82: "Cortex-X4",
}

# 128 MiB is far past any of these boards' caches (a few MiB of L2/L3) while keeping the page
# faults of the first touch, which cost more than the copies, well under a second.
BANDWIDTH_BYTES = 128 * 2**20
BANDWIDTH_REPS = 3


def detect_profile(root: str | Path = "/", measure: bool = True) -> DeviceProfile:
    """A profile for this machine; ``measure=False`` skips the memory bandwidth test."""
    base = Path(root)
    cpuinfo = _read(base / "proc/cpuinfo") or ""
    processors = _parse_cpuinfo(cpuinfo)
    model = _device_model(base, cpuinfo)
    arch = _arch(cpuinfo)
    big, little, core, max_mhz = _cores(base, processors, cpuinfo)
    mem_total, mem_available = _meminfo(base)
    limit = _cgroup_limit_mb(base)
    total = min(mem_total, limit) if limit else mem_total
    # Inside a cgroup limit the other services live outside it; otherwise keep what the OS and
    # everything else uses right now, plus a quarter for page cache and growth.
    in_use = mem_total - mem_available
    reserved = 0 if limit and limit < mem_total else max(256, int(in_use * 1.25))
    reserved = min(reserved, total // 2)
    bandwidth = measure_bandwidth_gbs(threads=big + little, budget_mb=mem_available / 8) \
        if measure else 1.0
    data: dict[str, Any] = {
        "name": _slug(model),
        "display_name": f"{model} (detected)",
        "arch": arch,
        "memory": {"total_mb": total, "os_reserved_mb": reserved,
                   "bandwidth_gbs": round(bandwidth, 2)},
        "cpu": {"big_cores": big, "little_cores": little, "core": core, "max_mhz": max_mhz,
                "features": cpu_features(cpuinfo)},
        "gpu": _gpu(base, total),
        "thermal": _thermal(base),
    }
    return DeviceProfile.model_validate(data)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _parse_cpuinfo(text: str) -> list[dict[str, str]]:
    blocks = []
    for chunk in text.split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" in fields and fields["processor"].isdigit():
            blocks.append(fields)
    return blocks


def _field(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _device_model(base: Path, cpuinfo: str) -> str:
    tree = _read(base / "proc/device-tree/model")
    if tree and tree.strip("\0\n "):
        return tree.strip("\0\n ")
    return (_field(cpuinfo, "Model") or _field(cpuinfo, "model name")
            or _field(cpuinfo, "Hardware") or platform.node() or "this machine")


def _arch(cpuinfo: str) -> str:
    version = _field(cpuinfo, "CPU architecture")
    if version:
        return "aarch64" if version.startswith("8") or version.startswith("9") else "armv7l"
    if _field(cpuinfo, "flags"):
        return "x86_64"
    machine = platform.machine()
    return {"arm64": "aarch64", "amd64": "x86_64", "AMD64": "x86_64"}.get(machine, machine)


def _cores(base: Path, processors: list[dict[str, str]], cpuinfo: str) -> tuple[int, int, str, int]:
    """(big, little, core name, max MHz): the slowest cluster counts as little when clusters
    differ, since llama.cpp decodes no faster than its slowest thread."""
    ids = [int(p["processor"]) for p in processors] or list(range(os.cpu_count() or 1))
    freqs: dict[int, int] = {}
    for cpu in ids:
        text = _read(base / f"sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq")
        if text and text.strip().isdigit():
            freqs[cpu] = int(text.strip()) // 1000
    parts = {int(p["processor"]): p.get("CPU part", "") for p in processors}
    if len(freqs) == len(ids) and len(set(freqs.values())) > 1:
        slowest = min(freqs.values())
        big_ids = [c for c in ids if freqs[c] > slowest]
    elif len({v for v in parts.values() if v}) > 1:
        # No cpufreq: the part seen on the fewest cores is usually the big one (e.g. 2+6).
        counts: dict[str, int] = {}
        for part in parts.values():
            counts[part] = counts.get(part, 0) + 1
        little_part = max(counts, key=lambda k: counts[k])
        big_ids = [c for c in ids if parts.get(c) != little_part]
    else:
        big_ids = ids
    big, little = len(big_ids), len(ids) - len(big_ids)
    part = parts.get(big_ids[0], "") if big_ids else ""
    try:
        core = ARM_PARTS.get(int(part, 16), f"Arm part {part}") if part else ""
    except ValueError:
        core = ""
    if not core:
        core = _field(cpuinfo, "model name")
    if freqs:
        max_mhz = max(freqs.values())
    else:
        mhz = _field(cpuinfo, "cpu MHz")
        max_mhz = int(float(mhz)) if re.fullmatch(r"[\d.]+", mhz) else 0
    return big, little, core[:80], max_mhz


def _meminfo(base: Path) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in MiB."""
    values = meminfo_kb(base)
    if "MemTotal" not in values:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total // 2**20, vm.available // 2**20
    return values["MemTotal"] // 1024, values.get("MemAvailable", values.get("MemFree", 0)) // 1024


def _cgroup_limit_mb(base: Path) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors (v2, else v1)."""
    limits = [int(group.limit_mb) for group in cgroup_limits(base)]
    return min(limits) if limits else None


def measure_bandwidth_gbs(threads: int = 1, budget_mb: float = 2048) -> float:
    """Memory bandwidth in GB/s: the best of a few numpy copies spread over ``threads``.

    Counts read + write bytes (as STREAM's copy does); the array is at most a quarter of
    ``budget_mb`` (and 128 MiB) so small boards are not pushed into swap. Takes well under 1 s.
    """
    import numpy as np

    size = int(min(BANDWIDTH_BYTES, max(8 * 2**20, budget_mb * 2**20 / 4)))
    threads = max(1, threads)
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]

    def copy(span: tuple[int, int]) -> None:
        np.copyto(dst[span[0]:span[1]], src[span[0]:span[1]])

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        copy((0, src.size))  # fault the pages in before timing
        for _ in range(BANDWIDTH_REPS):
            start = time.perf_counter()
            list(pool.map(copy, bounds))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def _gpu(base: Path, total_mb: int) -> dict[str, Any]:
    if (base / "etc/nv_tegra_release").exists():
        return {"kind": "cuda", "unified_memory": True}
    if (base / "proc/driver/nvidia/version").exists():
        return {"kind": "cuda", "unified_memory": False}
    return {"kind": "none"}


def _thermal(base: Path) -> dict[str, float]:
    """The lowest passive trip point is where the kernel starts throttling; slow down before."""
    trips = []
    for kind in base.glob("sys/class/thermal/thermal_zone*/trip_point_*_type"):
        if (_read(kind) or "").strip() == "passive":
            temp = (_read(kind.with_name(kind.name.replace("_type", "_temp"))) or "").strip()
            if temp.lstrip("-").isdigit() and 20_000 < int(temp) < 150_000:
                trips.append(int(temp) / 1000)
    if not trips:
        return {}
    throttle = min(trips)
    return {"throttle_c": throttle, "soft_limit_c": throttle - 5}


def _slug(model: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:48].strip("-")
    return f"detected-{slug}" if slug else "detected"
