"""Memory guards against a fake /proc + /sys/fs/cgroup tree, and the real one on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerunner.bundle.manifest import MemoryEstimate, RuntimePlan
from edgerunner.errors import PlanError
from edgerunner.host.memory import MemoryProbe
from edgerunner.runtime.protocol import RequestError
from edgerunner.runtime.supervise.fit import fit_plan, scaled_estimate
from edgerunner.runtime.supervise.memory_guard import MemoryGuard

MIB = 2**20


class FakeTree:
    """A root holding proc/meminfo, proc/self/cgroup, proc/pressure/memory and a cgroup v2 dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/pressure").mkdir(parents=True)
        self.group = root / "sys/fs/cgroup/system.slice/edgerunner.service"
        self.group.mkdir(parents=True)
        (root / "proc/self/cgroup").write_text("0::/system.slice/edgerunner.service\n")
        self.set(available_mb=4000, limit_mb=None, current_mb=100, full_avg10=0.0)

    def set(self, *, available_mb: float, limit_mb: float | None, current_mb: float,
            full_avg10: float | None) -> None:
        (self.root / "proc/meminfo").write_text(
            f"MemTotal:        8000000 kB\nMemFree:  100 kB\n"
            f"MemAvailable:   {int(available_mb * 1024)} kB\n")
        (self.group / "memory.max").write_text(
            "max\n" if limit_mb is None else f"{int(limit_mb * MIB)}\n")
        (self.group / "memory.current").write_text(f"{int(current_mb * MIB)}\n")
        psi = self.root / "proc/pressure/memory"
        if full_avg10 is None:
            psi.unlink(missing_ok=True)
        else:
            psi.write_text(f"some avg10={full_avg10 * 2:.2f} avg60=0.00 avg300=0.00 total=1\n"
                           f"full avg10={full_avg10:.2f} avg60=0.00 avg300=0.00 total=1\n")


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    return FakeTree(tmp_path)


def test_headroom_is_the_tighter_of_meminfo_and_cgroup(tree: FakeTree) -> None:
    probe = MemoryProbe(tree.root)
    snap = probe.read()
    assert snap.available_mb == pytest.approx(4000)
    assert snap.cgroup_free_mb is None  # memory.max = "max": no cgroup limit
    assert snap.headroom_mb == pytest.approx(4000)
    assert snap.source == "MemAvailable"
    assert snap.psi_full_avg10 == 0.0

    tree.set(available_mb=4000, limit_mb=600, current_mb=250, full_avg10=1.5)
    snap = probe.read()
    assert snap.cgroup_free_mb == pytest.approx(350)
    assert snap.headroom_mb == pytest.approx(350)
    assert "edgerunner.service" in snap.source
    assert (snap.psi_some_avg10, snap.psi_full_avg10) == (3.0, 1.5)


def test_a_parent_cgroup_limit_binds_too(tree: FakeTree) -> None:
    parent = tree.group.parent
    (parent / "memory.max").write_text(f"{300 * MIB}\n")
    (parent / "memory.current").write_text(f"{200 * MIB}\n")
    tree.set(available_mb=4000, limit_mb=1000, current_mb=100, full_avg10=0.0)
    assert MemoryProbe(tree.root).read().headroom_mb == pytest.approx(100)


def write_stat(group: Path, **mib: float) -> None:
    """A cgroup v2 memory.stat (values in bytes, as the kernel writes them)."""
    lines = [f"anon {300 * MIB}", "file_thp 0", "shmem 0"]
    lines += [f"{key} {int(value * MIB)}" for key, value in mib.items()]
    (group / "memory.stat").write_text("\n".join(lines) + "\n")


def test_clean_unmapped_page_cache_counts_as_free(tree: FakeTree) -> None:
    # the daemon just hashed a 300 MiB model: memory.current holds its page cache
    tree.set(available_mb=4000, limit_mb=1000, current_mb=800, full_avg10=0.0)
    probe = MemoryProbe(tree.root)
    assert probe.read().headroom_mb == pytest.approx(200)  # no memory.stat: all of it used
    write_stat(tree.group, active_file=100, inactive_file=350, file_mapped=40, file_dirty=8,
               file_writeback=2)
    # reclaimable: 100 + 350 - 40 mapped - 10 dirty/writeback = 400 MiB
    assert probe.read().headroom_mb == pytest.approx(600)
    # mapped (the mmapped weights) and dirty pages stay counted, whatever list they are on
    write_stat(tree.group, active_file=100, inactive_file=50, file_mapped=400)
    assert probe.read().headroom_mb == pytest.approx(200)


