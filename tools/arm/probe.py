"""Runs inside the arm64 rootfs (tools/arm/lane.py starts it): llama.cpp's buffers vs edgerunner.

For each requantized model: load it with llama-cpp-python (the cross-built libraries), read the
buffer sizes llama.cpp logs (CPU_Mapped, CPU_REPACK, KV, compute, output) and the tensors it
repacks, and put next to them what edgerunner.pack.memory predicts from the source model's header
and the ISA features edgerunner reads on this (emulated) CPU. One JSON object per model on
stdout; no checking here, lane.py compares. With "unmapped", each model is loaded a second
time without mmap (CPU + CPU_REPACK buffers vs QuantFacts.resident(mmap=False)).

    python3 probe.py '{"source": "/models/src.gguf", "models": {"Q4_0": "/models/Q4_0.gguf"}}'
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

N_CTX = 512
_BUFFER = re.compile(r"(CPU_Mapped|CPU_REPACK|CPU) model buffer size =\s+([\d.]+) MiB")
_VARIANT = re.compile(r"loaded CPU backend from \S*libggml-cpu-([\w.]+)\.so")


def _mib(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match[1]) if match else None


def probe(source: str, quant: str, path: str, features: list[str],
          unmapped: bool = False) -> dict[str, Any]:
    """Load one model; llama.cpp's numbers and edgerunner's for the same settings."""
    import llama_cpp

    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.llama_log import capture_llama_log
    from edgerunner.pack.memory import (
        MIB,
        kv_bytes,
        quant_facts,
        repacked_tensors,
        reserved_compute_bytes,
    )

    def load(mmap: bool) -> tuple[str, dict[str, float]]:
        with capture_llama_log() as lines:
            llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=1,
                                  flash_attn=False, use_mmap=mmap, verbose=True)
            llm.close()
        text = "".join(lines)
        buffers: dict[str, float] = {}
        for name, size in _BUFFER.findall(text):
            buffers[name] = buffers.get(name, 0.0) + float(size)
        return text, buffers

    text, buffers = load(mmap=True)
    info = read_model_info(Path(source))
    facts = quant_facts(info, quant, features)
    result: dict[str, Any] = {
        "quant": quant,
        # ggml loads its backend once per process: only the first model's log names it
        "variant": (_VARIANT.findall(text) or [None])[-1],
        "repacked": sorted(re.findall(r"repack tensor (\S+) with \w+", text)),
        "predicted_repacked": sorted(repacked_tensors(info, quant, features)),
        "llama": {
            "mapped": buffers.get("CPU_Mapped", 0.0),
            "repack": buffers.get("CPU_REPACK", 0.0),
            "kv": _mib(r"KV buffer size =\s+([\d.]+) MiB", text),
            "compute": _mib(r"CPU compute buffer size =\s+([\d.]+) MiB", text),
            "output": _mib(r"output buffer size =\s+([\d.]+) MiB", text),
        },
        "edgerunner": {
            "mapped": round(facts.mapped_bytes / MIB, 2),
            "repack": round(facts.repacked_bytes / MIB, 2),
            "kv": round(kv_bytes(info, N_CTX) / MIB, 2),
            "compute": round(reserved_compute_bytes(info, N_CTX) / MIB, 2),
            "output": round(info.n_vocab * 4 / MIB, 2),
        },
    }
    if unmapped:
        # without mmap every weight is an anonymous buffer: CPU + CPU_REPACK
        _, plain = load(mmap=False)
        result["llama"]["unmapped"] = round(plain.get("CPU", 0.0) + plain.get("CPU_REPACK", 0.0), 2)
        result["edgerunner"]["unmapped"] = round(facts.resident(mmap=False) / MIB, 2)
    return result


def main() -> int:
    from edgerunner.host.cpu import host_cpu_features

    request = json.loads(sys.argv[1])
    features = host_cpu_features()
    variant = None
    for quant, path in request["models"].items():
        result = probe(request["source"], quant, path, features, request.get("unmapped", False))
        variant = result["variant"] = result["variant"] or variant
        result["features"] = features
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
