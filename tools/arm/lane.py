"""`make test-arm`: edgerunner on emulated aarch64 — the Pi 5, Pi 4 and Pi Zero 2 W CPUs.

What x86 tests cannot show: which weights llama.cpp repacks on ARM (its rules depend on the
CPU's ISA), whether ggml's runtime CPU variants pick the right code for each Pi, and whether
edgerunner reads a Pi's ISA right. Under `qemu-aarch64 -cpu cortex-a76`, `cortex-a72` and
`cortex-a53`, in an arm64 Debian rootfs, with llama.cpp cross-built from llama-cpp-python's
own sdist (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS), it checks:

- for Q4_0, Q4_1, Q4_K_M, Q6_K and Q8_0 of the default model: the CPU_Mapped, CPU_REPACK, KV,
  compute and output buffers llama.cpp logs against edgerunner.pack.memory's prediction for the
  ISA features edgerunner reads there (equal to the printed MiB, or within 1%);
- `edgerunner profiles detect` reads the board's ISA (and core);
- `edgerunner serve` of a bundle packed for that board answers a short request (after its
  decode preflight, on the emulated CPU);
- on the Pi 4's CPU, a monolithic Pi 5 build (`-march=armv8.2-a+dotprod+fp16`, what a Pi 5
  builds natively) is refused by the daemon's preflight: exit 5, "built for another CPU?".

It prints a per-CPU table and exits 1 if any check fails. Everything it builds is cached under
`$XDG_CACHE_HOME/edgerunner/arm-lane/<key>/` (lane_cache.py). Measured on 2 shared cores: cold
18 min (debootstrap overlapping the two cross builds, ~15 min, then the checks), warm ~5 min.
Runs as root (chroot, mounts, apt-get).

    .venv/bin/python tools/arm/lane.py                 # all three CPUs
    .venv/bin/python tools/arm/lane.py --cpu cortex-a76 --no-serve
    .venv/bin/python tools/arm/lane.py --warm-only     # exit 0 at once unless the cache is ready
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chroot
import cross_build
import lane_cache
import qemu
import rootfs
import wheels
from cpus import CPUS, Cpu, by_name

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.01  # relative, when not equal to the MiB llama.cpp prints (2 decimals)
BUFFERS = ("mapped", "repack", "kv", "compute", "output")
PROBE_TIMEOUT_S = 900
SERVE_TIMEOUT_S = 600
FOREIGN_CPU = "cortex-a72"  # where the Pi 5 build is tried (the Pi 4)


@dataclass
class CpuResult:
    """Everything the lane saw on one emulated CPU."""

    cpu: Cpu
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    detected: list[str] = field(default_factory=list)
    serve: str = "not run"
    foreign: str = ""
    seconds: float = 0.0


def models() -> tuple[Path, dict[str, Path]]:
    """The default model and its requantizations (cached; quantized here on the host)."""
    from edgerunner.pack.default_model import ensure_default_model
    from edgerunner.pack.quantize import quantize

    source = ensure_default_model()
    dest = lane_cache.root() / "models"
    dest.mkdir(exist_ok=True)
    if not (dest / source.name).exists():
        shutil.copy2(source, dest / source.name)
    out = {}
    for quant in lane_cache.QUANTS:
        target = dest / f"{source.stem}-{quant}.gguf"
        if not target.exists():
            partial = target.with_suffix(".partial")
            quantize(source, partial, quant)
            os.replace(partial, target)
        out[quant] = target
    return dest / source.name, out


def ready() -> bool:
    """Whether every cached item exists for the current key (a warm lane)."""
    root = lane_cache.root()
    items = ["rootfs.tar", "llama-lib", "site-packages", "models",
             f"llama-lib-pi5-{lane_cache.flags_hash(lane_cache.PI5_CMAKE_FLAGS)}"]
    quants = [f"models/*-{q}.gguf" for q in lane_cache.QUANTS]
    return all((root / item).exists() for item in items) and all(
        any(root.glob(pattern)) for pattern in quants)


def unusable() -> str | None:
    """Why this machine cannot run the lane now (no root, no binfmt_misc, no chroot), or None."""
    if os.geteuid() != 0:
        return "it needs root (chroot, mounts)"
    try:
        qemu.ensure_binfmt()
        with tempfile.TemporaryDirectory(prefix="arm-lane-check-") as tmp:
            root = rootfs.restore(Path(tmp) / "rootfs")
            done = chroot.run(root, CPUS[0], ["python3", "-c", "print('ok')"], {}, timeout=120)
    except (OSError, SystemExit, subprocess.SubprocessError) as exc:
        return f"qemu-user cannot run here ({exc})"
    if done.stdout.strip() != "ok":
        return f"the arm64 rootfs does not start here ({done.stderr.strip()[-200:]})"
    return None


def _close(measured: float | None, predicted: float) -> bool:
    if measured is None:
        return False
    return round(predicted, 2) == round(measured, 2) or (
        abs(predicted - measured) <= TOLERANCE * max(measured, 0.01))


def _binds(lib: Path, site: Path, model_dir: Path) -> dict[str, Path]:
    return {chroot.LIB: lib, chroot.SITE: site, chroot.SRC: REPO, chroot.MODELS: model_dir}


def check_buffers(result: CpuResult, root: Path, binds: dict[str, Path], source: Path,
                  quants: dict[str, Path]) -> None:
    """llama.cpp's buffers vs edgerunner.pack.memory, every preset, on this CPU."""
    request = {"source": f"{chroot.MODELS}/{source.name}",
               "models": {q: f"{chroot.MODELS}/{p.name}" for q, p in quants.items()},
               # where weights are repacked, also load without mmap (the other residency)
               "unmapped": "dotprod" in result.cpu.features}
    done = chroot.run(root, result.cpu, ["python3", f"{chroot.SRC}/tools/arm/probe.py",
                                         json.dumps(request)], binds, timeout=PROBE_TIMEOUT_S)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(rows) != len(quants):
        tail = " / ".join((done.stderr or "").strip().splitlines()[-4:])
        result.failures.append(f"probe exited {done.returncode}: {tail}")
    for row in rows:
        result.rows.append(row)
        if row["variant"] != result.cpu.ggml_variant:
            result.failures.append(f"{row['quant']}: llama.cpp loaded ggml-cpu-{row['variant']}, "
                                   f"expected {result.cpu.ggml_variant}")
        if row["repacked"] != row["predicted_repacked"]:
            measured, predicted = set(row["repacked"]), set(row["predicted_repacked"])
            result.failures.append(f"{row['quant']}: llama.cpp repacked {len(measured)} tensors, "
                                   f"edgerunner {len(predicted)}; only llama.cpp: "
                                   f"{sorted(measured - predicted)[:4]}, only edgerunner: "
                                   f"{sorted(predicted - measured)[:4]}")
        for part in [*BUFFERS, *(["unmapped"] if "unmapped" in row["llama"] else [])]:
            measured, predicted = row["llama"][part], row["edgerunner"][part]
            if not _close(measured, predicted):
                result.failures.append(f"{row['quant']} {part}: llama.cpp {measured} MiB, "
                                       f"edgerunner {predicted} MiB")


