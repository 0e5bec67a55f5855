"""Planner rules on synthetic ModelInfo with real model shapes, against 2–16 GB devices."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from edgerunner.errors import PlanError
from edgerunner.pack.gguf_info import ModelInfo, TensorInfo
from edgerunner.pack.memory import (
    estimate_memory,
    measure_weights_dry_run,
    predict_weights,
    prefer_mmap,
    quant_facts,
    reserved_compute_bytes,
)
from edgerunner.pack.planner import (
    EQUAL_QUALITY_KLD,
    KL_DIVERGENCE,
    Candidate,
    PlanOptions,
    PlanResult,
    allowed_presets,
    make_plan,
)
from edgerunner.pack.quant_rules import tensor_bytes
from edgerunner.profiles import CPUSpec, DeviceProfile, MemorySpec, resolve_profile
from tests.shapes import LLAMA_3_2_1B, QWEN2_5_0_5B, Shape, cached_info, cached_source


def synthetic_model(
    name: str, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
    n_vocab: int, n_ctx_train: int = 8192, file_type: str = "F16", tied: bool = False,
    head_dim: int | None = None, window: int = 0, swa_period: int = 0,
) -> ModelInfo:
    """A ModelInfo with the tensor list llama.cpp's converter writes for a llama-style model."""
    d = head_dim or n_embd // n_head
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, n_vocab),
                                          "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (n_embd, n_vocab)
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (n_embd,), b + "ffn_norm.weight": (n_embd,),
            b + "attn_q.weight": (n_embd, n_head * d), b + "attn_k.weight": (n_embd, n_head_kv * d),
            b + "attn_v.weight": (n_embd, n_head_kv * d),
            b + "attn_output.weight": (n_head * d, n_embd),
            b + "ffn_gate.weight": (n_embd, n_ff), b + "ffn_up.weight": (n_embd, n_ff),
            b + "ffn_down.weight": (n_ff, n_embd),
        })
    tensors = []
    for tname, shape in shapes.items():
        ttype = "F32" if len(shape) == 1 else file_type
        tensors.append(TensorInfo(name=tname, shape=shape, type=ttype,
                                  n_bytes=tensor_bytes(ttype, shape)))
    swa = [(i % swa_period) < swa_period - 1 for i in range(n_layer)] if swa_period else []
    return ModelInfo(
        name=name, architecture="gemma2" if window else "llama", file_type=file_type,
        n_params=sum(t.n_elements for t in tensors), n_layer=n_layer, n_embd=n_embd, n_ff=n_ff,
        n_head=n_head, n_head_kv=[n_head_kv] * n_layer, key_length=d, value_length=d,
        sliding_window=window, swa_layers=swa or [False] * n_layer, n_vocab=n_vocab,
        n_ctx_train=n_ctx_train, tensors=tensors,
    )


