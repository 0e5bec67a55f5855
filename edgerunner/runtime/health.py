"""The daemon's state, typed: what /health shows, /metrics counts, MQTT info publishes and Home
Assistant reads.

The daemon builds one `Health` (supervise/daemon.py, `Daemon.health`); transports get it through
an `InfoProvider` and read its fields. `/health` is `health.model_dump(mode="json")`.
`ServedModel` is what the transports say about the served bundle, built once from its manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgerunner import __version__
from edgerunner.bundle.manifest import BundleManifest, RuntimePlan

# Raspberry Pi documentation, "vcgencmd get_throttled": bits 0-3 are the state now,
# bits 16-19 say the same condition has occurred since boot.
THROTTLE_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
    "under_voltage_occurred": 16,
    "freq_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}

DaemonState = Literal["starting", "loading", "ready", "unloaded", "pressure", "draining",
                      "stopped"]
ThermalLevel = Literal["normal", "warm", "hot", "unknown"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThrottleFlags(_Frozen):
    """The Raspberry Pi firmware's throttling word, decoded."""

    raw: int = Field(..., ge=0, description="The word as read (get_throttled)")
    under_voltage: bool = Field(False, description="Supply below 4.63 V now")
    freq_capped: bool = Field(False, description="ARM frequency capped now")
    throttled: bool = Field(False, description="Currently throttled")
    soft_temp_limit: bool = Field(False, description="Soft temperature limit active")
    under_voltage_occurred: bool = Field(False, description="Under-voltage since boot")
    freq_capped_occurred: bool = Field(False, description="Frequency capping since boot")
    throttled_occurred: bool = Field(False, description="Throttling since boot")
    soft_temp_limit_occurred: bool = Field(False, description="Soft temp limit since boot")

    @classmethod
    def from_word(cls, word: int) -> ThrottleFlags:
        """Decode the firmware's bit field."""
        return cls(raw=word, **{name: bool(word >> bit & 1) for name, bit in THROTTLE_BITS.items()})

    @property
    def slowing_now(self) -> bool:
        """The firmware is holding the CPU back right now."""
        return self.throttled or self.freq_capped or self.soft_temp_limit


class ThermalState(_Frozen):
    """What the governor decided: how many threads, how long to rest between requests, and why."""

    level: ThermalLevel = Field("unknown", description="normal / warm / hot / unknown (no sensor)")
    threads: int = Field(..., ge=1, description="Decode threads to use now")
    pause_s: float = Field(0.0, ge=0, description="Rest between requests")
    temp_c: float | None = Field(None, description="Hottest zone at the last reading")
    reason: str = Field("", description="Why, for logs and /health")


class MemoryHealth(_Frozen):
    """RSS against the plan's prediction, and the memory guard's view."""

    predicted_mb: float | None = Field(None, description="The fitted plan's predicted peak")
    rss_mb: float = Field(0.0, ge=0, description="Resident set size now")
    polled_rss_mb: float = Field(0.0, ge=0, description="RSS at the guard's last poll")
    peak_rss_mb: float | None = Field(None, description="Highest RSS the guard saw")
    measured_over_predicted: float | None = Field(None, description="rss_mb / predicted_mb")
    rss_ceiling_mb: float | None = Field(None, description="RSS that makes the daemon exit 4")
    headroom_mb: float | None = Field(None, description="Memory left for this process")
    headroom_source: str | None = Field(None, description="Where headroom_mb was read")
    reserve_mb: float = Field(0.0, ge=0, description="Headroom kept free (memory_reserve_mb)")
    psi_full_avg10: float | None = Field(None, description="Memory PSI full avg10 (%)")
    guard: str | None = Field(None, description="The guard's state (ok / pressure)")
    guard_reason: str = Field("", description="Why the guard refuses work")


class QueueHealth(_Frozen):
    """The scheduler's queue and slots."""

    depth: int = Field(0, ge=0, description="Requests waiting")
    max: int = Field(0, ge=0, description="Queue depth limit")
    running: int = Field(0, ge=0, description="Requests decoding now")
    slots: int = Field(1, ge=1, description="Requests that can decode together (n_parallel)")


class PrefixCacheHealth(_Frozen):
    """The shared-prefix KV cache and how often it helped."""

    cells: int = Field(0, ge=0, description="KV cells it may hold")
    hits: int = Field(0, ge=0, description="Prompts that reused a cached prefix")
    misses: int = Field(0, ge=0, description="Prompts that found none")
    tokens_reused: int = Field(0, ge=0, description="Prompt tokens not evaluated again")


