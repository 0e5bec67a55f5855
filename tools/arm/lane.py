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
- on the A76 and the A72, the shape matrix (tests/shapes.py MATRIX: vocabularies 32k-262k,
  tied and untied, GQA 1/4/8, head sizes 64-256, sliding window), each cell served for a
  request filling n_ctx 2048 as on x86 (tests/pack/test_shape_matrix.py): llama.cpp's weight,
  repack, KV, output and compute buffers equal the prediction for this CPU within 1 MiB, the
  tensors it repacks are the predicted ones, and VmHWM less the emulator's share is within 5%
  of the predicted peak. The emulator's share is measured per cell: the same model served at
  n_ctx 256 under qemu and on the host, what each process holds beyond llama.cpp's buffers,
  one less the other (check_matrix says what that covers). The matrix takes ~40 min per CPU
  on 2 cores (both CPUs at once); `--no-matrix` leaves it out;
- on the Pi 4's CPU, a monolithic Pi 5 build (`-march=armv8.2-a+dotprod+fp16`, what a Pi 5
  builds natively) is refused by the daemon's preflight: exit 5, "built for another CPU?".

It prints a per-CPU table and exits 1 if any check fails. Everything it builds is cached under
`$XDG_CACHE_HOME/edgerunner/arm-lane/<key>/` (lane_cache.py). Measured on 2 shared cores: cold
18 min (debootstrap overlapping the two cross builds, ~15 min, then the checks), warm ~5 min.
Runs as root (chroot, mounts, apt-get).

    .venv/bin/python tools/arm/lane.py                 # all three CPUs
    .venv/bin/python tools/arm/lane.py --cpu cortex-a76 --no-serve
    .venv/bin/python tools/arm/lane.py --cpu cortex-a72 --no-serve --only-matrix
    .venv/bin/python tools/arm/lane.py --only-matrix --no-serve --shape v128k-tied-gqa4-h128
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
import matrix_probe
import qemu
import rootfs
import wheels
from cpus import CPUS, Cpu, by_name

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # tests/shapes.py: the shape matrix, its buffers
TOLERANCE = 0.01  # relative, when not equal to the MiB llama.cpp prints (2 decimals)
BUFFERS = ("mapped", "repack", "kv", "compute", "output")
PROBE_TIMEOUT_S = 900
SERVE_TIMEOUT_S = 600
FOREIGN_CPU = "cortex-a72"  # where the Pi 5 build is tried (the Pi 4)


MATRIX_CTX = 2048  # as tests/pack/test_shape_matrix.py
BASELINE_CTX = 256  # each matrix cell's emulator baseline: the same model at a small context
# The Pi Zero 2 W's A53 repacks as the Pi 4's A72 does (NEON, ggml's armv8.0 variant): the
# matrix runs on the two CPUs whose repack rules differ, not three times.
MATRIX_CPUS = ("cortex-a76", "cortex-a72")
MATRIX_TIMEOUT_S = 4800  # both plans of every cell, two CPUs emulated at once
VMHWM_TOLERANCE = 0.05
MATRIX_PARTS = ("weights", "repack", "kv", "output", "compute")


@dataclass
class CpuResult:
    """Everything the lane saw on one emulated CPU."""

    cpu: Cpu
    rows: list[dict[str, Any]] = field(default_factory=list)
    matrix: list[dict[str, Any]] = field(default_factory=list)
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


def matrix_models(source: Path) -> list[tuple[Any, Path]]:
    """The shape matrix's models, quantized on the host (cached beside the x86 tests' copies)."""
    from shapes import MATRIX, matrix_model

    return [(shape, matrix_model(shape, source)) for shape in MATRIX]