QWEN_05B = synthetic_model("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, 32768, tied=True)
LLAMA_1B = synthetic_model("llama-3.2-1b", 16, 2048, 8192, 32, 8, 128256, 131072, tied=True)
LLAMA_3B = synthetic_model("llama-3.2-3b", 28, 3072, 8192, 24, 8, 128256, 131072, tied=True)
LLAMA_8B = synthetic_model("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256, 131072)
GEMMA_LIKE = synthetic_model("gemma-2-2b", 26, 2304, 9216, 8, 4, 256000, 8192, tied=True,
                             head_dim=256, window=4096, swa_period=2)


def device(name: str, total_mb: int, bandwidth: float, cores: int = 4,
           features: tuple[str, ...] = ("neon", "dotprod")) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        memory=MemorySpec(total_mb=total_mb, os_reserved_mb=400, bandwidth_gbs=bandwidth),
        cpu=CPUSpec(big_cores=cores, features=list(features)),
    )


PI_2GB = device("pi-2gb", 2048, 6.0)
PI_4GB = device("pi-4gb", 4096, 6.0)
PI_8GB = device("pi-8gb", 8192, 9.0)
BOARD_16GB = device("board-16gb", 16384, 60.0, cores=8, features=("neon", "dotprod", "i8mm"))


def test_8b_f16_does_not_fit_a_2gb_pi_and_says_what_would() -> None:
    with pytest.raises(PlanError) as caught:
        make_plan(LLAMA_8B, PI_2GB)
    err = caught.value
    assert err.needed_mb is not None and err.needed_mb > PI_2GB.usable_mb
    assert "does not fit" in err.message and "MiB" in err.message
    assert err.hint is not None and "at least" in err.hint


@pytest.mark.parametrize("profile", [PI_8GB, BOARD_16GB])
def test_8b_plans_onto_bigger_devices_within_their_budget(profile: DeviceProfile) -> None:
    result = make_plan(LLAMA_8B, profile)
    assert result.chosen.memory.total_mb <= profile.usable_mb
    assert result.runtime.n_threads == profile.threads
    assert result.min_ctx <= result.chosen.n_ctx <= 8192


def test_1b_from_f16_on_rpi5_8gb_gets_at_least_q5_k_m() -> None:
    result = make_plan(LLAMA_1B, PI_8GB)
    assert result.chosen.kl_divergence <= KL_DIVERGENCE["Q5_K_M"]


@pytest.mark.parametrize("info", [QWEN_05B, LLAMA_1B, LLAMA_3B, GEMMA_LIKE])
@pytest.mark.parametrize("profile", [PI_2GB, PI_4GB, PI_8GB, BOARD_16GB])
def test_every_chosen_plan_fits_and_explains_every_other_candidate(
    info: ModelInfo, profile: DeviceProfile
) -> None:
    try:
        result = make_plan(info, profile)
    except PlanError as exc:
        assert exc.needed_mb is not None and exc.needed_mb > profile.usable_mb
        return
    assert result.chosen.fits and result.chosen.memory.total_mb <= result.budget_mb
    others = [c for c in result.candidates if c != result.chosen]
    assert others and all(c.rejected for c in others)
    assert result.chosen.rejected is None
    assert result.prediction.memory == result.chosen.memory


def test_raising_min_tps_moves_the_choice_to_a_smaller_quant() -> None:
    relaxed = make_plan(LLAMA_3B, PI_8GB, PlanOptions(min_tps=0))
    strict_tps = relaxed.chosen.decode_tps * 1.5
    strict = make_plan(LLAMA_3B, PI_8GB, PlanOptions(min_tps=strict_tps))
    assert strict.chosen.file_size < relaxed.chosen.file_size
    assert strict.chosen.kl_divergence > relaxed.chosen.kl_divergence
    assert strict.chosen.decode_tps >= strict_tps


def test_unreachable_min_tps_takes_the_fastest_and_warns() -> None:
    result = make_plan(LLAMA_3B, PI_8GB, PlanOptions(min_tps=10_000))
    fastest = max(c.decode_tps for c in result.candidates if c.fits)
    assert result.chosen.decode_tps == fastest
    assert any("tok/s" in w for w in result.warnings)
    assert all("slower" in (c.rejected or "") for c in result.candidates if c != result.chosen)


def test_context_grows_only_while_decoding_stays_fast_enough() -> None:
    # 12 GB/s reads the ~2 GB of Q4_K_M weights ~6 times a second; the KV cache eats the rest.
    board = device("board-16gb-slow", 16384, 12.0)
    result = make_plan(LLAMA_3B, board, PlanOptions(quant="Q4_K_M", max_ctx=131072))
    assert result.chosen.decode_tps >= 5.0
    assert result.min_ctx < result.chosen.n_ctx < 131072
    assert result.chosen.memory.total_mb < result.budget_mb / 2  # memory was not the limit


def test_decode_speed_follows_bandwidth_and_bytes_read() -> None:
    result = make_plan(LLAMA_1B, PI_8GB, PlanOptions(quant="Q4_K_M"))
    facts = quant_facts(LLAMA_1B, "Q4_K_M")
    chosen = result.chosen
    kv_half = chosen.memory.kv_mb * 2**20 / 2
    expected = PI_8GB.memory.bandwidth_gbs * 1e9 / (facts.data_bytes + kv_half)
    assert chosen.decode_tps == pytest.approx(expected, rel=0.01)


def test_quantized_source_is_never_upgraded() -> None:
    q4_1 = synthetic_model("q41", 16, 2048, 8192, 32, 8, 32000, 4096, file_type="Q4_1")
    assert "Q8_0" not in allowed_presets(q4_1) and "Q4_K_M" not in allowed_presets(q4_1)
    result = make_plan(q4_1, BOARD_16GB)
    # Q4_0 is within the near-lossless band of Q4_1 and faster, but from a Q4_1 source it
    # is a requantization whose loss adds to the source's: the band is for FP sources only.
    assert abs(KL_DIVERGENCE["Q4_0"] - KL_DIVERGENCE["Q4_1"]) < EQUAL_QUALITY_KLD
    assert result.chosen.quant == "Q4_1"
    assert all(c.kl_divergence >= KL_DIVERGENCE["Q4_1"] for c in result.candidates)
    assert any("requantization" in w for w in result.warnings)
    with pytest.raises(PlanError, match="would not improve"):
        make_plan(q4_1, BOARD_16GB, PlanOptions(quant="Q8_0"))


def test_forced_quant_is_the_only_one_considered() -> None:
    result = make_plan(LLAMA_1B, PI_8GB, PlanOptions(quant="q4_0"))
    assert {c.quant for c in result.candidates} == {"Q4_0"}
    with pytest.raises(PlanError, match="unknown quantization preset"):
        make_plan(LLAMA_1B, PI_8GB, PlanOptions(quant="Q4_K_XL"))


def test_trimmed_sliding_window_cache_is_chosen_when_it_buys_context() -> None:
    features = BOARD_16GB.cpu.features
    trimmed = estimate_memory(GEMMA_LIKE, "Q4_K_M", 8192, kv_type="q8_0", flash_attn=True,
                              swa_full=False, cpu_features=features,
                              mmap=prefer_mmap(GEMMA_LIKE, "Q4_K_M", features))
    # A device with room for the trimmed cache at 8192 tokens, not for the full one.
    tight = BOARD_16GB.model_copy(update={"memory": MemorySpec(
        total_mb=int(trimmed.total_mb) + 401, os_reserved_mb=400, bandwidth_gbs=60.0)})
    result = make_plan(GEMMA_LIKE, tight, PlanOptions(quant="Q4_K_M"))
    full = [c for c in result.candidates if c.swa_full and c.fits]
    assert not result.chosen.swa_full
    assert all(result.chosen.n_ctx > c.n_ctx for c in full)
    assert result.runtime.swa_full is False


def test_q8_0_kv_cache_is_chosen_only_when_it_buys_context() -> None:
    roomy = make_plan(LLAMA_1B, BOARD_16GB, PlanOptions(quant="Q8_0"))
    assert roomy.chosen.kv_type == "f16" and roomy.chosen.n_ctx == 8192
    tight = make_plan(LLAMA_3B, PI_4GB, PlanOptions(quant="Q4_K_M", max_ctx=65536, min_tps=0))
    f16_best = max(c.n_ctx for c in tight.candidates if c.kv_type == "f16" and c.fits)
    assert tight.chosen.kv_type == "q8_0" and tight.chosen.flash_attn
    assert tight.chosen.n_ctx > f16_best


def test_context_defaults_follow_the_training_context() -> None:
    short = synthetic_model("short", 12, 768, 3072, 12, 12, 32000, n_ctx_train=1024)
    result = make_plan(short, PI_8GB)
    assert result.min_ctx == 1024 and result.max_ctx == 1024 and result.chosen.n_ctx == 1024
    with pytest.raises(PlanError, match="min-ctx"):
        make_plan(LLAMA_1B, PI_8GB, PlanOptions(min_ctx=4096, max_ctx=2048))


def test_large_vocabulary_costs_memory_where_llama_cpp_spends_it() -> None:
    small_vocab = synthetic_model("v32k", 24, 896, 4864, 14, 2, 32000, tied=True)
    big, small = (estimate_memory(m, "Q4_K_M", 4096) for m in (QWEN_05B, small_vocab))
    assert big.overhead_mb > small.overhead_mb  # vocabulary tables on the host
    # llama.cpp reserves a logits row per ubatch token: 151936 × 512 floats ≈ 297 MiB.
    assert reserved_compute_bytes(QWEN_05B, 4096) >= 151936 * 512 * 4
    assert make_plan(QWEN_05B, PI_2GB).chosen.fits


def test_suggested_profiles_count_the_user_reserve_once() -> None:
    from edgerunner.pack.planner import PlanOptions
    from edgerunner.profiles import resolve_profile

    zero = resolve_profile("rpi-zero2w")
    with pytest.raises(PlanError) as caught:
        make_plan(LLAMA_1B, zero, PlanOptions(min_ctx=8192, reserve_mb=250))
    err = caught.value
    assert err.needed_mb is not None and err.hint is not None
    suggested = err.hint.split("profiles that would fit it: ")[1].split(";")[0].split(", ")
    for name in suggested:
        assert resolve_profile(name).usable_mb - 250 >= err.needed_mb
    # the smallest shipped board that holds it with the reserve is suggested first
    from edgerunner.profiles import list_profiles

    holding = [p for p in list_profiles() if p.usable_mb - 250 >= err.needed_mb]
    assert suggested[0] == min(holding, key=lambda p: p.memory.total_mb).name


# --- real shapes, read from F16 GGUF sources (tests/shapes.py) ------------------------------

Source = Callable[..., ModelInfo]


@pytest.fixture(scope="session")
def source(default_model: Path) -> Source:
    """read(shape, reused_vocab=False): read_model_info of that shape's F16 source (cached)."""

    @functools.cache
    def read(shape: Shape, reused_vocab: bool = False) -> ModelInfo:
        return cached_info(shape, default_model, reused_vocab=reused_vocab)

    return read


def _twin(result: PlanResult, flash_attn: bool) -> Candidate:
    """The chosen configuration with flash attention set as asked."""
    c = result.chosen
    return next(x for x in result.candidates if x.quant == c.quant and x.kv_type == c.kv_type
                and x.swa_full == c.swa_full and x.flash_attn == flash_attn)


def test_real_shape_sources_read_back_as_the_models(source: Source) -> None:
    llama, qwen = source(LLAMA_3_2_1B), source(QWEN2_5_0_5B)
    # 1.24B and 0.49B parameters, tied embeddings (no output.weight), as the model cards say
    assert llama.n_params == 1_235_814_432 and qwen.n_params == 494_032_768
    assert (llama.architecture, llama.n_layer, llama.n_embd) == ("llama", 16, 2048)
    assert llama.n_head == 32
    assert llama.n_head_kv == [8] * 16 and llama.n_vocab == 128256 and llama.n_ctx_train == 131072
    assert (qwen.architecture, qwen.n_layer, qwen.n_embd, qwen.n_head) == ("qwen2", 24, 896, 14)
    assert qwen.n_head_kv == [2] * 24 and qwen.n_vocab == 151936 and qwen.n_ctx_train == 32768
    for info in (llama, qwen):
        assert info.file_type == "F16" and info.key_length == 64
        assert not any(t.name == "output.weight" for t in info.tensors)
    assert source(QWEN2_5_0_5B, reused_vocab=True).n_vocab == 49152


def test_shape_sources_are_header_sized_on_disk(default_model: Path) -> None:
    path = cached_source(LLAMA_3_2_1B, default_model)
    assert path.stat().st_size > 2_400_000_000  # the whole F16 file, as read_model_info checks
    assert path.stat().st_blocks * 512 < 50 * 2**20  # the weights are a hole


@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, QWEN2_5_0_5B])
def test_the_chosen_q8_0_file_is_the_size_llama_cpp_writes(
    default_model: Path, source: Source, shape: Shape
) -> None:
    # llama.cpp's own quantizer in dry-run mode (no data read or written) on the real shape
    path = cached_source(shape, default_model)
    assert measure_weights_dry_run(path, "Q8_0") == predict_weights(source(shape), "Q8_0")