class CpuHealth(_Frozen):
    """Threads, CPU limits and the llama.cpp path the preflight chose."""

    threads: int = Field(1, ge=1, description="Decode threads in use")
    threads_planned: int = Field(1, ge=1, description="The plan's decode threads")
    cpus: int = Field(1, ge=1, description="CPUs this process may use")
    cpu_limits: str = Field("", description="Where that CPU count comes from")
    # "default": llama.cpp's extra buffer types (AMX, weight repacking) on; else off
    llama_path: str | None = Field(None, description="default / no_extra_bufts")
    preflight_cached: bool | None = Field(None, description="Verdict read from the cache")
    preflight_s: float | None = Field(None, description="What the preflight children took")
    preflight_failures: list[str] = Field(default_factory=list,
                                          description="Paths that died, and how")
    llama_cpu_features: str | None = Field(None, description="llama.cpp's CPU features")


class Health(_Frozen):
    """The /health document (also the MQTT info payload)."""

    state: DaemonState = Field("starting", description="What the daemon is doing")
    model: str = Field("", description="The served bundle's name")
    version: str = Field(__version__, description="edgerunner's version")
    pid: int = Field(0, ge=0, description="The daemon's process id")
    uptime_s: float = Field(0.0, ge=0, description="Seconds since start")
    loaded: bool = Field(False, description="The weights are in memory")
    plan: RuntimePlan = Field(default_factory=RuntimePlan, description="The plan served")
    plan_shrunk: bool = Field(False, description="n_ctx was shrunk to fit memory")
    memory: MemoryHealth = Field(default_factory=MemoryHealth)
    queue: QueueHealth = Field(default_factory=QueueHealth)
    prefix_cache: PrefixCacheHealth = Field(default_factory=PrefixCacheHealth)
    temperature_c: float | None = Field(None, description="Hottest thermal zone")
    # the Pi firmware's get_throttled word and its bits (None where there is none)
    throttled: ThrottleFlags | None = Field(None, description="Firmware throttling flags")
    thermal: ThermalState | None = Field(None, description="The thermal governor's decision")
    cpu: CpuHealth = Field(default_factory=CpuHealth)

    @property
    def accepting(self) -> bool:
        """The daemon takes work in this state (an unloaded model reloads on demand)."""
        return self.state in ("ready", "unloaded")

    @property
    def slowed(self) -> bool:
        """The CPU is held back: the firmware throttles, or the thermal governor is at hot."""
        firmware = self.throttled is not None and self.throttled.slowing_now
        return firmware or (self.thermal is not None and self.thermal.level == "hot")


# What a transport calls to read the daemon's state.
InfoProvider = Callable[[], Health]


class ServedModel(_Frozen):
    """The served bundle as transports describe it (Ollama /api/*, Home Assistant's device)."""

    name: str = Field(..., description="The bundle's name")
    architecture: str = Field("", description="general.architecture, e.g. llama")
    n_params: int = Field(0, ge=0, description="Parameter count")
    quant: str = Field("", description="Quantization preset")
    size: int = Field(0, ge=0, description="model.gguf size in bytes")
    sha256: str = Field("", description="model.gguf's hash")
    created: str = Field("", description="When the bundle was packed (ISO-8601)")
    n_ctx_train: int = Field(0, ge=0, description="Context the model was trained for")
    profile: str = Field("", description="Device profile name")
    hardware: str = Field("", description="The profile's display name")
    edgerunner_version: str = Field(__version__, description="edgerunner that packed it")

    @classmethod
    def of(cls, manifest: BundleManifest) -> ServedModel:
        """From the bundle's manifest (the daemon holds it; nothing is read again)."""
        entry = manifest.files.get("model.gguf")
        profile = manifest.profile
        return cls(
            name=manifest.name, architecture=manifest.source.architecture,
            n_params=manifest.source.n_params, quant=manifest.plan.quant,
            size=entry.size if entry else 0, sha256=entry.sha256 if entry else "",
            created=manifest.created, n_ctx_train=manifest.source.n_ctx_train,
            profile=profile.name, hardware=profile.display_name or profile.name,
            edgerunner_version=manifest.edgerunner_version,
        )
