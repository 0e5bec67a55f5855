"""The daemon's decode threads: min(plan, the affinity mask, the cgroup CPU quota), logged and
shown in /health; an explicit --threads is kept (with a warning when it oversubscribes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerunner.bundle.store import Bundle
from edgerunner.runtime.supervise.daemon import Daemon

from .conftest import make_config


def quota_tree(root: Path, cpus: float) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/edgerunner.service\n")
    group = root / "sys/fs/cgroup/edgerunner.service"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000\n")
    return root


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """This test process pinned to one CPU (the real sched_setaffinity), restored after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


def test_the_plan_is_capped_at_the_cgroup_quota(bundle: Bundle, short_tmp: Path) -> None:
    assert bundle.manifest.plan.n_threads == 4  # rpi5: a 4-core board
    config = make_config(short_tmp / "s.sock", n_threads=None,
                         guard_root=quota_tree(short_tmp / "root", cpus=1))
    daemon = Daemon(bundle, config)
    assert daemon.n_threads == 1
    cpu = daemon.health().model_dump(mode="json")["cpu"]
    assert (cpu["threads"], cpu["threads_planned"], cpu["cpus"]) == (1, 4, 1)
    assert "cgroup quota 1 CPUs" in cpu["cpu_limits"]


def test_the_plan_is_capped_at_the_affinity_mask(bundle: Bundle, short_tmp: Path,
                                                  one_cpu: None) -> None:
    config = make_config(short_tmp / "s.sock", n_threads=None, guard_root=short_tmp)
    assert Daemon(bundle, config).n_threads == 1


def test_explicit_threads_are_kept_with_a_warning(bundle: Bundle, short_tmp: Path,
                                                  one_cpu: None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(short_tmp / "s.sock", n_threads=3, guard_root=short_tmp)
    assert Daemon(bundle, config).n_threads == 3
    assert "3 asked for, but this process may use 1 CPUs" in caplog.text
