"""n_parallel in the memory model and the planner: llama.cpp's buffers at several n_seq_max,
and which n_parallel and prefix cache the planner gives a device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgerunner.bundle.manifest import PREFIX_CACHE_ENTRIES
from edgerunner.errors import PlanError
from edgerunner.pack.gguf_info import ModelInfo, read_model_info
from edgerunner.pack.llama_log import capture_llama_log
from edgerunner.pack.memory import (
    MIB,
    SAMPLER_FIXED_BYTES,
    SAMPLER_TOKEN_DATA_BYTES,
    estimate_memory,
    kv_bytes,
    output_buffer_bytes,
    reserved_compute_bytes,
)
from edgerunner.pack.parallel import MIN_SLOT_CELLS, prefix_cache_cells
from edgerunner.pack.planner import PlanOptions, make_plan
from edgerunner.profiles import resolve_profile
from edgerunner.runtime.engine.weights import BatchLlama
from tests.shapes import LLAMA_3_2_1B, MATRIX, cached_info, cached_source, matrix_model


def _buffers(model: Path, n_ctx: int, n_seq_max: int) -> tuple[float, float, str]:
    """(output buffer MiB, compute buffer MiB, the log) as llama.cpp reports them."""
    with capture_llama_log() as lines:
        llm = BatchLlama(str(model), n_ctx=n_ctx, n_seq_max=n_seq_max, flash_attn=False,
                        n_threads=1, verbose=True)
        llm.close()
    text = "".join(lines)
    assert re.search(rf"n_seq_max\s+=\s+{n_seq_max}\b", text)
    assert re.search(r"kv_unified\s+=\s+true", text)
    output = re.search(r"CPU\s+output buffer size =\s+([\d.]+) MiB", text)
    compute = re.search(r"CPU compute buffer size =\s+([\d.]+) MiB", text)
    assert output and compute, "llama.cpp did not log its buffer sizes"
    return float(output[1]), float(compute[1]), text


@pytest.fixture(scope="module")
def info(default_model: Path) -> ModelInfo:
    return read_model_info(default_model)


# At n_ctx 8192 without flash attention SmolLM2's largest reserve stage is attention (the
# KQ scores, 8192 × 512 × 9 heads), so the ubatch's rounding to n_seq_max tokens shows.
N_CTX = 8192


@pytest.fixture(scope="module")
def lone(default_model: Path) -> tuple[float, float, str]:
    return _buffers(default_model, N_CTX, 1)


@pytest.mark.parametrize("n_seq_max", [1, 5, 12])
def test_output_and_compute_buffers_follow_n_seq_max_as_llama_cpp_reports(
    default_model: Path, info: ModelInfo, lone: tuple[float, float, str], n_seq_max: int
) -> None:
    output, compute, text = _buffers(default_model, N_CTX, n_seq_max)
    # output_reserve: max(n_outputs, n_seq_max) rows of n_vocab floats
    assert output_buffer_bytes(info, n_seq_max) / MIB == pytest.approx(output, abs=0.01)
    # one KV cache of n_ctx cells, whatever the sequences (kv_unified)
    assert "llama_kv_cache: size =  180.00 MiB" in text
    predicted = reserved_compute_bytes(info, N_CTX, n_seq_max=n_seq_max) / MIB
    assert predicted == pytest.approx(compute, rel=0.05)
    # graph_reserve rounds the 512-token ubatch up to a multiple of n_seq_max (515, 516)
    grown = predicted - reserved_compute_bytes(info, N_CTX) / MIB
    assert grown == pytest.approx(compute - lone[1], abs=0.05)


@pytest.mark.slow
def test_the_1b_shape_grows_its_reserve_by_the_rounded_tokens(default_model: Path) -> None:
    path = cached_source(LLAMA_3_2_1B, default_model)
    shape_info = cached_info(LLAMA_3_2_1B, default_model)
    sizes = {n: _buffers(path, 4096, n)[:2] for n in (1, 12)}
    assert output_buffer_bytes(shape_info, 12) / MIB == pytest.approx(sizes[12][0], abs=0.01)
    grown = (reserved_compute_bytes(shape_info, 4096, n_seq_max=12)
             - reserved_compute_bytes(shape_info, 4096)) / MIB
    assert grown == pytest.approx(sizes[12][1] - sizes[1][1], rel=0.10)


def test_a_trimmed_swa_cache_keeps_a_window_per_sequence(default_model: Path) -> None:
    """llama-kv-cache-iswa.cpp sizes a unified SWA cache n_swa × n_seq_max + n_ubatch cells."""
    shape = next(s for s in MATRIX if s.sliding_window)
    model = matrix_model(shape, default_model)
    info = read_model_info(model)
    with capture_llama_log() as lines:
        llm = BatchLlama(str(model), n_ctx=4096, n_seq_max=4, swa_full=False, flash_attn=True,
                         n_threads=1, verbose=True)
        llm.close()
    text = "".join(lines)
    cells = _pad_256(shape.sliding_window * 4 + 512)
    assert f"creating     SWA KV cache, size = {cells} cells" in text
    logged = sum(float(x) for x in re.findall(r"llama_kv_cache: size =\s+([\d.]+) MiB", text))
    assert kv_bytes(info, 4096, swa_full=False, n_seq_max=4) / MIB == pytest.approx(logged,
                                                                                   abs=0.01)
    est = estimate_memory(info, shape.quant, 4096, flash_attn=True, swa_full=False,
                          n_parallel=4)
    assert est.kv_mb == pytest.approx(logged, abs=0.01)


def _pad_256(cells: int) -> int:
    return (cells + 255) // 256 * 256


def test_each_stream_costs_a_logits_row_and_a_sampler_not_kv(info: ModelInfo) -> None:
    one = estimate_memory(info, "Q8_0", 4096, flash_attn=True)
    four = estimate_memory(info, "Q8_0", 4096, flash_attn=True, n_parallel=4,
                           n_seq_max=4 + PREFIX_CACHE_ENTRIES)
    assert four.kv_mb == one.kv_mb and four.weights_mb == one.weights_mb
    row = info.n_vocab * 4 / MIB
    assert four.logits_mb == pytest.approx(one.logits_mb + 7 * row, abs=0.01)
    sampler = (info.n_vocab * SAMPLER_TOKEN_DATA_BYTES + SAMPLER_FIXED_BYTES) / MIB
    assert four.overhead_mb == pytest.approx(one.overhead_mb + 3 * sampler, abs=0.01)
    assert four.compute_mb >= one.compute_mb  # the output stage holds 4 rows


# --- the planner ---------------------------------------------------------------------------


def test_default_model_on_rpi5_decodes_several_streams(info: ModelInfo) -> None:
    result = make_plan(info, resolve_profile("rpi5"))
    plan, pred = result.runtime, result.prediction
    assert plan.n_parallel > 1
    assert plan.prefix_cache_cells == max(plan.n_ctx // 4, 4096)  # room for HA's prompt
    assert (plan.n_ctx - plan.prefix_cache_cells) // plan.n_parallel >= MIN_SLOT_CELLS
    assert pred.stream_tps >= 5.0
    assert pred.aggregate_tps == pytest.approx(plan.n_parallel * pred.stream_tps, rel=0.01)
    assert pred.aggregate_tps > pred.decode_tps
    # the recorded memory is the context as it will be made: n_seq_max output rows
    assert pred.memory == result.chosen.memory
    assert pred.memory.logits_mb == pytest.approx(
        output_buffer_bytes(info, plan.n_seq_max) / MIB, abs=0.01)
    assert pred.memory.total_mb <= result.budget_mb
    assert any(r.startswith(f"n_parallel {plan.n_parallel}:") for r in result.reasons)
    assert any(r.startswith("prefix cache") for r in result.reasons)


def test_a_stream_below_min_tps_keeps_one_stream(info: ModelInfo) -> None:
    # nothing reaches 1000 tok/s: the fastest that fits, alone
    result = make_plan(info, resolve_profile("rpi5"), PlanOptions(min_tps=1000))
    assert result.runtime.n_parallel == 1
    assert result.prediction.stream_tps == result.prediction.aggregate_tps
    assert any("< 1000" in r for r in result.reasons if r.startswith("n_parallel 1"))


def test_min_tps_caps_the_streams_where_the_batch_slows_each(info: ModelInfo) -> None:
    lone = make_plan(info, resolve_profile("rpi5")).prediction.decode_tps
    # eight streams run at half speed (the batch's arithmetic); ask for more than that
    result = make_plan(info, resolve_profile("rpi5"), PlanOptions(min_tps=lone * 0.6))
    assert result.runtime.n_parallel == 4
    forced = make_plan(info, resolve_profile("rpi5"), PlanOptions(parallel=8))
    assert forced.prediction.stream_tps < lone * 0.6


@pytest.mark.parametrize(("max_ctx", "n_parallel", "prefix"),
                         [(512, 1, 0), (1024, 2, 0), (2048, 2, 1024), (4096, 4, 1024),
                          (8192, 4, 4096), (32768, 4, 8192)])
def test_small_contexts_limit_the_streams_and_the_prefix_cache(
    info: ModelInfo, max_ctx: int, n_parallel: int, prefix: int
) -> None:
    result = make_plan(info, resolve_profile("rpi5"),
                       PlanOptions(min_ctx=min(512, max_ctx), max_ctx=max_ctx))
    assert result.runtime.n_ctx == max_ctx
    assert (result.runtime.n_parallel, result.runtime.prefix_cache_cells) == (n_parallel, prefix)
    assert prefix_cache_cells(max_ctx) == prefix


def test_parallel_forces_the_streams(info: ModelInfo) -> None:
    result = make_plan(info, resolve_profile("rpi5"), PlanOptions(parallel=2))
    assert result.runtime.n_parallel == 2
    assert "forced with --parallel" in " ".join(result.reasons)
    cramped = make_plan(info, resolve_profile("rpi5"),
                        PlanOptions(parallel=16, min_ctx=512, max_ctx=2048))
    assert cramped.runtime.n_parallel == 16
    assert any("cells when all are busy" in w for w in cramped.warnings)


def test_parallel_past_the_memory_budget_is_refused(default_model: Path) -> None:
    big = cached_info(LLAMA_3_2_1B, default_model)
    lone = make_plan(big, resolve_profile("rpi5-2gb"))
    assert lone.runtime.n_parallel == 1  # its context fills the budget
    with pytest.raises(PlanError, match="--parallel 16 needs"):
        make_plan(big, resolve_profile("rpi5-2gb"), PlanOptions(parallel=16))


@pytest.mark.parametrize("profile", ["rpi5", "rpi4-4gb", "rpi5-2gb"])
def test_streams_never_change_the_quant_or_the_context(
    default_model: Path, profile: str
) -> None:
    big = cached_info(LLAMA_3_2_1B, default_model)
    chosen = make_plan(big, resolve_profile(profile))
    alone = make_plan(big, resolve_profile(profile), PlanOptions(parallel=1))
    assert (chosen.runtime.quant, chosen.runtime.n_ctx, chosen.runtime.kv_type) == (
        alone.runtime.quant, alone.runtime.n_ctx, alone.runtime.kv_type)
    assert chosen.prediction.decode_tps == alone.prediction.decode_tps
