"""The plan: which quantization, KV cache and context a model gets on a device, and why."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from edgerunner.bundle.manifest import (
    MAX_PARALLEL,
    KVType,
    MemoryEstimate,
    Prediction,
    RuntimePlan,
)
from edgerunner.bundle.speed import PROMPT_SPEEDUP
from edgerunner.errors import EdgerunnerError, PlanError
from edgerunner.pack.gguf_info import ModelInfo
from edgerunner.pack.isa import repack_isa
from edgerunner.pack.memory import (
    CTX_PAD,
    QuantFacts,
    estimate_memory,
    kv_bytes,
    quant_facts,
    weights_by_isa,
)
from edgerunner.pack.parallel import ParallelChoice, choose_parallel
from edgerunner.pack.plan_reasons import choice_reasons, explain_rejections
from edgerunner.pack.quant_rules import IMATRIX_ONLY, PRESETS, check_preset
from edgerunner.profiles import DeviceProfile

logger = logging.getLogger(__name__)

# Quality order: mean KL divergence against FP16 from llama.cpp's "LLaMA 3 8b Scoreboard"
# (tools/perplexity/README.md, rows without an importance matrix). Lower is better. F16/BF16
# are the reference. Source types edgerunner does not offer as presets are listed too, so a
# source's precision can be placed on the same scale (the IQ rows use the imatrix results).
KL_DIVERGENCE: dict[str, float] = {
    "F32": 0.0, "BF16": 0.0, "F16": 0.0,
    "Q8_0": 0.001391, "Q6_K": 0.005669, "Q5_K_M": 0.011093, "Q5_K_S": 0.017177,
    "Q5_1": 0.018485, "Q5_0": 0.022964, "Q4_K_M": 0.032032, "IQ4_NL": 0.036482,
    "IQ4_XS": 0.037087, "Q4_K_S": 0.044040, "Q4_1": 0.072530, "Q4_0": 0.073598,
    "Q3_K_L": 0.088558, "Q3_K_M": 0.103797, "IQ3_M": 0.104464, "IQ3_S": 0.113201,
    "IQ3_XS": 0.140704, "IQ3_XXS": 0.187044, "Q3_K_S": 0.236401, "IQ2_M": 0.331202,
    "IQ2_S": 0.446305, "Q2_K": 0.457258, "Q2_K_S": 0.457258, "IQ2_XS": 0.556747,
    "IQ2_XXS": 0.830947, "IQ1_M": 1.413517, "IQ1_S": 2.290167,
}

# The near-lossless band: presets closer than this in llama.cpp's KLD count as equal quality,
# and the faster of them wins. In that table Q8_0 sits 0.0014 from FP16 (PPL ratio 1.0004),
# the size of the table's own artifacts (FP16 against its 16-bit-rounded logits scores 0.00055),
# while the next step, Q6_K, is four times further (0.0057); Q4_0 and Q4_1 (0.0011 apart)
# are also "equal". The table measures quantizing from FP16, so the band applies to
# unquantized sources only: a requantization adds its loss to the source's.
EQUAL_QUALITY_KLD = 0.002
_UNQUANTIZED_SOURCES = ("F32", "ALL_F32", "F16", "BF16")

# KV cache configurations: (type, flash attention). Flash attention never materialises the
# n_kv × n_tokens × n_head score matrix, so it costs less memory at the same predicted speed
# (and llama.cpp's context default, flash_attn_type AUTO, turns it on where the backend
# supports it); llama.cpp needs it for a quantized V cache.
_KV_CONFIGS: tuple[tuple[KVType, bool], ...] = (("f16", False), ("f16", True), ("q8_0", True))


class PlanOptions(BaseModel):
    """What the user asks of the plan; unset fields take the model's and profile's defaults."""

    model_config = ConfigDict(extra="forbid")

    min_ctx: int | None = Field(
        None, ge=16, description="Smallest acceptable context (default 2048, or the training "
        "context if smaller)",
    )
    max_ctx: int | None = Field(
        None, ge=16, description="Largest context to plan for (default: training context, "
        "capped at 8192)",
    )
    min_tps: float = Field(5.0, ge=0, description="Slowest acceptable decode speed, tokens/s")
    quant: str | None = Field(None, description="Force this quantization preset, e.g. Q4_K_M")
    reserve_mb: int | None = Field(
        None, ge=0, description="Extra MiB kept free on top of the profile's OS reserve",
    )
    parallel: int | None = Field(
        None, ge=1, le=MAX_PARALLEL, description="Force this many streams decoded together "
        "(default: the most the device's speed, memory and context allow, of 1, 2, 4, 8)",
    )
    imatrix: bool | None = Field(
        None, description="Whether the quantizer gets an importance matrix: None as pack does "
        "(computed for presets below 4 bits), False never (--no-imatrix: the IQ2/IQ3 presets, "
        "which llama.cpp refuses or degrades without one, are no candidates), True a user's file",
    )
    measured_kld: dict[str, float] | None = Field(
        None, description="Mean KL divergences measured for this model (pack.quality): only "
        "these presets are considered, ranked by them instead of llama.cpp's table",
    )


class Candidate(BaseModel):
    """One (quant, KV cache, context) the planner considered."""

    model_config = ConfigDict(extra="forbid")

    quant: str = Field(..., description="Quantization preset")
    kv_type: KVType = Field("f16", description="KV cache element type")
    n_ctx: int = Field(..., ge=1, description="Largest context that fits (or min_ctx if none)")
    swa_full: bool = Field(True, description="Full-size cache for sliding-window layers")
    flash_attn: bool = Field(False, description="Flash attention")
    mmap: bool = Field(True, description="Memory-map the weights")
    memory: MemoryEstimate = Field(..., description="Predicted peak RSS at n_ctx")
    decode_tps: float = Field(0.0, ge=0, description="Predicted decode tokens/s at n_ctx")
    file_size: int = Field(0, ge=0, description="Predicted model.gguf bytes")
    kl_divergence: float = Field(0.0, ge=0, description="llama.cpp's KLD vs FP16 (quality), "
                                 "or the KLD measured for this model")
    kld_measured: bool = Field(False, description="kl_divergence was measured for this model")
    fits: bool = Field(False, description="Fits the device at n_ctx ≥ min_ctx")
    rejected: str | None = Field(None, description="Why it was not chosen (None: chosen)")


class PlanResult(BaseModel):
    """The whole plan: every candidate, the choice, and what the bundle records."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Model name")
    profile: str = Field(..., description="Device profile name")
    budget_mb: float = Field(..., description="MiB the model may use on the device")
    min_ctx: int = Field(..., description="Effective minimum context")
    max_ctx: int = Field(..., description="Effective maximum context")
    candidates: list[Candidate] = Field(default_factory=list)
    chosen: Candidate
    reasons: list[str] = Field(
        default_factory=list, description="Why the chosen quant, context and levers won",
    )
    runtime: RuntimePlan
    prediction: Prediction
    warnings: list[str] = Field(default_factory=list)


