"""Predicted vs measured peak RSS of a llama-cpp-python process, one fresh process per cell.

For the test model (or MODEL): quantize to a few presets into a temp dir with
llama_model_quantize, then for every (preset, n_ctx, KV type) start a new Python process that
loads the model with the plan's settings, runs one prompt filling half the context and reports
its peak RSS (VmHWM). Prints the table and the worst error against edgerunner.pack.memory.

    python tools/bench/bench_memory.py                 # the grid
    python tools/bench/bench_memory.py --overhead      # re-measure the constants in memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgerunner.host.cpu import host_cpu_features
from edgerunner.pack.default_model import ensure_default_model
from edgerunner.pack.gguf_info import ModelInfo, read_model_info
from edgerunner.pack.memory import MIB, estimate_memory, prefer_mmap, vocab_bytes
from edgerunner.pack.quant_rules import PRESETS

CHILD = r"""
import json, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out
args = json.loads(sys.argv[1])
# The prediction is for the serving process, so load everything the daemon imports.
import edgerunner.runtime.supervise.daemon
import llama_cpp
llama_cpp.llama_backend_init()
after_import = status()
if args["mode"] == "overhead":
    model = llama_cpp.llama_model_load_from_file(
        args["model"].encode(), llama_cpp.llama_model_default_params())
    print(json.dumps({"import": after_import, "model": status()}))
    sys.exit(0)
kv = llama_cpp.GGML_TYPE_Q8_0 if args["kv_type"] == "q8_0" else llama_cpp.GGML_TYPE_F16
llm = llama_cpp.Llama(
    args["model"], n_ctx=args["n_ctx"], n_batch=512, n_ubatch=512, n_threads=args["threads"],
    flash_attn=args["flash_attn"], type_k=kv, type_v=kv, use_mmap=args["mmap"], verbose=False,
)
loaded = status()
text = b"The quick brown fox jumps over the lazy dog while the clock strikes twelve. "
tokens = (llm.tokenize(text * (args["n_ctx"] // 8 + 1)))[: args["prompt_tokens"]]
llm.create_completion(tokens, max_tokens=1, temperature=0.0)
print(json.dumps({"import": after_import, "loaded": loaded, "prompt": status()}))
"""


def run_child(args: dict[str, object]) -> dict[str, dict[str, float]]:
    """Run one measurement in a fresh interpreter and return its /proc/self/status readings."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        capture_output=True, text=True, check=True,
    )
    result: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def quantize(source: Path, preset: str, out: Path) -> Path:
    """Quantize with llama.cpp directly (allow_requantize: the test model is already Q4_1)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[preset]
    params.allow_requantize = True
    target = out / f"{preset}.gguf"
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {preset}")
    return target


def measure_overhead(model: Path, info: ModelInfo) -> None:
    """Print the runtime constants memory.py uses, each from a fresh process."""
    runs = [run_child({"mode": "overhead", "model": str(model)}) for _ in range(3)]
    base = min(r["import"]["VmRSS"] for r in runs)
    anon = min(r["model"]["RssAnon"] - r["import"]["RssAnon"] for r in runs)
    print(f"RSS after importing the daemon + backend init: {base:.1f} MiB")
    print(f"anonymous memory of a loaded model (beyond mmap'd tensors): {anon:.1f} MiB")
    print(f"  the vocabulary model (memory.vocab_bytes) says {vocab_bytes(info) / MIB:.1f} MiB for "
          f"{info.n_vocab} tokens ({info.n_long_tokens} longer than 15 bytes), "
          f"{info.n_merges} merges")


def bench(model: Path, presets: list[str], contexts: list[int], threads: int) -> float:
    """Run the grid, print the table, return the worst relative error."""
    info = read_model_info(model)
    features = host_cpu_features()
    print(f"CPU features (decide llama.cpp's weight repacking): {', '.join(features) or 'none'}")
    table = Table("quant", "mmap", "n_ctx", "kv", "fa", "predicted MiB", "measured MiB", "error",
                  "pred kv+compute", "meas after load→prompt")
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="er-bench-") as tmp:
        for preset in presets:
            path = quantize(model, preset, Path(tmp))
            mmap = prefer_mmap(info, preset, features)
            for n_ctx in contexts:
                for kv_type, fa in (("f16", False), ("q8_0", True)):
                    prompt = n_ctx // 2
                    est = estimate_memory(info, preset, n_ctx, kv_type=kv_type, flash_attn=fa,
                                          filled=prompt, cpu_features=features, mmap=mmap)
                    got = run_child({"mode": "serve", "model": str(path), "n_ctx": n_ctx,
                                     "kv_type": kv_type, "flash_attn": fa, "threads": threads,
                                     "mmap": mmap, "prompt_tokens": prompt})
                    measured = got["prompt"]["VmHWM"]
                    error = (est.total_mb - measured) / measured
                    worst = max(worst, abs(error))
                    table.add_row(
                        preset, "on" if mmap else "off", str(n_ctx), kv_type, "on" if fa else "off",
                        f"{est.total_mb:.1f}", f"{measured:.1f}", f"{error:+.1%}",
                        f"{est.kv_mb:.1f}+{est.compute_mb:.1f}",
                        f"{got['loaded']['VmRSS']:.1f}→{got['prompt']['VmRSS']:.1f}",
                    )
    Console(width=150).print(table)
    print(f"max |error| = {worst:.1%} over {len(presets) * len(contexts) * 2} cells")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="source GGUF (default: test model)")
    parser.add_argument("--quants", default="Q4_0,Q4_K_M,Q8_0")
    parser.add_argument("--contexts", default="512,1024,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead", action="store_true", help="measure memory.py's constants")
    args = parser.parse_args()
    model = args.model or ensure_default_model()
    if args.overhead:
        measure_overhead(model, read_model_info(model))
        return
    start = time.monotonic()
    worst = bench(model, args.quants.split(","), [int(c) for c in args.contexts.split(",")],
                  args.threads)
    print(f"took {time.monotonic() - start:.0f} s")
    sys.exit(0 if worst <= 0.10 else 1)


if __name__ == "__main__":
    main()
