"""Pack time against a bare llama_model_quantize call, and predicted vs actual file size.

In one run, on the same input, with the same quant and thread count:
  bare   llama_cpp.llama_model_quantize(src, dst, params) and nothing else
  pack   edgerunner.pack.packer.pack(): read the header, plan, quantize, hash, render, write
         the manifest, fsync, rename
Trials alternate the order (bare first, then pack first) so neither always runs on a warmer
page cache; the table reports medians and pack/bare, in wall time and in this process's CPU
time (user+sys over all threads), which other load on a shared machine disturbs far less.
Then each preset is packed once and the plan's predicted model.gguf size is set against the
real one.

    python3 tools/bench/bench_pack.py [--source default|f16] [--quant Q4_K_M] [--trials 5]
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

from edgerunner.pack.default_model import ensure_default_model
from edgerunner.pack.gguf_info import read_model_info
from edgerunner.pack.packer import PackResult, pack
from edgerunner.pack.planner import PlanOptions
from edgerunner.pack.quantize import FLOAT_TYPES, ftype_for, quantize
from edgerunner.profiles import resolve_profile

SIZE_PRESETS = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


Sample = tuple[float, float]  # (wall s, CPU s)


def timed(func: Callable[[], object]) -> tuple[Sample, object]:
    """Wall and process CPU time of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = func()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def bare_quantize(src: Path, dst: Path, quant: str, threads: int, requantize: bool) -> Sample:
    """The baseline: one llama_model_quantize call, timed."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(quant)
    params.nthread = threads
    params.allow_requantize = requantize
    sample, rc = timed(lambda: llama_cpp.llama_model_quantize(
        str(src).encode(), str(dst).encode(), ctypes.byref(params)))
    if rc != 0:
        raise SystemExit(f"bare llama_model_quantize failed with {rc}")
    return sample


def median(samples: list[Sample], index: int) -> float:
    return statistics.median(s[index] for s in samples)


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

        bare_times: list[Sample] = []
        pack_times: list[Sample] = []
        phases: dict[str, list[float]] = {}

        def run_bare(i: int) -> None:
            dst = work / f"bare-{i}.gguf"
            bare_times.append(bare_quantize(src, dst, args.quant, args.threads, requantize))
            dst.unlink()

        def run_pack(i: int) -> None:
            out = work / f"pack-{i}"
            sample, result = timed(lambda: pack(src, profile, out, PlanOptions(quant=args.quant),
                                                n_threads=args.threads))
            pack_times.append(sample)
            assert isinstance(result, PackResult)
            for name, seconds in result.timings.items():
                phases.setdefault(name, []).append(seconds)
            shutil.rmtree(out)

        for i in range(args.trials):
            order = (run_bare, run_pack) if i % 2 == 0 else (run_pack, run_bare)
            for step in order:
                step(i)

        print(f"{'':>24} {'wall s':>7} {'CPU s':>7}  wall per trial")
        for label, samples in (("bare quantize", bare_times), ("pack (whole)", pack_times)):
            print(f"{label:>24} {median(samples, 0):7.3f} {median(samples, 1):7.3f}  "
                  + " ".join(f"{s[0]:.3f}" for s in samples))
        for name, values in phases.items():
            print(f"{'pack: ' + name:>24} {statistics.median(values):7.3f}")
        header = statistics.median(phases["read_header"])
        for index, kind in ((0, "wall"), (1, "CPU")):
            ratio = median(pack_times, index) / median(bare_times, index)
            print(f"\npack / bare ({kind}) = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%)",
                  end="")
        # Not the overhead (that is the ratio above): where it goes. The header read parses the
        # whole vocabulary, a fixed cost that does not grow with the model's size.
        share = header / median(pack_times, 0)
        print(f"\nof pack's wall time, reading the GGUF header took {header:.3f} s ({share:.0%})\n")

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
