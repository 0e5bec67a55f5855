"""Boot a Debian rootfs under systemd-nspawn with systemd as PID 1, and run commands in it.

nspawn on a cgroup-v1 host mounts the controllers read-only, so systemd inside creates no
memory cgroup for a unit and MemoryMax= is not enforced. Here the container gets its own
memory/pids/cpu cgroups on the host, and a PID-1 wrapper (/usr/local/sbin/lane-init) remounts
them read-write (`remount,bind,rw`: they are bind mounts) before exec'ing systemd; nspawn runs
it in non-boot mode (-b takes no custom init) with --kill-signal=SIGRTMIN+3, systemd's "shut
down" signal. --register=no and
--keep-unit together keep nspawn off the host's (absent) system bus.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
INIT = """#!/bin/sh
# PID 1 of the lane's container: make the cgroup controllers writable, then become systemd.
for c in memory pids cpu cpuacct cpu,cpuacct; do
  # a bind mount: a plain remount fails with "mount point is busy"
  [ -d /sys/fs/cgroup/$c ] && mount -o remount,bind,rw /sys/fs/cgroup/$c 2>/dev/null
done
exec /lib/systemd/systemd
"""
JOURNALD = "[Journal]\nStorage=volatile\n"
PATH = "/opt/edgerunner/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Container:
    """One booted container; `run` executes in all its namespaces via nsenter."""

    def __init__(self, rootfs: Path, log: Path, binds: dict[Path, str] | None = None) -> None:
        self.rootfs = rootfs
        self.log = log
        self.binds = binds or {}
        self.name = f"edgerunner-lane-{os.getpid()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.cgroups: list[Path] = []

    def _prepare(self) -> None:
        init = self.rootfs / "usr/local/sbin/lane-init"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(INIT)
        init.chmod(0o755)
        conf = self.rootfs / "etc/systemd/journald.conf.d/volatile.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(JOURNALD)
        for controller in CONTROLLERS:
            base = Path("/sys/fs/cgroup") / controller
            if base.is_dir() and not (base / "cgroup.procs").is_symlink():
                path = base / self.name
                path.mkdir(exist_ok=True)
                self.cgroups.append(path)

    def _enter_cgroups(self) -> None:
        # runs in the forked child before exec: nspawn and everything under it live here
        for path in self.cgroups:
            (path / "cgroup.procs").write_text(str(os.getpid()))

    def boot(self, timeout: float = 60.0) -> float:
        """Start the container and wait for systemd to finish booting; seconds it took."""
        self._prepare()
        started = time.monotonic()
        command = ["systemd-nspawn", "-D", str(self.rootfs), "--register=no", "--keep-unit",
                   "--kill-signal=SIGRTMIN+3", f"--machine={self.name}", "--quiet"]
        for host, inside in self.binds.items():
            command.append(f"--bind-ro={host}:{inside}")
        command.append("/usr/local/sbin/lane-init")
        out = self.log.open("ab")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=self._enter_cgroups)
        out.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            self.pid1 = self._find_pid1()
            if self.pid1:
                done = self.run("systemctl", "is-system-running", "--wait", check=False,
                                timeout=deadline - time.monotonic())
                if done.stdout.strip() in ("running", "degraded"):
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"the container did not boot within {timeout:g} s")

    def _find_pid1(self) -> int:
        assert self.process is not None
        todo = [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if comm == "systemd" and pid != self.process.pid:
                return pid
            todo.extend(int(c) for c in children)
        return 0

    def run(self, *args: str, check: bool = True, timeout: float | None = 300,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all namespaces, the container's root)."""
        command = ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i", f"PATH={PATH}",
                   "LANG=C.UTF-8", "HOME=/root", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False, input=input)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed in the container "
                               f"(exit {done.returncode}): {done.stderr.strip()[-1500:]}")
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a command inside the container without waiting."""
        command = ["nsenter", "-t", str(self.pid1), "-a", "--", "env", "-i", f"PATH={PATH}",
                   "LANG=C.UTF-8", "HOME=/root", *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        done = self.run("systemctl", "show", "-p", ",".join(props), unit)
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def stop(self, timeout: float = 60.0) -> None:
        """Shut systemd down (SIGRTMIN+3 through nspawn), then drop the host cgroups."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in self.cgroups:
            for _ in range(300):  # the last processes leave the cgroup after nspawn exits
                try:
                    # systemd inside made sub-cgroups (init.scope, system.slice...): deepest first
                    subs = [p for p in path.rglob("*") if p.is_dir()]
                    for sub in sorted(subs, key=lambda p: -len(p.parts)):
                        sub.rmdir()
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
