"""Memory predictions for other context sizes, computed in a child process.

Parsing a GGUF header leaves tens of MiB in the parsing process (vocabulary arrays, heap
fragmentation); the daemon must not carry that for its whole life, so a short-lived
`python -m edgerunner.runtime.engine.predict` does it and prints the totals as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgerunner import __version__
from edgerunner._fs import atomic_write_text
from edgerunner.bundle.manifest import BundleManifest, RuntimePlan
from edgerunner.pack.isa import repack_isa
from edgerunner.runtime.engine.preflight import verdict_dir

logger = logging.getLogger(__name__)


def _ask_child(model_path: Path, plan: RuntimePlan, timeout: float, **question: Any) -> Any:
    """`main` in a child process: the model, the plan and the question in, its JSON out."""
    request = json.dumps({"model": str(model_path), "plan": plan.model_dump(), **question})
    done = subprocess.run([sys.executable, "-m", "edgerunner.runtime.engine.predict"],
                          input=request, capture_output=True, text=True, timeout=timeout,
                          check=True)
    return json.loads(done.stdout)


def predict_totals(model_path: Path, plan: RuntimePlan, n_ctxs: list[int],
                   timeout: float = 120.0) -> dict[int, float]:
    """edgerunner.pack.memory's predicted total MiB for each n_ctx (run in a child process)."""
    totals = _ask_child(model_path, plan, timeout, n_ctx=n_ctxs)
    return {int(k): float(v) for k, v in totals.items()}


def weights_saving_mb(manifest: BundleManifest, model_path: Path, features: list[str],
                      timeout: float = 120.0, store: Path | None = None) -> float:
    """MiB the weights hold less (negative: more) when a CPU with these features serves the
    bundle than on the profile's CPU its manifest predicts for.

    llama.cpp repacks weights by the serving CPU's rules: a Pi 5 bundle holds a repacked Q8_0
    output copy there that an x86 AVX2 host never makes. The manifest keeps the weights for
    every repack ISA (prediction.weights_mb_by_cpu); a bundle packed before that is asked of
    edgerunner.pack.memory in a child process, once: the answer is kept in `store` (beside
    the preflight's verdicts)."""
    planned = repack_isa(manifest.profile.cpu.features)
    here = repack_isa(features)
    if here == planned:
        return 0.0
    by_cpu = manifest.prediction.weights_mb_by_cpu
    if planned not in by_cpu or here not in by_cpu:
        by_cpu = _weights_by_isa(manifest, model_path, [planned, here], timeout,
                                 store or verdict_dir())
    return by_cpu[planned] - by_cpu[here]


def _weights_by_isa(manifest: BundleManifest, model_path: Path, isas: list[str],
                    timeout: float, store: Path) -> dict[str, float]:
    """The child's weights per repack ISA, cached by the model's hash, the plan, the ISAs and
    edgerunner's version (its memory model); a cache file that does not read is asked again."""
    key = hashlib.sha256(json.dumps(
        [manifest.files["model.gguf"].sha256, manifest.plan.model_dump(mode="json"),
         sorted(isas), __version__], sort_keys=True).encode()).hexdigest()[:24]
    path = store / f"weights-{key}.json"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and all(
                isinstance(cached.get(isa), (int, float)) for isa in isas):
            return {isa: float(cached[isa]) for isa in isas}
    weights: dict[str, float] = _ask_child(model_path, manifest.plan, timeout,
                                           weights_for=isas)["weights_mb"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(weights))
    except OSError as exc:  # a read-only home: the next start asks the child again
        logger.warning("weights per CPU not cached (%s)", exc)
    return weights


def main() -> None:
    """Read {"model", "plan", "n_ctx": [...]} on stdin, print {n_ctx: total_mb}; or with
    "weights_for": [repack ISAs] instead of "n_ctx", print {"weights_mb": {isa: MiB}}."""
    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.memory import estimate_memory, weights_by_isa

    request = json.loads(sys.stdin.read())
    plan = RuntimePlan.model_validate(request["plan"])
    info = read_model_info(Path(request["model"]))
    if "weights_for" in request:
        weights = weights_by_isa(info, plan.quant, plan.mmap, request["weights_for"])
        json.dump({"weights_mb": weights}, sys.stdout)
        return
    totals = {
        n: estimate_memory(info, plan.quant, n, plan.kv_type, plan.n_batch, plan.n_ubatch,
                           plan.flash_attn, plan.swa_full, n_parallel=plan.n_parallel,
                           n_seq_max=plan.n_seq_max).total_mb
        for n in request["n_ctx"]
    }
    json.dump(totals, sys.stdout)


if __name__ == "__main__":
    main()