@pytest.mark.parametrize("reused_vocab", [False, True])
def test_1b_on_rpi5_4gb_takes_flash_attention_at_the_same_context_and_speed(
    source: Source, reused_vocab: bool
) -> None:
    # Issue 9: the plan served f16 KV without flash attention (2239 MiB with the 49152-token
    # vocabulary) when flash attention gives the same context and speed at 1503 MiB.
    result = make_plan(source(LLAMA_3_2_1B, reused_vocab), resolve_profile("rpi5-4gb"))
    chosen, without = result.chosen, _twin(result, flash_attn=False)
    assert (chosen.quant, chosen.kv_type, chosen.flash_attn) == ("Q8_0", "f16", True)
    assert result.runtime.flash_attn and result.runtime.kv_type == "f16"
    assert without.fits and without.n_ctx == chosen.n_ctx == 8192
    assert without.decode_tps == chosen.decode_tps
    assert chosen.memory.weights_mb == without.memory.weights_mb
    assert chosen.memory.kv_mb == without.memory.kv_mb
    assert without.memory.compute_mb - chosen.memory.compute_mb > 500  # the KQ score matrix
    assert "flash attention" in (without.rejected or "")
    assert any(r.startswith("flash attention: same context and predicted speed") and
               f"{without.memory.total_mb - chosen.memory.total_mb:.0f} MiB less" in r
               for r in result.reasons)
    # F16 is too slow here (< 5 tok/s) and Q6_K, faster, is outside the near-lossless band
    assert all("tok/s < 5" in (c.rejected or "") for c in result.candidates if c.quant == "F16")
    q6 = [c for c in result.candidates if c.quant == "Q6_K"]
    assert all(c.decode_tps > chosen.decode_tps for c in q6)
    assert all((c.rejected or "").startswith("lower quality") for c in q6)


