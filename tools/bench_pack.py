"""Pack time against a bare llama_model_quantize call, and predicted vs actual file size.

In one run, on the same input, with the same quant and thread count:
  bare   llama_cpp.llama_model_quantize(src, dst, params) and nothing else
  pack   edgerunner.pack.pack(): read the header, plan, quantize, hash, render, write manifest,
         fsync, rename
Trials alternate the order (bare first, then pack first) so neither always runs on a warmer
page cache; the table reports medians and pack/bare. Then each preset is packed once and the
plan's predicted model.gguf size is set against the real one.

    python3 tools/bench_pack.py [--source default|f16] [--quant Q4_K_M] [--trials 5]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from edgerunner.gguf_info import read_model_info
from edgerunner.models import ensure_default_model
from edgerunner.pack import pack
from edgerunner.planner import PlanOptions
from edgerunner.profiles import resolve_profile
from edgerunner.quantize import FLOAT_TYPES, ftype_for, quantize

SIZE_PRESETS = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def bare_quantize(src: Path, dst: Path, quant: str, threads: int, requantize: bool) -> float:
    """The baseline: one llama_model_quantize call, timed."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant)
    params.nthread = threads
    params.allow_requantize = requantize
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"bare llama_model_quantize failed with {rc}")
    return elapsed


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["default", "f16"], default="f16",
                        help="default = the Q4_1 test model as shipped (requantized); "
                        "f16 = an F16 GGUF made from it first, what a real user packs from")
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--profile", default="rpi5")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.trials < 3:
        parser.error("--trials must be at least 3")

    profile = resolve_profile(args.profile)
    work = Path(tempfile.mkdtemp(prefix="er-bench-pack-", dir="/tmp"))
    try:
        src = ensure_default_model()
        if args.source == "f16":
            f16 = work / "SmolLM2-135M-Instruct-F16.gguf"
            quantize(src, f16, "F16", n_threads=args.threads, source_type="Q4_1")
            src = f16
        info = read_model_info(src)
        requantize = info.file_type.upper() not in FLOAT_TYPES
        print(f"source {src.name} ({info.file_type}, {src.stat().st_size / 2**20:.1f} MiB), "
              f"quant {args.quant}, {args.threads} threads, profile {profile.name}, "
              f"{args.trials} trials\n")

        bare_times: list[float] = []
        pack_times: list[float] = []
        phases: dict[str, list[float]] = {}

        def run_bare(i: int) -> None:
            dst = work / f"bare-{i}.gguf"
            bare_times.append(bare_quantize(src, dst, args.quant, args.threads, requantize))
            dst.unlink()

        def run_pack(i: int) -> None:
            out = work / f"pack-{i}"
            start = time.perf_counter()
            result = pack(src, profile, out, PlanOptions(quant=args.quant),
                          n_threads=args.threads)
            pack_times.append(time.perf_counter() - start)
            for name, seconds in result.timings.items():
                phases.setdefault(name, []).append(seconds)
            shutil.rmtree(out)

        for i in range(args.trials):
            order = (run_bare, run_pack) if i % 2 == 0 else (run_pack, run_bare)
            for step in order:
                step(i)

        bare, packed = statistics.median(bare_times), statistics.median(pack_times)
        print(f"{'':>22} {'median s':>9}  trials")
        print(f"{'bare quantize':>22} {bare:9.3f}  " + " ".join(f"{t:.3f}" for t in bare_times))
        print(f"{'pack (whole)':>22} {packed:9.3f}  " + " ".join(f"{t:.3f}" for t in pack_times))
        for name, values in phases.items():
            print(f"{'pack: ' + name:>22} {statistics.median(values):9.3f}")
        print(f"\npack / bare = {packed / bare:.3f}  (overhead {100 * (packed / bare - 1):+.1f}%)")
        without_header = packed - statistics.median(phases["read_header"])
        print(f"pack without the header read / bare = {without_header / bare:.3f}  "
              f"(overhead {100 * (without_header / bare - 1):+.1f}%)\n")

        print(f"{'preset':>8} {'predicted B':>13} {'actual B':>13} {'error':>8}")
        for quant in SIZE_PRESETS:
            out = work / f"size-{quant}"
            result = pack(src, profile, out, PlanOptions(quant=quant), n_threads=args.threads,
                          info=info)
            print(f"{quant:>8} {result.predicted_size:13d} {result.actual_size:13d} "
                  f"{100 * result.size_error:+7.3f}%")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
