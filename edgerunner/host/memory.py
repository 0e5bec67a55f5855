"""Memory as the kernel enforces it: MemAvailable, the cgroup limits (v2 and v1, ancestors and
memory+swap included) and PSI, read under a root so tests can hand in a fake tree.

One reader for the daemon's guards, `verify --here` and `profiles detect`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgerunner.host._proc import ancestors, read_text, self_cgroups, v1_group

MIB = 2**20
# cgroup v1 prints "no limit" as the largest page-aligned long (9223372036854771712)
_V1_UNLIMITED = 2**60


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory limit that binds this process, and how much of it is free, in bytes."""

    version: int  # 1 or 2
    path: str  # the group whose limit binds
    limit: int
    free: int  # limit − usage, clean unmapped page cache counted as free

    @property
    def free_mb(self) -> float:
        return max(self.free, 0) / MIB

    @property
    def limit_mb(self) -> float:
        return self.limit / MIB


def meminfo_kb(root: Path = Path("/")) -> dict[str, int]:
    """/proc/meminfo as {field: kB}; empty when unreadable."""
    text = read_text(Path(root) / "proc/meminfo") or ""
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}


def cgroup_memory(root: Path = Path("/")) -> CgroupMemory | None:
    """The limit that leaves this process the least free memory, or None if none is set."""
    return min(cgroup_limits(root), key=lambda c: c.free, default=None)


def cgroup_limits(root: Path = Path("/")) -> list[CgroupMemory]:
    """Every memory limit on this process's cgroup and its ancestors, v2 and v1 alike."""
    top = Path(root) / "sys/fs/cgroup"
    found: list[CgroupMemory] = []
    for hier, controllers, path in self_cgroups(Path(root)):
        if hier == "0" and not controllers:
            found += _v2(top, path)
        elif "memory" in controllers and (node := v1_group(top, controllers, path, "memory")):
            found += _v1(node)
    return found


def psi_memory(root: Path = Path("/")) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) from /proc/pressure/memory, in percent; None where absent."""
    values: dict[str, float] = {}
    for line in (read_text(Path(root) / "proc/pressure/memory") or "").splitlines():
        kind, _, rest = line.partition(" ")
        for field in rest.split():
            key, _, value = field.partition("=")
            if key == "avg10":
                with contextlib.suppress(ValueError):
                    values[kind] = float(value)
    return values.get("some"), values.get("full")


# -- one reading of it all -------------------------------------------------------------


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of the machine's and the cgroup's memory, in MiB."""

    available_mb: float
    cgroup_free_mb: float | None
    cgroup_path: str | None
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    rss_mb: float

    @property
    def headroom_mb(self) -> float:
        """What this process could still allocate: min(MemAvailable, cgroup limit − usage).

        The cgroup's usage leaves out clean, unmapped page cache (see _reclaimable_file_bytes).
        """
        if self.cgroup_free_mb is None:
            return self.available_mb
        return min(self.available_mb, self.cgroup_free_mb)

    @property
    def source(self) -> str:
        if self.cgroup_free_mb is not None and self.cgroup_free_mb < self.available_mb:
            return f"cgroup {self.cgroup_path}"
        return "MemAvailable"


class MemoryProbe:
    """Reads memory state under `root` ("/" on a real machine) through edgerunner.host.memory."""

    def __init__(self, root: Path = Path("/"), pid: int | None = None) -> None:
        self.root = Path(root)
        self._process = psutil.Process(pid if pid is not None else os.getpid())

    def read(self) -> MemorySnapshot:
        """Take one snapshot."""
        group = cgroup_memory(self.root)
        some, full = psi_memory(self.root)
        return MemorySnapshot(
            available_mb=self.mem_available_mb(),
            cgroup_free_mb=group.free_mb if group is not None else None,
            cgroup_path=group.path if group is not None else None,
            psi_some_avg10=some,
            psi_full_avg10=full,
            rss_mb=self.rss_mb(),
        )

    def rss_mb(self) -> float:
        """This process's resident set size."""
        return float(self._process.memory_info().rss) / MIB

    def mem_available_mb(self) -> float:
        """MemAvailable from <root>/proc/meminfo (psutil's view when the file is absent)."""
        available = meminfo_kb(self.root).get("MemAvailable")
        if available is None:
            return float(psutil.virtual_memory().available) / MIB
        return available / 1024