@pytest.mark.parametrize("reused_vocab", [False, True])
def test_05b_on_rpi5_2gb_takes_q8_0_over_f16_inside_the_near_lossless_band(
    source: Source, reused_vocab: bool
) -> None:
    # Issue 9: F16 at 10.5 tok/s was chosen over Q8_0 at about twice the speed, for a KLD
    # difference of ~0.001.
    result = make_plan(source(QWEN2_5_0_5B, reused_vocab), resolve_profile("rpi5-2gb"))
    chosen = result.chosen
    f16 = [c for c in result.candidates if c.quant == "F16"]
    assert (chosen.quant, chosen.kv_type, chosen.flash_attn) == ("Q8_0", "f16", True)
    assert all(c.fits and c.decode_tps >= 5 for c in f16)  # F16 was a valid plan...
    assert KL_DIVERGENCE["Q8_0"] - KL_DIVERGENCE["F16"] < EQUAL_QUALITY_KLD  # ...of equal quality
    f16_plan = max(f16, key=lambda c: (c.n_ctx, c.kv_type == "f16", -c.memory.total_mb))
    assert chosen.decode_tps > 1.7 * f16_plan.decode_tps and chosen.n_ctx >= f16_plan.n_ctx
    assert all((c.rejected or "").startswith("equal quality to Q8_0") for c in f16)
    why = result.reasons[0]
    assert why.startswith("Q8_0: F16 and Q8_0 are within the near-lossless band")
    assert f"{chosen.decode_tps / f16_plan.decode_tps:.1f}x faster than F16" in why


