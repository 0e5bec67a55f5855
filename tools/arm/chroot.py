"""Run a command in the arm64 rootfs under qemu-user, as one emulated CPU.

A private mount namespace (unshare) holds every mount, so nothing outlives the command: /proc
with the CPU's cpuinfo bound over /proc/cpuinfo, /dev, a tmpfs /tmp, and read-only binds of the
cross-built libraries, the aarch64 site-packages, this checkout and the lane's models. QEMU_CPU
picks the CPU model; it stays in the guest's environment, so every process the guest starts
(the daemon's preflight child too) is the same CPU.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cpus import Cpu

LIB = "/opt/llama/lib"  # lane_cache.BACKEND_DIR: where the CPU variants were compiled to be
SITE = "/opt/py"
SRC = "/src"
MODELS = "/models"


def guest_env(cpu: Cpu) -> dict[str, str]:
    """The environment every guest process sees."""
    return {
        "QEMU_CPU": cpu.qemu, "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/root", "LANG": "C.UTF-8", "PYTHONPATH": f"{SITE}:{SRC}",
        "PYTHONDONTWRITEBYTECODE": "1", "LLAMA_CPP_LIB_PATH": LIB, "LD_LIBRARY_PATH": LIB,
        "XDG_CACHE_HOME": "/tmp/cache", "TMPDIR": "/tmp",
    }


def command(rootfs: Path, cpu: Cpu, argv: Sequence[str], binds: dict[str, Path],
            cpuinfo: Path) -> list[str]:
    """The host command line that runs argv in rootfs as cpu."""
    r = shlex.quote(str(rootfs))
    lines = ["set -e", f"mount -t proc proc {r}/proc", f"mount --rbind /dev {r}/dev",
             f"mount -t tmpfs tmpfs {r}/tmp",
             f"mount --bind {shlex.quote(str(cpuinfo))} {r}/proc/cpuinfo"]
    for guest, host in binds.items():
        target = f"{r}{guest}"
        lines += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(host))} {target}",
                  f"mount -o remount,bind,ro {target}"]
    env = [f"{k}={v}" for k, v in guest_env(cpu).items()]
    lines.append("exec " + shlex.join(["env", f"QEMU_CPU={cpu.qemu}", "chroot", str(rootfs),
                                       "/usr/bin/env", "-i", *env, *argv]))
    return ["unshare", "--mount", "--propagation", "private", "--fork",
            "sh", "-c", "\n".join(lines)]


def run(rootfs: Path, cpu: Cpu, argv: Sequence[str], binds: dict[str, Path], *,
        timeout: float, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv in the rootfs as this CPU; output captured as text."""
    with tempfile.NamedTemporaryFile("w", prefix="cpuinfo-", suffix=".txt") as info:
        info.write(cpu.cpuinfo())
        info.flush()
        return subprocess.run(command(rootfs, cpu, argv, binds, Path(info.name)),
                              input=input_text, capture_output=True, text=True,
                              timeout=timeout, check=False)


def popen(rootfs: Path, cpu: Cpu, argv: Sequence[str], binds: dict[str, Path],
          cpuinfo: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start argv in the rootfs as this CPU (a server), output to log."""
    with log.open("wb") as out:
        return subprocess.Popen(command(rootfs, cpu, argv, binds, cpuinfo), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