# -- cgroup v2 --------------------------------------------------------------------------------


def _v2(top: Path, path: str) -> list[CgroupMemory]:
    # a parent's memory.max binds too: every limited group from ours up to the root
    found = []
    for node in ancestors(top, top / path.lstrip("/")):
        limit = _int(node / "memory.max")
        current = _int(node / "memory.current") or 0
        if limit is None:
            continue
        stat = _stat(node)
        used = max(current - _reclaimable(stat, prefix=""), 0)
        # v2 limits swap apart (memory.swap.max): memory.max alone bounds RAM
        found.append(CgroupMemory(2, str(node), limit, limit - used))
    return found


# -- cgroup v1 --------------------------------------------------------------------------------


def _v1(node: Path) -> list[CgroupMemory]:
    # usage_in_bytes is hierarchical, and memory.stat's hierarchical_memory_limit is the
    # tightest limit of the group and its ancestors (with use_hierarchy, the default since 3.x)
    stat = _stat(node)
    usage = _int(node / "memory.usage_in_bytes") or 0
    found = []
    limits = [v for v in (_int(node / "memory.limit_in_bytes"),
                          stat.get("hierarchical_memory_limit")) if v is not None]
    limit = min(limits, default=None)
    if limit is not None and limit < _V1_UNLIMITED:
        used = max(usage - _reclaimable(stat, prefix="total_"), 0)
        found.append(CgroupMemory(1, str(node), limit, limit - used))
    # memory.memsw.* bounds RAM + swap together: with no swap it is the same limit again,
    # and where it is the tighter one it binds first
    sw_usage = _int(node / "memory.memsw.usage_in_bytes")
    sw_limits = [v for v in (_int(node / "memory.memsw.limit_in_bytes"),
                             stat.get("hierarchical_memsw_limit")) if v is not None]
    sw_limit = min(sw_limits, default=None)
    if sw_usage is not None and sw_limit is not None and sw_limit < _V1_UNLIMITED:
        used = max(sw_usage - _reclaimable(stat, prefix="total_"), 0)
        found.append(CgroupMemory(1, f"{node} (memory+swap)", sw_limit, sw_limit - used))
    return found


# -- shared -----------------------------------------------------------------------------------


def _reclaimable(stat: dict[str, int], prefix: str) -> int:
    # usage counts the page cache of every file the group read: the model file the daemon
    # just hashed, the .so files it imported. At the limit the kernel drops clean file pages
    # before it OOM-kills, so counting them as used would shrink n_ctx (or exit 3) for memory
    # that is in fact there.
    # Subtracted: active + inactive file — reclaim at the limit takes active pages too once the
    # inactive list runs dry, and shmem/tmpfs is on the anon lists, in neither.
    # Kept as used: mapped file pages (a working set — the mmapped weights, the code of loaded
    # libraries; dropping them only thrashes) and dirty/writeback pages (they must be written
    # back before they can go). v2 names them file_mapped/file_dirty/file_writeback, v1
    # (hierarchical totals) total_mapped_file/total_dirty/total_writeback.
    cache = stat.get(f"{prefix}active_file", 0) + stat.get(f"{prefix}inactive_file", 0)
    if prefix:
        pinned = (stat.get("total_mapped_file", 0) + stat.get("total_dirty", 0)
                  + stat.get("total_writeback", 0))
    else:
        pinned = (stat.get("file_mapped", 0) + stat.get("file_dirty", 0)
                  + stat.get("file_writeback", 0))
    return max(cache - pinned, 0)


def _stat(node: Path) -> dict[str, int]:
    stat: dict[str, int] = {}
    for line in (read_text(node / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


def _int(path: Path) -> int | None:
    text = (read_text(path) or "").strip()
    return int(text) if text.isdigit() else None
