"""`bench`: load a bundle as the daemon would, measure it, and set it next to the plan's prediction.

Measured: load time, time to first token, prompt and decode tokens/s, and peak RSS (the kernel's
VmHWM, reset before loading). The memory prediction it is held against is pack.memory's for
the same settings and the tokens this run actually put in the context; the plan's full-context
prediction is reported beside it. `calibrate` turns measured / predicted decode speed into the
profile's decode_efficiency, so later plans for that profile predict what this device does.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.bundle.store import Bundle
from edgerunner.errors import EdgerunnerError, ModelError
from edgerunner.paths import user_profiles_dir
from edgerunner.profiles import DeviceProfile

logger = logging.getLogger(__name__)

# Plain prose: tokenizes like real prompts do, for any vocabulary.
PROMPT_TEXT = (
    "The weather station on the hill sends a reading every ten minutes: temperature, humidity, "
    "wind speed and the battery level of the solar cell that keeps it running through the winter. "
)
PROC_SELF = Path("/proc/self")


class BenchResult(BaseModel):
    """One benchmark run, with the plan's predictions beside the measurements."""

    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(..., description="Bundle name")
    profile: str = Field(..., description="Profile the bundle was planned for")
    machine: str = Field("", description="platform.machine() of where it ran")
    quant: str = Field(..., description="Quantization preset")
    n_ctx: int = Field(..., ge=1, description="Context window")
    n_threads: int = Field(..., ge=1, description="Decode threads")
    load_s: float = Field(..., ge=0, description="Model load (mmap + context), seconds")
    ttft_s: float = Field(..., ge=0, description="Prompt in → first token out, seconds")
    prompt_tokens: int = Field(..., ge=1, description="Prompt length")
    prompt_tps: float = Field(..., ge=0, description="Prompt processing tokens/s")
    decode_tokens: int = Field(..., ge=1, description="Tokens timed after the first")
    decode_tps: float = Field(..., ge=0, description="Measured decode tokens/s")
    filled_tokens: int = Field(..., ge=1, description="Tokens evaluated into the context")
    baseline_rss_mb: float = Field(..., ge=0, description="RSS before loading, MiB")
    peak_rss_mb: float = Field(
        ..., ge=0, description="Peak RSS from loading to the end of the run (VmHWM), MiB"
    )
    peak_rss_source: str = Field(
        "VmHWM", description="VmHWM, or 'VmHWM (process lifetime)' where it could not be reset"
    )
    predicted_for_this_run_mb: float = Field(
        ..., ge=0, description="edgerunner.pack.memory's peak RSS for this run: same settings, "
        "filled_tokens in the context, this machine's CPU features"
    )
    predicted_full_context_mb: float = Field(
        ..., ge=0, description="The plan's predicted peak RSS with the whole context filled"
    )
    predicted_decode_tps: float = Field(..., ge=0, description="The plan's predicted tok/s")

    @property
    def rss_over_predicted(self) -> float | None:
        """Measured peak RSS / predicted for this run (None without a prediction)."""
        if not self.predicted_for_this_run_mb:
            return None
        return self.peak_rss_mb / self.predicted_for_this_run_mb

    @property
    def decode_over_predicted(self) -> float | None:
        """Measured decode speed / predicted (None without a prediction)."""
        return self.decode_tps / self.predicted_decode_tps if self.predicted_decode_tps else None

    def summary(self) -> dict[str, object]:
        """The result plus the two ratios, for --json."""
        return {
            **self.model_dump(mode="json"),
            "rss_over_predicted": _round(self.rss_over_predicted),
            "decode_over_predicted": _round(self.decode_over_predicted),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def proc_status_mb(field: str, proc: Path = PROC_SELF) -> float:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM), in MiB."""
    try:
        text = (proc / "status").read_text(encoding="utf-8")
    except OSError as exc:
        raise EdgerunnerError(f"cannot read {proc / 'status'}: {exc.strerror}",
                              hint="bench measures memory through Linux /proc") from exc
    found = re.search(rf"^{field}:\s+(\d+) kB$", text, re.MULTILINE)
    if found is None:
        raise EdgerunnerError(f"{proc / 'status'} has no {field} line",
                              hint="bench measures memory through Linux /proc")
    return int(found.group(1)) / 1024


def reset_peak_rss(proc: Path = PROC_SELF) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        (proc / "clear_refs").write_text("5", encoding="ascii")
    except OSError as exc:
        logger.debug("cannot reset VmHWM: %s", exc)
        return False
    return True


def run_bench(bundle: Bundle, prompt_tokens: int = 128, decode_tokens: int = 64,
              n_threads: int | None = None) -> BenchResult:
    """Load the bundle's model with its plan, time one prompt and a greedy decode."""
    import llama_cpp

    from edgerunner.host.cpu import cpu_budget, decode_threads
    from edgerunner.runtime.engine.weights import llama_kwargs

    manifest = bundle.manifest
    plan = manifest.plan
    # Leave room for the generated tokens inside the context window.
    prompt_tokens = max(1, min(prompt_tokens, plan.n_ctx - decode_tokens - 2))
    # the plan's threads, but never more than this process may run at once (affinity, quota)
    kwargs = llama_kwargs(plan, n_threads or decode_threads(plan.n_threads, cpu_budget()))
    # Whatever ran before (imports, hashing the bundle) must not count as the model's peak.
    reset = reset_peak_rss()
    baseline = proc_status_mb("VmRSS")
    started = time.perf_counter()
    try:
        llm = llama_cpp.Llama(str(bundle.model_path), **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"llama.cpp failed to load {bundle.model_path}: {exc}",
                         hint="check free memory: `edgerunner verify --here`") from exc
    load_s = time.perf_counter() - started
    try:
        tokens = _prompt(llm, prompt_tokens)
        started = time.perf_counter()
        stream = llm.generate(tokens, top_k=1, temp=0.0, reset=True)
        next(stream)  # generate() evaluates the whole prompt before the first token
        first = time.perf_counter()
        produced = 0
        for _token in stream:  # greedy and past EOS: only the speed matters here
            produced += 1  # each step evaluated the token before it
            if produced >= decode_tokens:
                break
        done = time.perf_counter()
        stream.close()
        # Read while the model is still loaded; the kernel kept the high-water mark meanwhile.
        peak = proc_status_mb("VmHWM")
    finally:
        llm.close()
    filled = len(tokens) + produced
    # After the measurement: parsing the GGUF header costs RSS of its own.
    predicted_run = predicted_for_run(bundle.model_path, plan, filled)
    ttft = first - started
    return BenchResult(
        bundle=manifest.name, profile=manifest.profile.name, machine=platform.machine(),
        quant=plan.quant, n_ctx=plan.n_ctx, n_threads=kwargs["n_threads"],
        load_s=round(load_s, 4), ttft_s=round(ttft, 4), prompt_tokens=len(tokens),
        prompt_tps=round(len(tokens) / ttft, 2), decode_tokens=produced,
        decode_tps=round(produced / (done - first), 2), filled_tokens=filled,
        baseline_rss_mb=round(baseline, 1), peak_rss_mb=round(peak, 1),
        peak_rss_source="VmHWM" if reset else "VmHWM (process lifetime)",
        predicted_for_this_run_mb=round(predicted_run, 1),
        predicted_full_context_mb=round(manifest.prediction.memory.total_mb, 1),
        predicted_decode_tps=round(manifest.prediction.decode_tps, 2),
    )


