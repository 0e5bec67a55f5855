"""The memory model across shapes: vocabularies of 32k/128k/262k tokens, tied and untied
output, GQA 1/4/8, head sizes 64/128/256, a sliding-window model and Phi-3's fused attn_qkv
with the window key llama.cpp ignores (tests/shapes.py MATRIX).

Each shape is a real GGUF with random weights, quantized by llama.cpp and served by the Engine
in a fresh process for a request filling the context. llama.cpp's own buffer sizes must equal
the prediction to the MiB, and the process's peak RSS (VmHWM) must be within 5% of it. The
repack rules are this CPU's (what serves decides what llama.cpp repacks).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.host.cpu import host_cpu_features
from edgerunner.pack.gguf_info import read_model_info
from edgerunner.pack.memory import estimate_memory, prefer_mmap
from tests.shapes import (
    MATRIX,
    MatrixShape,
    buffer_parts,
    matrix_model,
    predicted_buffers,
    serve_and_measure,
)

N_CTX = 2048
# every shape serves once; flash attention alternates so both attention paths are held to it
CASES = [(shape, i % 2 == 1) for i, shape in enumerate(MATRIX)]


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "flash_attn"), CASES, ids=[s.name for s, _ in CASES])
def test_buffers_and_peak_rss_match_the_prediction(
    default_model: Path, shape: MatrixShape, flash_attn: bool
) -> None:
    model = matrix_model(shape, default_model)
    info = read_model_info(model)
    features = host_cpu_features()
    mmap = prefer_mmap(info, shape.quant, features)
    plan = RuntimePlan(quant=shape.quant, n_ctx=N_CTX, flash_attn=flash_attn, mmap=mmap,
                       n_threads=2)
    served = serve_and_measure(model, plan, prompt_tokens=N_CTX - 8, max_tokens=4)
    assert served.filled >= N_CTX - 8

    predicted_parts = predicted_buffers(info, shape.quant, N_CTX, flash_attn=flash_attn,
                                        features=features, mmap=mmap)
    measured = buffer_parts(served.buffers, mmap)
    for part, mib in predicted_parts.items():  # weights, repack, KV, output, compute
        assert measured[part] == pytest.approx(mib, abs=1.0), (part, served.buffers)

    predicted = estimate_memory(info, shape.quant, N_CTX, flash_attn=flash_attn,
                                cpu_features=features, mmap=mmap).total_mb
    error = (predicted - served.vmhwm_mb) / served.vmhwm_mb
    assert abs(error) <= 0.05, (
        f"{shape.name}: predicted {predicted:.1f} MiB, VmHWM {served.vmhwm_mb:.1f} MiB "
        f"({error:+.1%}); llama.cpp's buffers {served.buffers}")


def test_the_matrix_covers_the_shapes_that_scale_with_the_vocabulary() -> None:
    assert {s.n_vocab for s in MATRIX} == {32000, 128256, 262144}
    assert {s.tied for s in MATRIX} == {True, False}
    assert {s.gqa for s in MATRIX} >= {1, 4, 8}
    assert {s.head_dim for s in MATRIX} == {64, 128, 256}
    assert any(s.sliding_window for s in MATRIX)
    assert {s.arch for s in MATRIX} == {"llama", "gemma3", "phi3"}