def kl_divergence(type_name: str) -> float:
    """Quality loss of a precision on llama.cpp's KLD scale (unknown types count as lossless)."""
    name = type_name.upper().removeprefix("MOSTLY_").removeprefix("ALL_")
    return KL_DIVERGENCE.get(name, 0.0)


def allowed_presets(info: ModelInfo, imatrix: bool | None = None) -> list[str]:
    """Presets that do not claim more precision than the source has (BF16 only from BF16);
    the IQ2/IQ3 ones only when the quantizer gets an importance matrix (imatrix not False)."""
    floor = kl_divergence(info.file_type)
    source = info.file_type.upper()
    presets = []
    for preset in PRESETS:
        if preset == "BF16" and source != "BF16":
            continue
        if preset in IMATRIX_ONLY and imatrix is False:
            continue
        if KL_DIVERGENCE[preset] >= floor:
            presets.append(preset)
    return presets


def decode_tps(
    profile: DeviceProfile, facts: QuantFacts, info: ModelInfo, n_ctx: int, kv_type: KVType,
    swa_full: bool, n_parallel: int = 1,
) -> float:
    """Tokens/s of each of `n_parallel` streams decoding together (1: a lone stream).

    Decoding is memory-bound: a step reads the weights once, for every stream in it, plus
    each stream's KV cells. The streams share the n_ctx cells of one unified cache, so
    together they hold what one stream would, on average half of it. A batch of n streams
    does n tokens' arithmetic, though, and a CPU runs out of it after a few: prompt
    processing (the same matmuls over many tokens) runs only PROMPT_SPEEDUP times faster per
    token than decode, so a step of n streams takes at least n / PROMPT_SPEEDUP lone steps.
    """
    bytes_per_step = facts.data_bytes + kv_bytes(info, n_ctx, kv_type, swa_full=swa_full) / 2
    lone = profile.memory.bandwidth_gbs * 1e9 / bytes_per_step * profile.decode_efficiency
    return lone / max(1.0, n_parallel / PROMPT_SPEEDUP)