def predicted_for_run(model_path: Path, plan: RuntimePlan, filled: int) -> float:
    """The memory model's peak RSS, MiB, for the plan's settings with `filled` tokens evaluated.

    The CPU features are this machine's: they decide which weights llama.cpp repacks here.
    """
    from edgerunner.host.cpu import host_cpu_features
    from edgerunner.pack.gguf_info import read_model_info
    from edgerunner.pack.memory import estimate_memory

    # The settings llama_kwargs hands llama.cpp, as estimate_memory spells them.
    return estimate_memory(
        read_model_info(model_path), plan.quant, plan.n_ctx, kv_type=plan.kv_type,
        n_batch=plan.n_batch, n_ubatch=min(plan.n_ubatch, plan.n_batch),
        flash_attn=plan.flash_attn or plan.kv_type != "f16", swa_full=plan.swa_full,
        filled=filled, cpu_features=host_cpu_features(), mmap=plan.mmap,
    ).total_mb


def _prompt(llm: object, n_tokens: int) -> list[int]:
    text = PROMPT_TEXT
    tokenize = llm.tokenize  # type: ignore[attr-defined]
    tokens: list[int] = tokenize(text.encode())
    while len(tokens) < n_tokens:
        text += PROMPT_TEXT
        tokens = tokenize(text.encode())
    return tokens[:n_tokens]


def calibrated_profile(profile: DeviceProfile, result: BenchResult) -> DeviceProfile:
    """The profile with decode_efficiency scaled so its prediction matches this measurement."""
    ratio = result.decode_over_predicted
    if ratio is None:
        raise EdgerunnerError(
            f"bundle {result.bundle} records no predicted decode speed to calibrate against",
            hint="re-pack it with this edgerunner",
        )
    # The field is bounded (0, 4]: a ratio past that means the profile is for another machine.
    efficiency = min(4.0, max(0.01, profile.decode_efficiency * ratio))
    return profile.model_copy(update={"decode_efficiency": round(efficiency, 4)})


def write_calibration(profile: DeviceProfile, directory: Path | None = None) -> Path:
    """Write the profile to the user profile directory, where it overrides the shipped one."""
    folder = directory or user_profiles_dir()
    path = folder / f"{profile.name}.toml"
    header = (f"# Calibrated by `edgerunner bench --calibrate` on {platform.node()} "
              f"({platform.machine()}): decode_efficiency from measured / predicted tok/s.\n")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(header + tomli_w.dumps(profile.model_dump(mode="json")), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise EdgerunnerError(f"cannot write the calibrated profile {path}: {exc.strerror}",
                              hint="check permissions of $XDG_CONFIG_HOME") from exc
    return path