@pytest.mark.parametrize("shape", [LLAMA_3_2_1B, QWEN2_5_0_5B])
@pytest.mark.parametrize("profile", ["rpi5-2gb", "rpi5-4gb", "rpi5-8gb", "rpi4-4gb",
                                     "jetson-orin-nano-8gb", "phone-8gb"])
def test_flash_attention_is_left_off_only_when_it_loses(
    source: Source, shape: Shape, profile: str
) -> None:
    try:
        result = make_plan(source(shape), resolve_profile(profile))
    except PlanError:
        return
    if not result.chosen.flash_attn:
        with_fa = _twin(result, flash_attn=True)
        assert not with_fa.fits or with_fa.n_ctx < result.chosen.n_ctx or (
            with_fa.decode_tps < result.chosen.decode_tps)
    assert len(result.reasons) >= 2 and result.reasons[0].startswith(result.chosen.quant)


def test_the_band_is_what_the_kl_divergence_table_calls_near_lossless() -> None:
    # Q8_0 is inside, the next preset (Q6_K) is not, measured from FP16 and from Q8_0
    assert KL_DIVERGENCE["Q8_0"] - KL_DIVERGENCE["F16"] <= EQUAL_QUALITY_KLD
    assert KL_DIVERGENCE["Q6_K"] - KL_DIVERGENCE["Q8_0"] > EQUAL_QUALITY_KLD


def test_bf16_source_counts_bf16_f16_and_q8_0_as_one_quality() -> None:
    bf16 = synthetic_model("bf16", 16, 2048, 8192, 32, 8, 32000, 4096, file_type="BF16", tied=True)
    result = make_plan(bf16, BOARD_16GB)
    assert result.chosen.quant == "Q8_0"
    assert result.reasons[0].startswith("Q8_0: BF16, F16 and Q8_0 are within the near-lossless")
    for c in result.candidates:
        if c.quant in ("BF16", "F16"):
            assert (c.rejected or "").startswith("equal quality to Q8_0")