def check_detect(result: CpuResult, root: Path, binds: dict[str, Path]) -> None:
    """`edgerunner profiles detect` reads the board's ISA features and core."""
    done = chroot.run(root, result.cpu, ["python3", "-m", "edgerunner", "profiles", "detect",
                                         "--json"], binds, timeout=PROBE_TIMEOUT_S)
    try:
        profile = json.loads(done.stdout)
    except ValueError:
        result.failures.append(f"detect exited {done.returncode}: {done.stderr.strip()[-300:]}")
        return
    result.detected = profile["cpu"]["features"]
    if tuple(result.detected) != result.cpu.features:
        result.failures.append(f"detect read {result.detected}, expected {result.cpu.features}")
    core = {"cortex-a76": "Cortex-A76", "cortex-a72": "Cortex-A72", "cortex-a53": "Cortex-A53"}
    if profile["cpu"]["core"] != core[result.cpu.qemu]:
        result.failures.append(f"detect read core {profile['cpu']['core']!r}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bundle(cpu: Cpu, source: Path, work: Path) -> Path:
    """A bundle of the default model packed (on the host) for the board's profile."""
    bundles = work / f"bundles-{cpu.qemu}"
    if not bundles.is_dir():
        subprocess.run([sys.executable, "-m", "edgerunner", "pack", str(source), "--profile",
                        cpu.profile, "-o", str(bundles)], check=True, capture_output=True)
    (bundle,) = [p for p in bundles.iterdir() if p.is_dir()]
    return bundle


def _start_serve(cpu: Cpu, root: Path, binds: dict[str, Path], port: int, work: Path,
                 log: Path) -> subprocess.Popen[bytes]:
    cpuinfo = work / f"cpuinfo-{cpu.qemu}"
    cpuinfo.write_text(cpu.cpuinfo())
    # One thread: under emulation two threads on two shared cores decode slower than one.
    # qemu-user itself adds ~50 MB of RSS the prediction does not know of: lift the ceiling.
    argv = ["python3", "-m", "edgerunner", "serve", "/bundle", "--socket", "/tmp/er.sock",
            "--http", f"127.0.0.1:{port}", "--threads", "1", "--rss-ceiling-mb", "4096",
            "--no-verify"]
    return chroot.popen(root, cpu, argv, binds, cpuinfo, log)


def check_foreign_build(result: CpuResult, root: Path, binds: dict[str, Path], source: Path,
                        work: Path, pi5_lib: Path) -> None:
    """A Pi 5 build on this (older) CPU: the daemon's preflight must refuse it, exit 5 naming
    "built for another CPU?", instead of dying at the first request."""
    bundle = _bundle(result.cpu, source, work)
    log = work / f"foreign-{result.cpu.qemu}.log"
    daemon = _start_serve(result.cpu, root, {**binds, chroot.LIB: pi5_lib, "/bundle": bundle},
                          _free_port(), work, log)
    try:
        code = daemon.wait(SERVE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, 9)
        daemon.wait()
        code = None
    text = log.read_text(errors="replace")
    if code == 5 and "built for another cpu?" in text.lower():
        result.foreign = "Pi 5 build refused: exit 5, 'built for another CPU?'"
        return
    result.foreign = f"FAILED: exit {code}"
    tail = " / ".join(text.strip().splitlines()[-3:])
    result.failures.append(f"Pi 5 build on {result.cpu.qemu}: exit {code}, expected 5 with "
                           f"'built for another CPU?': {tail}")


def check_serve(result: CpuResult, root: Path, binds: dict[str, Path], source: Path,
                work: Path) -> None:
    """`edgerunner serve` of a bundle packed for the board answers a short request."""
    import httpx

    bundle = _bundle(result.cpu, source, work)
    port = _free_port()
    log = work / f"serve-{result.cpu.qemu}.log"
    daemon = _start_serve(result.cpu, root, {**binds, "/bundle": bundle}, port, work, log)
    started = time.monotonic()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=SERVE_TIMEOUT_S) as client:
            while True:
                if daemon.poll() is not None:
                    raise RuntimeError(f"serve exited {daemon.returncode} before ready")
                if time.monotonic() - started > SERVE_TIMEOUT_S:
                    raise RuntimeError("serve not ready in time")
                try:
                    if client.get("/health", timeout=5).json().get("state") == "ready":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(1)
            ready_s = time.monotonic() - started
            reply = client.post("/v1/completions", json={"prompt": "The capital of France is",
                                                         "max_tokens": 4, "temperature": 0})
            reply.raise_for_status()
            text = reply.json()["choices"][0]["text"]
            answered_s = time.monotonic() - started - ready_s
            memory = client.get("/health", timeout=30).json().get("memory", {})
        # RSS under qemu-user includes the emulator's own (~50 MB): shown, not checked
        result.serve = (f"{bundle.name.split('-')[-1]} ready {ready_s:.0f}s, answered "
                        f"{text!r} in {answered_s:.0f}s, RSS {memory.get('rss_mb')} MiB "
                        f"(predicted {memory.get('predicted_mb')})")
    except (RuntimeError, httpx.HTTPError, KeyError, ValueError) as exc:
        tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        result.serve = f"FAILED: {exc}"
        result.failures.append(f"serve: {exc}: {tail}")
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, 15)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, 9)
                daemon.wait()