def matrix_cells(models: list[tuple[Any, Path]], features: list[str]) -> list[dict[str, Any]]:
    """Each cell's plan for this CPU and what edgerunner predicts of it (the x86 test's cells:
    flash attention alternating, mmap as prefer_mmap says for these features)."""
    from shapes import predicted_buffers

    from edgerunner.bundle.manifest import RuntimePlan
    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.memory import estimate_memory, prefer_mmap, repacked_tensors

    cells = []
    for i, (shape, model) in enumerate(models):
        info = read_model_info(model)
        flash_attn = i % 2 == 1
        mmap = prefer_mmap(info, shape.quant, features)
        plan = RuntimePlan(quant=shape.quant, n_ctx=MATRIX_CTX, flash_attn=flash_attn,
                           mmap=mmap, n_threads=1)
        total = estimate_memory(info, shape.quant, MATRIX_CTX, flash_attn=flash_attn,
                                cpu_features=features, mmap=mmap).total_mb
        cells.append({
            "name": shape.name, "model": f"/shapes/{model.name}", "host_model": str(model),
            "plan": plan.model_dump(), "prompt_tokens": MATRIX_CTX - 8,
            "baseline_plan": plan.model_copy(update={"n_ctx": BASELINE_CTX}).model_dump(),
            "baseline_tokens": BASELINE_CTX - 8, "quant": shape.quant, "flash_attn": flash_attn,
            "mmap": mmap, "predicted_total": round(total, 1),
            "predicted_repacked": sorted(repacked_tensors(info, shape.quant, features)),
            "predicted": {part: round(mib, 2) for part, mib in predicted_buffers(
                info, shape.quant, MATRIX_CTX, flash_attn=flash_attn, features=features,
                mmap=mmap).items()},
        })
    return cells


def _beyond_buffers(served: dict[str, Any]) -> float:
    """What a served process held at its peak beyond the buffers llama.cpp logged (MiB)."""
    return float(served["vmhwm_mb"]) - sum(served["buffers"].values())


def check_matrix(result: CpuResult, root: Path, binds: dict[str, Path],
                 models: list[tuple[Any, Path]]) -> None:
    """The shape matrix served on this CPU: buffers to the MiB, VmHWM within 5%.

    Under qemu-user a process's VmHWM is not the board's: it adds qemu's own code and heap and
    the translated code of the kernels this model runs, and mapped weights a request never
    reads stay out of RSS (qemu does not honour MAP_POPULATE). One imports-only process as the
    baseline for every cell left errors of -10% to +14%. So each cell is first served at
    BASELINE_CTX here and on the host. What each held beyond llama.cpp's logged buffers, the
    guest's less the host's, is this model's emulator share (measured: 42-65 MiB); it is taken
    off the full-context VmHWM. The check then covers, on this CPU, the buffers (also checked to the
    MiB) and whatever beyond them grows from BASELINE_CTX to MATRIX_CTX; the fixed process
    overhead is the host's (tests/pack/test_shape_matrix.py checks it there).
    """
    from shapes import buffer_parts

    features = result.detected or list(result.cpu.features)
    cells = matrix_cells(models, features)
    keys = ("name", "model", "plan", "prompt_tokens", "baseline_plan", "baseline_tokens")
    request = {"cells": [{k: c[k] for k in keys} for c in cells]}
    host = {c["name"]: matrix_probe.served(Path(c["host_model"]), c["baseline_plan"],
                                           c["baseline_tokens"]) for c in cells}
    shapes_dir = models[0][1].parent
    done = chroot.run(root, result.cpu, ["python3", f"{chroot.SRC}/tools/arm/matrix_probe.py",
                                         json.dumps(request)], {**binds, "/shapes": shapes_dir},
                      timeout=MATRIX_TIMEOUT_S)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    served = {line["name"]: line for line in lines if "name" in line}
    if done.returncode != 0 or len(served) != len(cells):
        tail = " / ".join((done.stderr or "").strip().splitlines()[-4:])
        result.failures.append(f"matrix probe exited {done.returncode}: {tail}")
    for cell in cells:
        got = served.get(cell["name"])
        if got is None:
            continue
        measured = buffer_parts(got["buffers"], cell["mmap"])
        emulator = _beyond_buffers(got["baseline"]) - _beyond_buffers(host[cell["name"]])
        vmhwm_here = got["vmhwm_mb"] - emulator
        error = (cell["predicted_total"] - vmhwm_here) / vmhwm_here
        row = {**cell, "llama": measured, "vmhwm_mb": got["vmhwm_mb"],
               "emulator_mb": round(emulator, 1), "error": round(error, 4),
               "repacked": got["repacked"], "filled": got["filled"],
               "baseline": got["baseline"], "host_baseline": host[cell["name"]]}
        result.matrix.append(row)
        fa = "on" if cell["flash_attn"] else "off"
        label = f"matrix {cell['name']} ({cell['quant']}, fa {fa})"
        for part in MATRIX_PARTS:
            value = measured[part]
            if value is None or abs(value - cell["predicted"][part]) > 1.0:
                result.failures.append(f"{label} {part}: llama.cpp {value} MiB, edgerunner "
                                       f"{cell['predicted'][part]} MiB")
        if got["repacked"] != cell["predicted_repacked"]:
            result.failures.append(f"{label}: llama.cpp repacked {got['repacked'][:4]}..., "
                                   f"edgerunner {cell['predicted_repacked'][:4]}...")
        if got["filled"] < cell["prompt_tokens"]:
            result.failures.append(f"{label}: the request filled {got['filled']} tokens, "
                                   f"not {cell['prompt_tokens']}")
        if abs(error) > VMHWM_TOLERANCE:
            result.failures.append(
                f"{label}: predicted {cell['predicted_total']} MiB, VmHWM {got['vmhwm_mb']:.1f} "
                f"MiB less the emulator's {emulator:.1f} = {vmhwm_here:.1f} ({error:+.1%})")


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


