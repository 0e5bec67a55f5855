"""Runs inside the arm64 rootfs (tools/arm/lane.py starts it): the shape matrix, served here.

For each cell of the request, serve one request filling the context the way the daemon would
(tests/shapes.py serve_and_measure: a fresh process, the daemon's imports, the Engine, llama.cpp's
log captured) and print what it cost: llama.cpp's buffers, the tensors it repacked, VmHWM. First,
a process that only imports what the serving one does: its VmHWM is the emulator's and the
interpreter's share, which lane.py sets against the same process on the host. No checking here;
lane.py predicts and compares.

    python3 matrix_probe.py '{"cells": [{"name": ..., "model": ..., "plan": {...},
                                         "prompt_tokens": 2040}]}'
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# tests/shapes.py, by path: the checkout is bound at /src, its tests are not a package
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

IMPORTS_ONLY = r"""
import json
import edgerunner.runtime.supervise.daemon  # everything the serving child imports
import llama_cpp
llama_cpp.llama_backend_init()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"VmHWM": int(status["VmHWM"].split()[0]) / 1024}))
"""


def imports_mb(python: str = sys.executable) -> float:
    """VmHWM of a process that imports what a serving one does and nothing more."""
    done = subprocess.run([python, "-c", IMPORTS_ONLY], capture_output=True, text=True,
                          check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["VmHWM"])


def main() -> int:
    from shapes import serve_and_measure

    from edgerunner.bundle.manifest import RuntimePlan

    request = json.loads(sys.argv[1])
    print(json.dumps({"imports_mb": imports_mb()}), flush=True)
    for cell in request["cells"]:
        plan = RuntimePlan.model_validate(cell["plan"])
        served = serve_and_measure(Path(cell["model"]), plan, cell["prompt_tokens"],
                                   threads=1)
        print(json.dumps({
            "name": cell["name"], "vmhwm_mb": served.vmhwm_mb, "filled": served.filled,
            "buffers": served.buffers,
            "repacked": sorted(re.findall(r"repack tensor (\S+) with \w+", served.log)),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
