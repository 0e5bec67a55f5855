"""Runs inside the arm64 rootfs (tools/arm/lane.py starts it): the shape matrix, served here.

For each cell of the request, serve one request filling the context the way the daemon would
(tests/shapes.py serve_and_measure: a fresh process, the daemon's imports, the Engine, llama.cpp's
log captured) and print what it cost: llama.cpp's buffers, the tensors it repacked, VmHWM. Each
cell is served first at its baseline plan (the same model at a small context): lane.py sets that
run against the same one on the host to find what the emulator itself holds for this model (its
translated code, the mapped pages qemu-user does not populate). No checking here; lane.py
predicts and compares.

    python3 matrix_probe.py '{"cells": [{"name": ..., "model": ..., "plan": {...},
                                         "prompt_tokens": 2040, "baseline_plan": {...},
                                         "baseline_tokens": 248}]}'
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

# tests/shapes.py, by path: the checkout is bound at /src, its tests are not a package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def served(model: Path, plan: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """One request served in a fresh process: VmHWM, buffers, the tensors llama.cpp repacked."""
    from shapes import serve_and_measure

    from edgerunner.bundle.manifest import RuntimePlan

    got = serve_and_measure(model, RuntimePlan.model_validate(plan), prompt_tokens, threads=1)
    return {"vmhwm_mb": got.vmhwm_mb, "filled": got.filled, "buffers": got.buffers,
            "repacked": sorted(re.findall(r"repack tensor (\S+) with \w+", got.log))}


def main() -> int:
    request = json.loads(sys.argv[1])
    for cell in request["cells"]:
        model = Path(cell["model"])
        baseline = served(model, cell["baseline_plan"], cell["baseline_tokens"])
        full = served(model, cell["plan"], cell["prompt_tokens"])
        print(json.dumps({"name": cell["name"], **full, "baseline": baseline}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
