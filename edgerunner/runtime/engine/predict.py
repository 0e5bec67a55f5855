"""Memory predictions for other context sizes, computed in a child process.

Parsing a GGUF header leaves tens of MiB in the parsing process (vocabulary arrays, heap
fragmentation); the daemon must not carry that for its whole life, so a short-lived
`python -m edgerunner.runtime.engine.predict` does it and prints the totals as JSON.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from edgerunner.bundle.manifest import RuntimePlan

logger = logging.getLogger(__name__)


def predict_totals(model_path: Path, plan: RuntimePlan, n_ctxs: list[int],
                   timeout: float = 120.0) -> dict[int, float]:
    """edgerunner.pack.memory's predicted total MiB for each n_ctx (run in a child process)."""
    request = json.dumps({"model": str(model_path), "plan": plan.model_dump(), "n_ctx": n_ctxs})
    done = subprocess.run([sys.executable, "-m", "edgerunner.runtime.engine.predict"],
                          input=request, capture_output=True, text=True, timeout=timeout,
                          check=True)
    return {int(k): float(v) for k, v in json.loads(done.stdout).items()}


def predict_repacked_mb(model_path: Path, plan: RuntimePlan, cpu_features: list[str],
                        timeout: float = 120.0) -> float:
    """MiB of weights llama.cpp copies into its repack buffer on a CPU with these features."""
    request = json.dumps({"model": str(model_path), "plan": plan.model_dump(),
                          "repacked_for": cpu_features})
    done = subprocess.run([sys.executable, "-m", "edgerunner.runtime.engine.predict"],
                          input=request, capture_output=True, text=True, timeout=timeout,
                          check=True)
    return float(json.loads(done.stdout)["repacked_mb"])


def main() -> None:
    """Read {"model", "plan", "n_ctx": [...]} on stdin, print {n_ctx: total_mb}; or with
    "repacked_for": [features] instead of "n_ctx", print {"repacked_mb": ...}."""
    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.memory import MIB, estimate_memory, repacked_bytes

    request = json.loads(sys.stdin.read())
    plan = RuntimePlan.model_validate(request["plan"])
    info = read_model_info(Path(request["model"]))
    if "repacked_for" in request:
        repacked = repacked_bytes(info, plan.quant, request["repacked_for"])
        json.dump({"repacked_mb": repacked / MIB}, sys.stdout)
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