def test_page_cache_does_not_shrink_the_start_up_fit(tree: FakeTree) -> None:
    plan = RuntimePlan(n_ctx=4096)
    estimate = scaled_estimate(MEMORY, 4096)  # 261 MiB
    tree.set(available_mb=4000, limit_mb=500, current_mb=420, full_avg10=0.0)
    write_stat(tree.group, active_file=30, inactive_file=300, file_mapped=20)
    headroom = MemoryProbe(tree.root).read().headroom_mb
    assert headroom == pytest.approx(390)  # 500 - (420 - 310)
    fit = fit_plan(plan, estimate, headroom_mb=headroom, reserve_mb=100, strict=True)
    assert fit.plan.n_ctx == 4096 and not fit.shrunk


def test_parent_page_cache_is_subtracted_from_the_parent_only(tree: FakeTree) -> None:
    parent = tree.group.parent
    (parent / "memory.max").write_text(f"{1000 * MIB}\n")
    (parent / "memory.current").write_text(f"{900 * MIB}\n")
    write_stat(parent, inactive_file=500)
    tree.set(available_mb=4000, limit_mb=None, current_mb=100, full_avg10=0.0)
    assert MemoryProbe(tree.root).read().headroom_mb == pytest.approx(600)


def test_missing_cgroup_and_psi_fall_back(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemAvailable:  2048000 kB\n")
    snap = MemoryProbe(tmp_path).read()
    assert snap.cgroup_free_mb is None and snap.psi_full_avg10 is None
    assert snap.headroom_mb == pytest.approx(2000)


def test_real_machine_reads() -> None:
    snap = MemoryProbe(Path("/")).read()
    assert snap.available_mb > 0
    assert snap.headroom_mb <= snap.available_mb
    assert snap.rss_mb > 10  # this Python process


def test_running_guard_refuses_under_pressure_until_recovery(tree: FakeTree) -> None:
    exceeded: list[tuple[float, float]] = []
    guard = MemoryGuard(MemoryProbe(tree.root), reserve_mb=200, psi_full_limit=10,
                        rss_ceiling_mb=None, on_rss_exceeded=lambda *a: exceeded.append(a))
    guard.check()
    guard.admit()  # plenty of room

    tree.set(available_mb=4000, limit_mb=600, current_mb=500, full_avg10=0.0)
    guard.check()
    with pytest.raises(RequestError) as info:
        guard.admit()
    assert info.value.code == "memory_pressure"
    assert "100 MiB free" in info.value.message and "200 MiB reserve" in info.value.message
    assert info.value.retry_after is not None and info.value.retry_after >= 1

    tree.set(available_mb=4000, limit_mb=None, current_mb=100, full_avg10=25.0)
    guard.check()
    with pytest.raises(RequestError, match="PSI"):
        guard.admit()

    tree.set(available_mb=4000, limit_mb=None, current_mb=100, full_avg10=0.5)
    guard.check()
    guard.admit()  # recovered
    assert guard.state == "ok" and guard.refusals == 2
    assert exceeded == []


def test_rss_ceiling_is_reported_once(tree: FakeTree) -> None:
    exceeded: list[tuple[float, float]] = []
    guard = MemoryGuard(MemoryProbe(tree.root), reserve_mb=0, psi_full_limit=10,
                        rss_ceiling_mb=1.0, on_rss_exceeded=lambda *a: exceeded.append(a))
    guard.check()
    guard.check()
    assert len(exceeded) == 1
    rss, ceiling = exceeded[0]
    assert rss > ceiling == 1.0


MEMORY = MemoryEstimate(weights_mb=100, kv_mb=80, compute_mb=20, logits_mb=1, overhead_mb=60)


def test_fit_keeps_a_plan_that_fits() -> None:
    plan = RuntimePlan(n_ctx=4096)
    fit = fit_plan(plan, scaled_estimate(MEMORY, 4096), headroom_mb=1000, reserve_mb=100,
                   strict=True)
    assert fit.plan == plan and not fit.shrunk
    assert fit.predicted_mb == pytest.approx(MEMORY.total_mb)


def test_fit_shrinks_context_to_what_fits() -> None:
    plan = RuntimePlan(n_ctx=4096)
    estimate = scaled_estimate(MEMORY, 4096)  # 181 MiB + 80 MiB per 4096 cells
    fit = fit_plan(plan, estimate, headroom_mb=350, reserve_mb=120, strict=False)
    assert fit.shrunk
    assert fit.plan.n_ctx == 2304  # 181 + 45 = 226 ≤ 230 < 181 + 50
    assert fit.predicted_mb <= 350 - 120
    assert "shrank n_ctx to 2304" in fit.reason


def test_strict_refuses_to_shrink() -> None:
    with pytest.raises(PlanError, match="--strict") as info:
        fit_plan(RuntimePlan(n_ctx=4096), scaled_estimate(MEMORY, 4096), headroom_mb=350,
                 reserve_mb=120, strict=True)
    assert info.value.needed_mb == pytest.approx(MEMORY.total_mb)


def test_nothing_fits() -> None:
    with pytest.raises(PlanError, match="nothing fits"):
        fit_plan(RuntimePlan(n_ctx=4096), scaled_estimate(MEMORY, 4096), headroom_mb=200,
                 reserve_mb=100, strict=False)
