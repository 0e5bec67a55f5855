"""Device profiles: what a board offers a model (memory, cores, bandwidth, thermal limits)."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner.errors import ProfileError
from edgerunner.paths import profiles_dir, user_profiles_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ISAFeature = Literal[
    "neon", "dotprod", "i8mm", "sve", "fp16", "avx", "avx2", "avx512", "f16c", "fma"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemorySpec(_Strict):
    total_mb: int = Field(..., gt=0, le=4_194_304, description="Installed RAM in MiB")
    os_reserved_mb: int = Field(
        512, ge=0, description="RAM kept for the OS and other services, never planned for a model"
    )
    bandwidth_gbs: float = Field(
        ..., gt=0, le=2000, description="Effective (measured, not peak) memory read bandwidth, GB/s"
    )


class CPUSpec(_Strict):
    big_cores: int = Field(..., ge=1, le=256, description="Performance cores")
    little_cores: int = Field(0, ge=0, le=256, description="Efficiency cores")
    core: str = Field("", description="Core name, e.g. Cortex-A76")
    max_mhz: int = Field(0, ge=0, description="Highest big-core clock in MHz (0 = unknown)")
    features: list[ISAFeature] = Field(default_factory=list, description="ISA features")


class StorageSpec(_Strict):
    read_mbs: float = Field(50.0, gt=0, description="Sequential read of the model's storage, MB/s")


class GPUSpec(_Strict):
    kind: Literal["none", "cuda"] = Field("none", description="GPU llama.cpp can offload to")
    unified_memory: bool = Field(False, description="GPU shares system RAM (Jetson)")
    memory_mb: int = Field(0, ge=0, description="Dedicated GPU memory (0 when unified or none)")
    bandwidth_gbs: float = Field(0.0, ge=0, description="GPU-side memory bandwidth, GB/s")


class ThermalSpec(_Strict):
    soft_limit_c: float = Field(
        75.0, gt=0, le=150, description="Above this the daemon slows down to avoid throttling"
    )
    throttle_c: float = Field(85.0, gt=0, le=150, description="Firmware throttles the CPU here")


class DeviceProfile(_Strict):
    """One device: validated from a profiles/*.toml file."""

    name: str = Field(..., min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    display_name: str = Field("", description="Human-readable device name")
    aliases: list[str] = Field(default_factory=list, description="Short names, e.g. rpi5")
    arch: Literal["aarch64", "armv7l", "x86_64"] = Field("aarch64", description="CPU architecture")
    memory: MemorySpec
    cpu: CPUSpec
    storage: StorageSpec = Field(default_factory=lambda: StorageSpec())
    gpu: GPUSpec = Field(default_factory=lambda: GPUSpec())
    thermal: ThermalSpec = Field(default_factory=lambda: ThermalSpec())
    decode_efficiency: float = Field(
        1.0, gt=0, le=4,
        description="Measured / predicted decode tok/s on this device; `bench --calibrate` sets it",
    )

    @property
    def usable_mb(self) -> int:
        """RAM a model may use: total minus the OS reserve."""
        return max(0, self.memory.total_mb - self.memory.os_reserved_mb)

    @property
    def threads(self) -> int:
        """Threads to decode with: the big cores (little cores slow llama.cpp down)."""
        return self.cpu.big_cores


def load_profile_file(path: Path) -> DeviceProfile:
    """Read and validate one profile file, naming the file and field on any problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ProfileError(f"profile file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML: {exc}", hint="fix the syntax") from exc
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ProfileError(
            f"{path} is not a valid device profile: {problems}",
            hint="compare it with `edgerunner profiles show rpi5`",
        ) from exc


def list_profiles(directory: Path | None = None) -> list[DeviceProfile]:
    """All profiles, sorted by name; a calibrated copy in the user's directory wins."""
    directories = [directory] if directory else [profiles_dir(), user_profiles_dir()]
    found: dict[str, DeviceProfile] = {}
    for folder in directories:
        for path in sorted(folder.glob("*.toml")):
            profile = load_profile_file(path)
            found[profile.name] = profile
    return sorted(found.values(), key=lambda prof: prof.name)


def resolve_profile(ref: str, directory: Path | None = None) -> DeviceProfile:
    """A profile by name, alias, or path to a user's own .toml file."""
    candidate = Path(ref)
    if ref.endswith(".toml") or candidate.is_file() or "/" in ref:
        return load_profile_file(candidate)
    profiles = list_profiles(directory)
    for profile in profiles:
        if ref == profile.name or ref in profile.aliases:
            return profile
    names = [p.name for p in profiles] + [a for p in profiles for a in p.aliases]
    close = difflib.get_close_matches(ref, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `edgerunner profiles list`"
    raise ProfileError(f"unknown device profile {ref!r}", hint=hint)