def run_cpu(cpu: Cpu, rootfs_dir: Path, binds: dict[str, Path], source: Path,
            quants: dict[str, Path], work: Path, serve: bool, pi5_lib: Path) -> CpuResult:
    result = CpuResult(cpu)
    started = time.monotonic()
    try:
        check_detect(result, rootfs_dir, binds)
        check_buffers(result, rootfs_dir, binds, source, quants)
        if serve:
            check_serve(result, rootfs_dir, binds, source, work)
        if serve and cpu.qemu == FOREIGN_CPU:
            check_foreign_build(result, rootfs_dir, binds, source, work, pi5_lib)
    except (subprocess.SubprocessError, OSError) as exc:
        result.failures.append(f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    print(f"[{cpu.qemu}] done in {result.seconds:.0f} s, {len(result.failures)} failure(s)",
          flush=True)
    return result


def table(results: list[CpuResult]) -> str:
    """The per-CPU table: llama.cpp's MiB / edgerunner's MiB per buffer."""
    columns = [*BUFFERS, "unmapped"]
    head = f"{'cpu':<11} {'variant':<10} {'quant':<7}" + "".join(
        f" {name + ' llama/pred':>22}" for name in columns)
    lines = [head, "-" * len(head)]
    for res in results:
        for row in res.rows:
            cells = "".join(
                f" {row['llama'].get(p, '-')!s:>10} / {row['edgerunner'].get(p, '-')!s:<9}"
                for p in columns)
            lines.append(f"{res.cpu.qemu:<11} {row['variant']!s:<10} {row['quant']!s:<7}{cells}")
        lines.append(f"{res.cpu.qemu:<11} detect: {', '.join(res.detected) or '?'} "
                     f"(expected {', '.join(res.cpu.features)}); serve: {res.serve}; "
                     f"{res.foreign + '; ' if res.foreign else ''}{res.seconds:.0f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="append", help="only this qemu CPU (repeatable)")
    parser.add_argument("--no-serve", action="store_true", help="skip the serve check")
    parser.add_argument("--jobs", type=int, default=2, help="CPUs emulated at once")
    parser.add_argument("--warm-only", action="store_true",
                        help="run only if every cached item is there; else say so and exit 0")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    opts = parser.parse_args()
    print(f"ARM lane cache: {lane_cache.root()}", flush=True)
    if opts.warm_only and not ready():
        print("ARM lane skipped: its cache is cold (run `make test-arm` once to build it)")
        return 0
    if opts.warm_only and (why := unusable()):
        print(f"ARM lane skipped: {why}")
        return 0
    started = time.monotonic()
    qemu.ensure_binfmt()
    # debootstrap runs one emulated process at a time: the cross builds overlap it
    with ThreadPoolExecutor(max_workers=1) as background:
        tar = background.submit(rootfs.tarball)
        lib = cross_build.libs()
        pi5_lib = cross_build.pi5_libs()
        site = wheels.site()
        source, quants = models()
        tar.result()
    print(f"cache ready in {time.monotonic() - started:.0f} s", flush=True)
    cpus = [by_name(name) for name in opts.cpu] if opts.cpu else list(CPUS)
    with tempfile.TemporaryDirectory(prefix="arm-lane-") as tmp:
        work = Path(tmp)
        root = rootfs.restore(work / "rootfs")
        binds = _binds(lib, site, source.parent)
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            results = list(pool.map(
                lambda cpu: run_cpu(cpu, root, binds, source, quants, work, not opts.no_serve,
                                    pi5_lib), cpus))
    print(table(results))
    failures = [f"{r.cpu.qemu}: {f}" for r in results for f in r.failures]
    if opts.json:
        Path(opts.json).write_text(json.dumps([
            {"cpu": r.cpu.qemu, "rows": r.rows, "detected": r.detected, "serve": r.serve,
             "foreign_build": r.foreign,
             "failures": r.failures, "seconds": round(r.seconds)} for r in results], indent=1))
    for failure in failures:
        print(f"FAIL {failure}")
    checks = sum(sum(len(BUFFERS) + 2 + ("unmapped" in row["llama"]) for row in r.rows)
                 + 1 + (not opts.no_serve) + bool(r.foreign) for r in results)
    print(f"ARM lane took {time.monotonic() - started:.0f} s")
    print(f"arm-lane: {checks - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
