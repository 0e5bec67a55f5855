"""host.memory and host.cpu against fake /proc + /sys trees (cgroup v1 and v2), and the daemon's
thread choice from a fake affinity and fake cgroup CPU files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerunner.host.cpu import CpuBudget, cpu_budget, cpu_features, decode_threads
from edgerunner.host.memory import cgroup_limits, cgroup_memory

MIB = 2**20
UNLIMITED_V1 = 9223372036854771712


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(root: Path, *, limit_mb: float | None, usage_mb: float, hierarchical_mb: float | None,
            memsw_limit_mb: float | None = None, memsw_usage_mb: float = 0, **stat_mb: float
            ) -> None:
    write(root, "proc/self/cgroup", "4:memory:/box/edgerunner\n3:cpu,cpuacct:/box\n0::/\n")
    group = "sys/fs/cgroup/memory/box/edgerunner"
    write(root, f"{group}/memory.limit_in_bytes",
          f"{UNLIMITED_V1 if limit_mb is None else int(limit_mb * MIB)}\n")
    write(root, f"{group}/memory.usage_in_bytes", f"{int(usage_mb * MIB)}\n")
    lines = [f"hierarchical_memory_limit "
             f"{UNLIMITED_V1 if hierarchical_mb is None else int(hierarchical_mb * MIB)}"]
    lines += [f"{key} {int(value * MIB)}" for key, value in stat_mb.items()]
    write(root, f"{group}/memory.stat", "\n".join(lines) + "\n")
    if memsw_limit_mb is not None:
        write(root, f"{group}/memory.memsw.limit_in_bytes", f"{int(memsw_limit_mb * MIB)}\n")
        write(root, f"{group}/memory.memsw.usage_in_bytes", f"{int(memsw_usage_mb * MIB)}\n")


def test_v1_limit_and_usage(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit_mb=400, usage_mb=150, hierarchical_mb=400)
    group = cgroup_memory(tmp_path)
    assert group is not None
    assert (group.version, group.limit_mb, group.free_mb) == (1, 400, 250)
    assert group.path.endswith("memory/box/edgerunner")


def test_v1_an_ancestors_limit_binds_through_the_hierarchical_limit(tmp_path: Path) -> None:
    # the group itself is unlimited; a parent's 300 MiB shows in hierarchical_memory_limit
    v1_tree(tmp_path, limit_mb=None, usage_mb=100, hierarchical_mb=300)
    group = cgroup_memory(tmp_path)
    assert group is not None and group.free_mb == pytest.approx(200)


def test_v1_clean_page_cache_counts_as_free_and_mapped_pages_do_not(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit_mb=400, usage_mb=350, hierarchical_mb=400,
            total_inactive_file=120, total_active_file=30, total_mapped_file=40, total_dirty=10)
    group = cgroup_memory(tmp_path)
    # reclaimable = 150 − (40 + 10) = 100: used 250 of 400
    assert group is not None and group.free_mb == pytest.approx(150)


def test_v1_memory_plus_swap_binds_when_tighter(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit_mb=800, usage_mb=300, hierarchical_mb=800,
            memsw_limit_mb=500, memsw_usage_mb=420)
    group = cgroup_memory(tmp_path)
    assert group is not None
    assert group.free_mb == pytest.approx(80)
    assert "memory+swap" in group.path
    assert len(cgroup_limits(tmp_path)) == 2


def test_v1_unlimited_is_no_limit(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit_mb=None, usage_mb=100, hierarchical_mb=None)
    assert cgroup_memory(tmp_path) is None


def test_a_container_sees_its_group_as_the_hierarchy_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path, but only the group itself is mounted
    write(tmp_path, "proc/self/cgroup", "4:memory:/docker/abc123\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{512 * MIB}\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{112 * MIB}\n")
    group = cgroup_memory(tmp_path)
    assert group is not None and group.free_mb == pytest.approx(400)


def cpu_tree(root: Path, cgroup: str, files: dict[str, str]) -> None:
    write(root, "proc/self/cgroup", cgroup)
    for rel, text in files.items():
        write(root, rel, text)


def test_cpu_quota_v2_and_its_parents(tmp_path: Path) -> None:
    cpu_tree(tmp_path, "0::/system.slice/edgerunner.service\n", {
        "sys/fs/cgroup/system.slice/edgerunner.service/cpu.max": "max 100000\n",
        "sys/fs/cgroup/system.slice/cpu.max": "150000 100000\n",
    })
    budget = cpu_budget(tmp_path, affinity=4)
    assert budget.quota == pytest.approx(1.5)
    assert budget.cpus == 1  # 1.5 CPUs of time: one thread never waits for its share
    assert decode_threads(4, budget) == 1


def test_cpu_quota_v1(tmp_path: Path) -> None:
    cpu_tree(tmp_path, "3:cpu,cpuacct:/box\n0::/\n", {
        "sys/fs/cgroup/cpu,cpuacct/box/cpu.cfs_quota_us": "200000\n",
        "sys/fs/cgroup/cpu,cpuacct/box/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    budget = cpu_budget(tmp_path, affinity=8)
    assert (budget.quota, budget.cpus) == (2.0, 2)
    assert "cgroup quota 2 CPUs" in budget.describe()


def test_affinity_caps_threads_without_a_quota(tmp_path: Path) -> None:
    budget = cpu_budget(tmp_path, affinity=2)
    assert budget == CpuBudget(2, None, None)
    assert decode_threads(4, budget) == 2
    assert decode_threads(1, budget) == 1


def test_the_real_affinity_is_read(tmp_path: Path) -> None:
    import os

    assert cpu_budget(tmp_path).affinity == len(os.sched_getaffinity(0))


def test_cpu_features_from_cpuinfo() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma f16c avx512f amx_tile\n"
    assert cpu_features(x86) == ["avx", "avx2", "avx512", "f16c", "fma"]
    a76 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 atomics fphp asimdhp asimddp\n"
    assert cpu_features(a76) == ["neon", "fp16", "dotprod"]