def _context_grid(min_ctx: int, max_ctx: int) -> list[int]:
    """Powers of two and multiples of 256 between the bounds, ascending, ending at max_ctx."""
    values = {min_ctx, max_ctx}
    values.update(2 ** k for k in range(4, 21) if min_ctx <= 2 ** k <= max_ctx)
    values.update(range(_ceil_to(min_ctx, CTX_PAD), max_ctx + 1, CTX_PAD))
    return sorted(values)


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


class _Planner:
    """Evaluates candidates for one (model, profile, options)."""

    def __init__(self, info: ModelInfo, profile: DeviceProfile, options: PlanOptions):
        self.info, self.profile, self.options = info, profile, options
        self.features = list(profile.cpu.features)
        self.budget_mb = profile.usable_mb - (options.reserve_mb or 0)
        train = info.n_ctx_train
        self.min_ctx = options.min_ctx or min(2048, train)
        self.max_ctx = options.max_ctx or min(train, 8192)
        self.warnings: list[str] = []
        if self.min_ctx > self.max_ctx:
            raise PlanError(
                f"--min-ctx {self.min_ctx} is larger than --max-ctx {self.max_ctx}",
                hint="raise --max-ctx or lower --min-ctx",
            )
        if self.max_ctx > train:
            self.warnings.append(
                f"max context {self.max_ctx} exceeds the model's training context {train}; "
                "quality past it is not guaranteed"
            )

    def kld(self, quant: str) -> float:
        """The measured KLD of a preset when there is one, else llama.cpp's table's."""
        measured = self.options.measured_kld or {}
        return measured[quant] if quant in measured else KL_DIVERGENCE[quant]

    def estimate(
        self, facts: QuantFacts, quant: str, n_ctx: int, kv: KVType, fa: bool, swa_full: bool,
        mmap: bool,
    ) -> MemoryEstimate:
        return estimate_memory(
            self.info, quant, n_ctx, kv_type=kv, flash_attn=fa, swa_full=swa_full,
            cpu_features=self.features, mmap=mmap, facts=facts,
        )

    def candidate(
        self, quant: str, facts: QuantFacts, kv: KVType, fa: bool, swa_full: bool
    ) -> Candidate:
        """The largest context that fits for this configuration (or the min_ctx estimate)."""
        # mmap unless it costs memory (memory.prefer_mmap): a repacked tied output copy costs
        # the same either way, and then mmap's page-cache pages and faster load win
        mmap = facts.resident(mmap=True) <= facts.resident(mmap=False)
        grid = _context_grid(self.min_ctx, self.max_ctx)

        def tps(n_ctx: int) -> float:
            return decode_tps(self.profile, facts, self.info, n_ctx, kv, swa_full)

        # A configuration fast enough at min_ctx keeps that speed as its context grows.
        floor_tps = self.options.min_tps if tps(self.min_ctx) >= self.options.min_tps else 0.0
        best: tuple[int, MemoryEstimate] | None = None
        lo, hi = 0, len(grid) - 1
        while lo <= hi:  # memory grows and speed falls with n_ctx: binary search the grid
            mid = (lo + hi) // 2
            est = self.estimate(facts, quant, grid[mid], kv, fa, swa_full, mmap)
            if est.total_mb <= self.budget_mb and (mid == 0 or tps(grid[mid]) >= floor_tps):
                best, lo = (grid[mid], est), mid + 1
            else:
                hi = mid - 1
        n_ctx, memory = best or (
            self.min_ctx, self.estimate(facts, quant, self.min_ctx, kv, fa, swa_full, mmap)
        )
        return Candidate(
            quant=quant, kv_type=kv, n_ctx=n_ctx, swa_full=swa_full, flash_attn=fa, mmap=mmap,
            memory=memory, file_size=facts.file_bytes,
            decode_tps=round(tps(n_ctx), 2),
            kl_divergence=self.kld(quant), kld_measured=quant in (self.options.measured_kld or {}),
            fits=best is not None,
            rejected=None if best else (
                f"needs {memory.total_mb:.0f} MiB at n_ctx={self.min_ctx}, "
                f"{self.budget_mb:.0f} MiB available"
            ),
        )

    def parallel(self, chosen: Candidate) -> ParallelChoice:
        """n_parallel and the prefix cache for the chosen quant and context."""
        facts = quant_facts(self.info, chosen.quant, self.features)

        def memory(n_parallel: int, n_seq_max: int) -> MemoryEstimate:
            return estimate_memory(
                self.info, chosen.quant, chosen.n_ctx, kv_type=chosen.kv_type,
                flash_attn=chosen.flash_attn, swa_full=chosen.swa_full,
                cpu_features=self.features, mmap=chosen.mmap, facts=facts,
                n_parallel=n_parallel, n_seq_max=n_seq_max,
            )

        def stream_tps(n_parallel: int) -> float:
            return decode_tps(self.profile, facts, self.info, chosen.n_ctx, chosen.kv_type,
                              chosen.swa_full, n_parallel)

        return choose_parallel(chosen.n_ctx, self.budget_mb, self.options.min_tps, stream_tps,
                               memory, forced=self.options.parallel)

    def candidates(self, presets: Iterable[str]) -> list[Candidate]:
        swa_options = (True, False) if self.info.has_swa else (True,)
        found = []
        for quant in presets:
            facts = quant_facts(self.info, quant, self.features)
            for kv, fa in _KV_CONFIGS:
                for swa_full in swa_options:
                    found.append(self.candidate(quant, facts, kv, fa, swa_full))
        return found


