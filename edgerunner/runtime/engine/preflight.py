"""Decode preflight: before the daemon says READY, prove in a child process that llama.cpp can
decode this bundle on this CPU.

A llama.cpp build can select a CPU path the host cannot run: ggml's AMX kernels on a Xeon whose
VM traps `tileloadd`, a Pi 5 build (dotprod) copied to a Pi 4. Such a process dies with SIGILL
at its first decode, not at load, and would take every in-flight request with it. So a child
loads the model with the plan's settings and decodes a few tokens:

- it answers: serve as planned ("default": llama.cpp's extra buffer types on, weights repacked);
- it dies from a signal: a second child tries with the extra buffer types off (no AMX, no
  repacking), and if it answers, the daemon serves that way ("no_extra_bufts");
- that dies too: PreflightError, naming the signal, the CPU features llama.cpp saw and the fix.

The verdict is cached per (model sha256, llama.cpp build, CPU, kernel, settings), so a restart
does not pay it again. The child runs with n_ctx capped at PREFLIGHT_CTX: the CPU paths are the
same at any context size, and a small KV cache keeps the child's memory near the weights alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgerunner._fs import atomic_write_text
from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.errors import EdgerunnerError, ModelError
from edgerunner.paths import cache_dir

logger = logging.getLogger(__name__)

Path_ = Literal["default", "no_extra_bufts"]
PREFLIGHT_CTX = 512
PREFLIGHT_PROMPT = "The quick brown fox jumps over the lazy dog. Count: one, two, three,"
PREFLIGHT_TOKENS = 4
REBUILD = "python3 tools/build/llama_build.py --rebuild --install .venv/bin/python"
CRASH_SIGNALS = {signal.SIGILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE}


class PreflightError(EdgerunnerError):
    """llama.cpp cannot decode on this CPU, with or without its extra buffer types."""


class Verdict(BaseModel):
    """Which llama.cpp path decodes on this host, and how that was found out."""

    model_config = ConfigDict(extra="forbid")

    path: Path_ = Field(..., description="default: extra buffer types on; else off")
    failures: list[str] = Field(default_factory=list, description="paths that died, and how")
    seconds: float = Field(0.0, ge=0, description="what the preflight children took")
    cached: bool = Field(False, description="read from the cache instead of run now")
    key: str = Field("", description="the cache key")
    system_info: str = Field("", description="llama.cpp's CPU features")

    @property
    def extra_bufts(self) -> bool:
        return self.path == "default"


def system_info() -> str:
    """The CPU features this llama.cpp build uses ("AVX2 = 1 | ...")."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def build_id() -> str:
    """Which llama.cpp libraries llama_cpp loads (its own lib/, or LLAMA_CPP_LIB_PATH's, runtime
    CPU variants below it included): their names, sizes, inodes and modification times, hashed.
    Another build or a reinstall changes those; reading ~20 MiB of libraries on every start to
    hash their bytes would cost a Pi a quarter of a second for the same answer."""
    import llama_cpp

    lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    digest = hashlib.sha256()
    for lib in sorted(lib_dir.rglob("*.so*")):
        stat = lib.stat()
        digest.update(f"{lib.relative_to(lib_dir)}|{stat.st_size}|{stat.st_ino}|"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cpu_id(root: Path = Path("/")) -> str:
    """The CPU model, its flags and the kernel: what decides which instructions may run."""
    text = (root / "proc/cpuinfo").read_text(errors="replace") if (
        root / "proc/cpuinfo").exists() else ""
    first = text.split("\n\n", 1)[0]
    keep = [line for line in first.splitlines()
            if line.split(":", 1)[0].strip().lower() in
            {"model name", "flags", "features", "cpu implementer", "cpu part", "cpu architecture"}]
    return hashlib.sha256("\n".join([*keep, platform.release()]).encode()).hexdigest()[:16]


def cache_key(model_sha256: str, plan: RuntimePlan, n_threads: int) -> str:
    settings = json.dumps({"kv": plan.kv_type, "fa": plan.flash_attn, "swa": plan.swa_full,
                           "mmap": plan.mmap, "threads": n_threads,
                           "batch": [plan.n_batch, plan.n_ubatch]}, sort_keys=True)
    parts = [model_sha256, build_id(), cpu_id(), settings]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def verdict_dir() -> Path:
    """Where verdicts are kept: systemd's CacheDirectory/StateDirectory, else the user's cache."""
    for env in ("CACHE_DIRECTORY", "STATE_DIRECTORY"):
        if os.environ.get(env):
            return Path(os.environ[env].split(":")[0]) / "preflight"
    return cache_dir() / "preflight"


def preflight(model_path: Path, model_sha256: str, plan: RuntimePlan, n_threads: int, *,
              timeout_s: float = 300.0, store: Path | None = None,
              python: str | None = None) -> Verdict:
    """The path that decodes here: cached, or found out by decoding in child processes."""
    key = cache_key(model_sha256, plan, n_threads)
    store = store or verdict_dir()
    cached = _read_cached(store / f"{key}.json")
    if cached is not None:
        return cached.model_copy(update={"cached": True, "system_info": system_info()})
    python = python or os.environ.get("EDGERUNNER_PREFLIGHT_PYTHON") or sys.executable
    started = time.perf_counter()
    failures: list[str] = []
    for path in ("default", "no_extra_bufts"):
        died = _decode_in_child(python, model_path, plan, n_threads, path == "default", timeout_s)
        if died is None:
            verdict = Verdict(path=path, failures=failures, key=key,
                              seconds=round(time.perf_counter() - started, 2),
                              system_info=system_info())
            _write_cached(store / f"{key}.json", verdict)
            return verdict
        failures.append(f"{path}: {died}")
        logger.warning("preflight: llama.cpp died decoding with %s (%s)",
                       "extra buffer types on" if path == "default" else
                       "extra buffer types off", died)
    raise _cannot_decode(failures)


# llama_print_system_info's CPU feature names -> the profile vocabulary host.cpu reads
_SYSTEM_INFO_FEATURES = {
    "NEON": "neon", "FP16_VA": "fp16", "DOTPROD": "dotprod", "MATMUL_INT8": "i8mm",
    "SVE": "sve", "AVX": "avx", "AVX2": "avx2", "AVX512": "avx512", "F16C": "f16c", "FMA": "fma",
}


def _built_features(info: str) -> list[str]:
    """The CPU features a llama.cpp system info line says the build uses."""
    return [_SYSTEM_INFO_FEATURES[key.strip()] for key, _, value in
            (part.partition("=") for part in info.replace(":", "|").split("|"))
            if key.strip() in _SYSTEM_INFO_FEATURES and value.strip() == "1"]


def foreign_features(info: str, host: list[str]) -> list[str]:
    """Features the llama.cpp build uses (its system info) that this CPU does not report."""
    return [feature for feature in _built_features(info) if host and feature not in host]


def serving_features(info: str, host: list[str]) -> list[str]:
    """The CPU features llama.cpp's repack rules see here: those its CPU backend was built with
    (its system info; with runtime CPU variants, the variant loaded) that this CPU reports.
    Without a feature list in the system info, the CPU's own."""
    used = _built_features(info)
    if not used:
        return list(host)
    return [feature for feature in used if not host or feature in host]


def _cannot_decode(failures: list[str]) -> PreflightError:
    from edgerunner.host.cpu import host_cpu_features

    info = system_info()
    host = host_cpu_features()
    foreign = foreign_features(info, host)
    if foreign:
        return PreflightError(
            f"llama.cpp cannot decode on this CPU ({'; '.join(failures)}): built for another "
            f"CPU? This llama.cpp build uses {', '.join(foreign)}, which this CPU "
            f"({', '.join(host)}) lacks: a build made for a newer CPU (a Pi 5 build on a Pi 4) "
            f"dies like this at its first decode. Its CPU features: {info}",
            "build llama.cpp on this device, which builds for its own CPU: `python3 "
            "tools/build/llama_build.py --rebuild --install .venv/bin/python` (native on aarch64); "
            "or install one build for every Pi, with ggml's runtime CPU variants "
            "(CMAKE_ARGS='-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON ...'; README, "
            "\"On the device\")")
    return PreflightError(
        f"llama.cpp cannot decode on this CPU: {'; '.join(failures)}. "
        f"The CPU features this llama.cpp build uses: {info}",
        f"rebuild llama-cpp-python for this host: `{REBUILD}` (portable flags; see "
        "tools/build/llama_build.py), or reinstall it with CMAKE_ARGS='-DGGML_NATIVE=OFF "
        "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' pip install --no-cache-dir "
        "--force-reinstall llama-cpp-python")


def _decode_in_child(python: str, model_path: Path, plan: RuntimePlan, n_threads: int,
                     extra_bufts: bool, timeout_s: float) -> str | None:
    """None if the child decoded; else how it died. A non-signal failure is a ModelError."""
    request = json.dumps({"model": str(model_path), "plan": plan.model_dump(),
                          "threads": n_threads, "extra_bufts": extra_bufts})
    cmd = [python, "-m", "edgerunner.runtime.engine.preflight"]
    try:
        done = subprocess.run(cmd, input=request, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:.0f} s"
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode)
        if sig in CRASH_SIGNALS:
            return sig.name
        raise ModelError(f"the preflight child was killed by {sig.name}",
                         "something outside edgerunner stopped it; start again")
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise ModelError(f"llama.cpp could not load {model_path} in the preflight: "
                         f"{' / '.join(tail) or f'exit code {done.returncode}'}",
                         "check free memory and the bundle with `edgerunner verify --here`")
    return None


