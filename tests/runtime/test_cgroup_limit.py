"""The real daemon inside a real kernel memory limit below its plan (cgroup v1 or v2, where this
machine lets the test create one): it shrinks n_ctx to fit at start, or exits 3 with --strict;
a prompt that fills the shrunk context is answered; the kernel records no OOM kill. The limit is
80% of the plan's prediction (the issue's run: 400 MiB for a 595 MiB plan)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edgerunner.bundle.store import Bundle
from edgerunner.client.http import Client
from edgerunner.errors import ExitCode

LIMIT_FRACTION = 0.8  # of the plan's prediction: the plan cannot fit, a shrunk context can


@dataclass
class MemoryCgroup:
    path: Path
    version: int

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise AssertionError(f"no oom_kill line in {self.path / name}")


def _own_memory_group() -> tuple[Path, int] | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), 1
        if hier == "0" and controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/"), 2
    return None


@pytest.fixture
def limit_mb(bundle: Bundle) -> int:
    return int(LIMIT_FRACTION * bundle.manifest.prediction.memory.total_mb)


@pytest.fixture
def memory_cgroup(limit_mb: int) -> Iterator[MemoryCgroup]:
    own = _own_memory_group()
    if own is None:
        pytest.skip("no memory cgroup controller on this machine (neither v1 nor v2)")
    parent, version = own
    group = parent / f"edgerunner-test-{uuid.uuid4().hex[:8]}"
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit_mb * 2**20))
    except OSError as exc:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot create a memory cgroup under {parent} ({exc.strerror}): "
                    "needs root and a writable cgroup tree")
    try:
        yield MemoryCgroup(group, version)
    finally:
        for _ in range(50):  # the daemon's process leaves the group as it is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def serve_in(group: MemoryCgroup, bundle: Bundle, sock: Path, *args: str) -> subprocess.Popen[str]:
    # the shell joins the group, then becomes the daemon: every byte it allocates is charged
    join = f'echo $$ > "{group.path}/cgroup.procs" && exec "$@"'
    return subprocess.Popen(
        ["sh", "-c", join, "sh", sys.executable, "-m", "edgerunner", "serve", str(bundle.dir),
         "--socket", str(sock), "--threads", "1", *args],
        env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_the_daemon_shrinks_to_a_kernel_limit_and_answers_a_full_context(
        memory_cgroup: MemoryCgroup, bundle: Bundle, short_tmp: Path) -> None:
    sock = short_tmp / "s.sock"
    proc = serve_in(memory_cgroup, bundle, sock)
    try:
        with Client(sock) as client:
            client.wait_ready(120, process=proc)
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                            base_url="http://edgerunner", timeout=600)
        with http:
            health = http.get("/health").json()
            n_ctx = health["plan"]["n_ctx"]
            assert health["plan_shrunk"] is True
            assert n_ctx < bundle.manifest.plan.n_ctx
            assert str(memory_cgroup.path) in health["memory"]["headroom_source"]
            # " hello" is one token: fill all but a few cells of the shrunk context
            prompt = "hello" + " hello" * (n_ctx - 40)
            reply = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16})
            assert reply.status_code == 200, reply.text
            usage = reply.json()["usage"]
            assert usage["total_tokens"] > n_ctx - 48
            assert usage["completion_tokens"] >= 1
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "shrank n_ctx" in stderr
    assert memory_cgroup.oom_kills() == 0


def test_strict_refuses_to_start_under_the_limit(memory_cgroup: MemoryCgroup, bundle: Bundle,
                                                 short_tmp: Path) -> None:
    proc = serve_in(memory_cgroup, bundle, short_tmp / "s.sock", "--strict")
    try:
        assert proc.wait(120) == ExitCode.NO_FIT
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert "--strict forbids shrinking it" in stderr
    assert memory_cgroup.oom_kills() == 0