def _presets(info: ModelInfo, options: PlanOptions) -> tuple[list[str], list[str]]:
    """(presets to consider, presets rejected as above the source's precision)."""
    allowed = allowed_presets(info, options.imatrix)
    if options.quant:
        quant = check_preset(options.quant)
        if quant in IMATRIX_ONLY and options.imatrix is False:
            raise PlanError(
                f"{quant} needs an importance matrix: llama.cpp refuses its lowest-bit tensors "
                "without one", hint="drop --no-imatrix (pack computes one on its calibration "
                "text), pass --imatrix FILE, or choose a K-quant such as Q2_K or Q3_K_S")
        if quant not in allowed:
            raise PlanError(
                f"{quant} would not improve on the source's {info.file_type} precision: "
                "requantizing cannot restore lost bits",
                hint=f"choose one of {', '.join(allowed)} or start from an F16/BF16 GGUF",
            )
        return [quant], []
    if options.measured_kld:
        measured = [p for p in allowed if p in options.measured_kld]
        if measured:
            return measured, _too_precise(info)
    return allowed, _too_precise(info)


def _too_precise(info: ModelInfo) -> list[str]:
    """The presets left out for claiming more precision than the source has."""
    floor = kl_divergence(info.file_type)
    return [p for p in PRESETS if p != "BF16" and KL_DIVERGENCE[p] < floor]


def _best_config(pool: list[Candidate]) -> Candidate:
    """One quant's configuration: the most context; then no quality lever it does not need
    (a q8_0 KV cache costs accuracy, a trimmed SWA cache prefix reuse); then the fastest;
    then the least memory, which is how flash attention wins: llama.cpp's default where the
    backend supports it, it never builds the n_kv × n_tokens × n_head score matrix."""
    return max(pool, key=lambda c: (
        c.n_ctx, c.kv_type == "f16", c.swa_full, c.decode_tps, -c.memory.total_mb,
    ))


def _equal_quality(fast: list[Candidate], band: float) -> set[str]:
    """Presets within the near-lossless band of the best quality among fast candidates."""
    best_kld = min(c.kl_divergence for c in fast)
    return {c.quant for c in fast if c.kl_divergence - best_kld <= band}


def _pick(
    fits: list[Candidate], min_tps: float, warnings: list[str], band: float
) -> tuple[Candidate, set[str]]:
    """(the choice, the presets that counted as its equal quality).

    Best quality at ≥ min_tps, presets within `band` of it being equal and the faster of
    them winning; within that quant, the configuration giving the most context.
    """
    fast = [c for c in fits if c.decode_tps >= min_tps]
    if not fast:
        fastest = max(fits, key=lambda c: (c.decode_tps, -c.kl_divergence))
        warnings.append(
            f"nothing decodes at {min_tps:g} tok/s on this device; chose the fastest that fits "
            f"({fastest.quant}, predicted {fastest.decode_tps:.1f} tok/s)"
        )
        return fastest, {fastest.quant}
    equal = _equal_quality(fast, band)
    # best quality first, so a full tie (F16 and BF16 from a BF16 source) keeps the better
    # named one deterministically: max() returns the first of equal keys
    kld = {c.quant: c.kl_divergence for c in fast}
    order = sorted(equal, key=lambda q: (kld[q], q))
    configs = [_best_config([c for c in fast if c.quant == q]) for q in order]
    chosen = max(configs, key=lambda c: (c.n_ctx, c.decode_tps))
    return chosen, equal