def _read_cached(path: Path) -> Verdict | None:
    try:
        return Verdict.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def _write_cached(path: Path, verdict: Verdict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, verdict.model_dump_json(exclude={"cached", "system_info"}))
    except OSError as exc:  # a read-only home: the next start pays the preflight again
        logger.warning("preflight verdict not cached (%s)", exc)


def main() -> None:
    """The child: load with the plan's settings (n_ctx capped), decode a few tokens."""
    from edgerunner.runtime.engine.core import Engine
    from edgerunner.runtime.protocol import CompletionRequest

    request = json.loads(sys.stdin.read())
    plan = RuntimePlan.model_validate(request["plan"])
    plan = plan.model_copy(update={"n_ctx": min(plan.n_ctx, PREFLIGHT_CTX)})
    engine = Engine(Path(request["model"]), plan, name="preflight", n_threads=request["threads"],
                    extra_bufts=request["extra_bufts"])
    # the daemon's own path: a prompt batch (the matrix-matrix kernels), then single-token
    # steps (matrix-vector) through the batch API
    prepared = engine.prepare(CompletionRequest(prompt=PREFLIGHT_PROMPT, temperature=0.0,
                                                max_tokens=PREFLIGHT_TOKENS), PREFLIGHT_TOKENS)
    engine.run(prepared, None, lambda: False)
    engine.close()


if __name__ == "__main__":
    main()
