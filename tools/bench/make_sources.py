"""Real-shape F16 sources for benchmarks, random weights: Llama-3.2-1B/3B, Qwen2.5-0.5B/1.5B,
Qwen3-0.6B, Gemma-3-1B, SmolLM2-1.7B, Phi-3.5-mini (tests/shapes.py).

tests/shapes.py writes each source's header exactly as convert_hf_to_gguf.py would (metadata,
tensor names, shapes, the default model's tokenizer padded to the real vocabulary) over a
zero-filled hole: enough for the planner, but a model of zeros gives equal logits, so greedy
decoding picks token 0 (SmolLM2's <|endoftext|>, end of generation) and stops at once. This
script copies that file and fills every tensor with random values (norm weights 1, the rest
normal with a small deviation; the padding tokens' embedding rows zero, so that they are never
the greedy choice and every token has text), so the packed model talks until max_tokens.
Speed and memory do not depend on the values.

    python tools/bench/make_sources.py [--shape llama-1b|qwen3-0.6b|phi3.5-mini ...] [-o DIR]
        [--pack PROFILE]

Prints the path of each source (and with --pack, of each bundle `edgerunner pack` wrote from
it, e.g. `--pack rpi5-4gb --quant Q8_0`). Sources are reused when already there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.shapes

from edgerunner.pack.default_model import ensure_default_model
from edgerunner.paths import cache_dir
from tests.shapes import (
    GEMMA3_1B,
    LLAMA_3_2_1B,
    LLAMA_3_2_3B,
    PHI3_5_MINI,
    QWEN2_5_0_5B,
    QWEN2_5_1_5B,
    QWEN3_0_6B,
    SMOLLM2_1_7B,
    Shape,
    cached_source,
    read_tokenizer,
)

SHAPES = {"llama-1b": LLAMA_3_2_1B, "qwen-0.5b": QWEN2_5_0_5B, "qwen3-0.6b": QWEN3_0_6B,
          "qwen-1.5b": QWEN2_5_1_5B, "gemma3-1b": GEMMA3_1B, "smollm2-1.7b": SMOLLM2_1_7B,
          "phi3.5-mini": PHI3_5_MINI, "llama-3b": LLAMA_3_2_3B}
STD = 0.02  # the usual initializer's deviation: logits stay spread, no token dominates
SEED = 0
ROWS = 1 << 22  # values generated at a time (8 MiB of F16)


def fill_random(path: Path, n_real_tokens: int, seed: int = SEED) -> None:
    """Overwrite every tensor of an F16/F32 GGUF in place: norms 1, everything else N(0, STD),
    except the embedding rows of the padding tokens past `n_real_tokens`: zero, so their
    logits (tied output) are 0 and greedy decoding picks real tokens, which have text."""
    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(path, "r+")
    for tensor in reader.tensors:
        flat = tensor.data.reshape(-1)
        if tensor.name.endswith("norm.weight") or tensor.name.startswith("rope_"):
            flat[:] = 1.0
            continue
        for start in range(0, flat.size, ROWS):
            end = min(flat.size, start + ROWS)
            flat[start:end] = rng.normal(0.0, STD, end - start).astype(flat.dtype)
        if tensor.name == "token_embd.weight":
            tensor.data[n_real_tokens:] = 0  # numpy's shape: (n_vocab, n_embd)
    reader.data.flush()


def random_source(shape: Shape, out: Path) -> Path:
    """The shape's source with random weights at out/<name>-f16-random.gguf (made once)."""
    target = out / f"{shape.name.lower().replace(' ', '-')}-f16-random.gguf"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ensure_default_model()
    hole = cached_source(shape, tokenizer)
    partial = target.with_suffix(".partial")
    shutil.copyfile(hole, partial)
    # a generated SentencePiece vocabulary has no padding: every token has text
    real = shape.n_vocab if shape.vocab == "spm" else len(read_tokenizer(tokenizer).tokens)
    fill_random(partial, real)
    partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=sorted(SHAPES))
    parser.add_argument("-o", "--out", type=Path, default=cache_dir() / "bench-sources")
    parser.add_argument("--pack", metavar="PROFILE", help="also pack each source for PROFILE")
    parser.add_argument("--quant", help="with --pack: force this quantization preset")
    args = parser.parse_args()
    for name in args.shape:
        source = random_source(SHAPES[name], args.out)
        print(source)
        if args.pack:
            bundles = args.out / "bundles"
            bundles.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "edgerunner", "pack", str(source), "--profile",
                   args.pack, "-o", str(bundles)]
            if args.quant:
                cmd += ["--quant", args.quant]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