def make_plan(
    info: ModelInfo, profile: DeviceProfile, options: PlanOptions | None = None
) -> PlanResult:
    """Consider every candidate, pick one by DESIGN.md's rules, and explain the rest."""
    options = options or PlanOptions()
    planner = _Planner(info, profile, options)
    presets, too_precise = _presets(info, options)
    cands = planner.candidates(presets)
    fits = [c for c in cands if c.fits]
    if not fits:
        raise _nothing_fits(info, profile, planner, cands)
    unquantized = info.file_type.upper() in _UNQUANTIZED_SOURCES
    band = EQUAL_QUALITY_KLD if unquantized else 0.0
    chosen, equal = _pick(fits, options.min_tps, planner.warnings, band)
    parallel = planner.parallel(chosen)
    chosen.memory = parallel.memory  # the choice as it will serve: with its streams
    planner.warnings.extend(parallel.warnings)
    explain_rejections(cands, chosen, options.min_tps, equal)
    rivals = [_best_config([c for c in fits if c.quant == q and c.decode_tps >= options.min_tps])
              for q in sorted(equal - {chosen.quant})]
    reasons = choice_reasons(cands, chosen, rivals, options.min_tps, planner.budget_mb,
                             planner.max_ctx, band, forced=options.quant is not None)
    reasons.extend(parallel.reasons)
    if not unquantized:
        planner.warnings.append(
            f"the source is already quantized ({info.file_type}): the bundle is a "
            f"requantization, and {', '.join(too_precise) or 'no preset'} were left out because "
            "requantizing upward adds size, not quality"
        )
    runtime = RuntimePlan(
        quant=chosen.quant, n_ctx=chosen.n_ctx, kv_type=chosen.kv_type,
        flash_attn=chosen.flash_attn, swa_full=chosen.swa_full, n_threads=profile.threads,
        n_batch=512, n_ubatch=512, mmap=chosen.mmap, mlock=False,
        n_parallel=parallel.n_parallel, prefix_cache_cells=parallel.prefix_cache_cells,
    )
    return PlanResult(
        model=info.name, profile=profile.name, budget_mb=planner.budget_mb,
        min_ctx=planner.min_ctx, max_ctx=planner.max_ctx, candidates=cands, chosen=chosen,
        reasons=reasons, runtime=runtime,
        prediction=Prediction(
            memory=chosen.memory, decode_tps=chosen.decode_tps, file_size=chosen.file_size,
            stream_tps=parallel.stream_tps, aggregate_tps=parallel.aggregate_tps,
            cpu=repack_isa(planner.features),
            weights_mb_by_cpu=weights_by_isa(info, chosen.quant, chosen.mmap),
        ),
        warnings=planner.warnings,
    )


def _nothing_fits(
    info: ModelInfo, profile: DeviceProfile, planner: _Planner, cands: list[Candidate]
) -> PlanError:
    smallest = min(cands, key=lambda c: c.memory.total_mb)
    reserve = planner.options.reserve_mb or 0
    needed_ram = math.ceil(smallest.memory.total_mb + profile.memory.os_reserved_mb + reserve)
    bigger = _profiles_with(smallest.memory.total_mb, reserve)
    where = f"; profiles that would fit it: {', '.join(bigger)}" if bigger else ""
    return PlanError(
        f"{info.name} does not fit {profile.name}: even {smallest.quant} with a "
        f"{smallest.kv_type} KV cache at n_ctx={planner.min_ctx} needs "
        f"{smallest.memory.total_mb:.0f} MiB, and {planner.budget_mb:.0f} MiB are available "
        f"({profile.memory.total_mb} MiB RAM − {profile.memory.os_reserved_mb} MiB OS reserve"
        + (f" − {reserve} MiB --reserve-mb" if reserve else "") + ")",
        hint=f"a device with at least {needed_ram} MiB RAM would do{where}; "
        "or use a smaller model, or lower --min-ctx",
        needed_mb=smallest.memory.total_mb,
    )


def _profiles_with(model_mb: float, reserve: int) -> list[str]:
    """Shipped profiles whose usable RAM holds model_mb (+ the user's reserve)."""
    from edgerunner.profiles import list_profiles

    try:
        profiles = list_profiles()
    except EdgerunnerError:
        return []
    fitting = [p for p in profiles if p.usable_mb - reserve >= model_mb]
    return [p.name for p in sorted(fitting, key=lambda p: p.memory.total_mb)][:5]