@dataclass(frozen=True)
class Checks:
    """Which checks a run makes."""

    buffers: bool = True
    matrix: bool = True
    serve: bool = True


def run_cpu(cpu: Cpu, rootfs_dir: Path, binds: dict[str, Path], source: Path,
            quants: dict[str, Path], work: Path, checks: Checks, pi5_lib: Path,
            models: list[tuple[Any, Path]]) -> CpuResult:
    result = CpuResult(cpu)
    started = time.monotonic()
    serve = checks.serve
    try:
        check_detect(result, rootfs_dir, binds)
        if checks.buffers:
            check_buffers(result, rootfs_dir, binds, source, quants)
        if checks.matrix and cpu.qemu in MATRIX_CPUS:
            check_matrix(result, rootfs_dir, binds, models)
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
        for cell in res.matrix:
            parts = " ".join(f"{p} {cell['llama'][p]}/{cell['predicted'][p]}"
                             for p in MATRIX_PARTS)
            lines.append(
                f"{res.cpu.qemu:<11} matrix {cell['name']:<26} {cell['quant']:<7} fa "
                f"{'on ' if cell['flash_attn'] else 'off'} mmap {'on ' if cell['mmap'] else 'off'} "
                f"{parts}; peak {cell['predicted_total']} pred, VmHWM {cell['vmhwm_mb']:.1f} "
                f"- emulator {cell['emulator_mb']} = {cell['vmhwm_mb'] - cell['emulator_mb']:.1f} "
                f"({cell['error']:+.1%})")
        lines.append(f"{res.cpu.qemu:<11} detect: {', '.join(res.detected) or '?'} "
                     f"(expected {', '.join(res.cpu.features)}); serve: {res.serve}; "
                     f"{res.foreign + '; ' if res.foreign else ''}{res.seconds:.0f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="append", help="only this qemu CPU (repeatable)")
    parser.add_argument("--no-serve", action="store_true", help="skip the serve check")
    parser.add_argument("--no-matrix", action="store_true", help="skip the shape matrix")
    parser.add_argument("--only-matrix", action="store_true",
                        help="of the memory checks, only the shape matrix (with detect)")
    parser.add_argument("--shape", action="append",
                        help="of the shape matrix, only this shape (repeatable)")
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
    checks = Checks(buffers=not opts.only_matrix, matrix=not opts.no_matrix,
                    serve=not opts.no_serve)
    shapes = [(shape, model) for shape, model in (matrix_models(source) if checks.matrix else [])
              if not opts.shape or shape.name in opts.shape]
    with tempfile.TemporaryDirectory(prefix="arm-lane-") as tmp:
        work = Path(tmp)
        root = rootfs.restore(work / "rootfs")
        binds = _binds(lib, site, source.parent)
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            results = list(pool.map(
                lambda cpu: run_cpu(cpu, root, binds, source, quants, work, checks, pi5_lib,
                                    shapes), cpus))
    print(table(results))
    failures = [f"{r.cpu.qemu}: {f}" for r in results for f in r.failures]
    if opts.json:
        Path(opts.json).write_text(json.dumps([
            {"cpu": r.cpu.qemu, "rows": r.rows, "detected": r.detected, "serve": r.serve,
             "foreign_build": r.foreign, "matrix": r.matrix,
             "failures": r.failures, "seconds": round(r.seconds)} for r in results], indent=1))
    for failure in failures:
        print(f"FAIL {failure}")
    count = sum(sum(len(BUFFERS) + 2 + ("unmapped" in row["llama"]) for row in r.rows)
                + len(r.matrix) * (len(MATRIX_PARTS) + 3)
                + 1 + (not opts.no_serve) + bool(r.foreign) for r in results)
    print(f"ARM lane took {time.monotonic() - started:.0f} s")
    print(f"arm-lane: {count - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
