"""The systemd unit for one bundle, rendered from systemd/edgerunner@.service."""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.speed import PROMPT_SPEEDUP
from edgerunner.errors import InstallError
from edgerunner.paths import SERVICE_RUNTIME_DIR, SERVICE_SOCKET_NAME, systemd_dir

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "edgerunner@.service"
SERVICE_USER = "edgerunner"
BUNDLES_DIR = "/var/lib/edgerunner/bundles"
CONFIG_DIR = "/etc/edgerunner"
RUNTIME_DIR = SERVICE_RUNTIME_DIR

# Unit names allow [A-Za-z0-9:_.\\-]; bundle names are a subset, so %i needs no escaping.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")

# Three memory lines, from softest to hardest, each above the last so the gentler one acts first:
# 1. RSS ceiling (EDGERUNNER_RSS_CEILING_MB) = predicted peak + max(10 %, 64 MiB): the margin
#    covers the memory model's error and allocator growth over a long uptime; past it the daemon
#    finishes in-flight work and exits non-zero, and Restart=on-failure brings it back clean.
# 2. MemoryHigh = ceiling + max(5 %, 32 MiB) + one grammar child: if the daemon's poll misses a
#    fast climb, the kernel reclaims and throttles instead of killing. A new json_schema is built
#    in a child process of the daemon (runtime.engine.grammar), in the same cgroup: ~70 MiB RSS
#    while it runs (measured on x86_64; Python, llama_cpp and the vocabulary), two at most at once.
# 3. MemoryMax = MemoryHigh + max(10 %, reserve): the hard OOM line inside the cgroup. The daemon
#    measures headroom as memory.max - memory.current and wants its free-memory reserve on top of
#    the plan, so a tighter MemoryMax would make it shrink n_ctx at start.
CEILING_MARGIN_FRACTION = 0.10
CEILING_MARGIN_MIN_MB = 64
HIGH_MARGIN_FRACTION = 0.05
HIGH_MARGIN_MIN_MB = 32
MAX_MARGIN_FRACTION = 0.10
RESERVE_MB = 128  # ServeConfig.memory_reserve_mb's default
GRAMMAR_CHILD_MB = 80  # one grammar build's child process (a second one dips into MemoryMax)

# TimeoutStartSec = base + 3 x (model size / storage read speed), at least the floor: mmap'd
# weights fault in with scattered reads that run well below the card's sequential speed.
START_BASE_S = 60
START_READ_FACTOR = 3.0
START_FLOOR_S = 90

WATCHDOG_MIN_S = 30
WATCHDOG_MAX_S = 1800
WATCHDOG_UNKNOWN_S = 600

# TimeoutStopSec = the daemon's drain timeout + what its stop does after the drain, in order:
# the cancelled generation ends when llama.cpp next checks, which on a slow board can be after a
# whole prompt batch (10 s; the scheduler joins its worker for at least 5 s); MQTT publishes
# `offline` and disconnects (<= 5 s, + 1 s for its info thread); uvicorn's graceful shutdown
# (<= 5 s); the guard and watchdog threads and closing the model (4 s, normally instant).
# Past TimeoutStopSec systemd sends SIGKILL mid-stop.
STOP_MARGIN_S = 10 + 6 + 5 + 4


class UnitSettings(BaseModel):
    """The per-bundle numbers a rendered unit carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., description="Bundle name = systemd instance name")
    predicted_mb: float = Field(0.0, ge=0, description="Plan's predicted peak RSS, MiB")
    rss_ceiling_mb: int = Field(..., ge=1, description="Daemon exits above this RSS, MiB")
    memory_high_mb: int = Field(..., ge=1, description="MemoryHigh=, MiB")
    memory_max_mb: int = Field(..., ge=1, description="MemoryMax=, MiB")
    timeout_start_s: int = Field(..., ge=1, description="TimeoutStartSec=, seconds")
    watchdog_s: int = Field(..., ge=1, description="WatchdogSec=, seconds")
    drain_timeout_s: float = Field(..., ge=0, description="The daemon's drain timeout, seconds")
    timeout_stop_s: int = Field(..., ge=1, description="TimeoutStopSec=, seconds")
    cuda: bool = Field(False, description="Device nodes needed for GPU offload")


def check_bundle_name(name: str) -> str:
    """The name, if it can be a systemd instance name and a directory name."""
    if not _NAME_RE.match(name):
        raise InstallError(
            f"bundle name {name!r} cannot be a systemd instance name",
            hint="use letters, digits, '.', '_' and '-' only (rename the bundle directory)",
        )
    return name


def unit_name(bundle_name: str) -> str:
    """edgerunner@<bundle>.service."""
    return f"edgerunner@{check_bundle_name(bundle_name)}.service"


def socket_path(bundle_name: str) -> str:
    """Where the installed service listens."""
    return f"{RUNTIME_DIR}/{check_bundle_name(bundle_name)}/{SERVICE_SOCKET_NAME}"


def default_drain_timeout_s() -> float:
    """The drain timeout `edgerunner serve` uses unless its config says otherwise."""
    from edgerunner.bundle.settings import ServeConfig

    return ServeConfig().drain_timeout_s


def unit_settings(manifest: BundleManifest, drain_timeout_s: float | None = None) -> UnitSettings:
    """Memory limits and timeouts for a bundle, from its plan and profile.

    ``drain_timeout_s`` is the daemon's; None means ServeConfig's default.
    """
    predicted = manifest.prediction.memory.total_mb
    rss = math.ceil(predicted + max(predicted * CEILING_MARGIN_FRACTION, CEILING_MARGIN_MIN_MB))
    high = math.ceil(rss + max(rss * HIGH_MARGIN_FRACTION, HIGH_MARGIN_MIN_MB)
                     + GRAMMAR_CHILD_MB)
    ceiling = math.ceil(high + max(high * MAX_MARGIN_FRACTION, RESERVE_MB))

    model = manifest.files.get("model.gguf")
    size_mb = (model.size if model else manifest.prediction.file_size) / 1e6
    read_s = size_mb / manifest.profile.storage.read_mbs
    timeout = max(START_FLOOR_S, math.ceil(START_BASE_S + START_READ_FACTOR * read_s))

    if manifest.prediction.decode_tps > 0:
        prompt_tps = manifest.prediction.decode_tps * PROMPT_SPEEDUP
        longest_prompt_s = manifest.plan.n_ctx / prompt_tps
        # The watchdog helper stops pinging after half the interval without worker progress,
        # so the interval must be twice the longest legitimate silence.
        watchdog = min(WATCHDOG_MAX_S, max(WATCHDOG_MIN_S, math.ceil(2 * longest_prompt_s)))
    else:
        watchdog = WATCHDOG_UNKNOWN_S

    drain = default_drain_timeout_s() if drain_timeout_s is None else drain_timeout_s
    return UnitSettings(
        name=check_bundle_name(manifest.name),
        predicted_mb=predicted,
        rss_ceiling_mb=rss,
        memory_high_mb=high,
        memory_max_mb=ceiling,
        timeout_start_s=timeout,
        watchdog_s=watchdog,
        drain_timeout_s=drain,
        timeout_stop_s=math.ceil(drain + STOP_MARGIN_S),
        cuda=manifest.profile.gpu.kind == "cuda",
    )


def render_unit(
    manifest: BundleManifest, executable: str = "edgerunner", template: Path | None = None,
    drain_timeout_s: float | None = None,
) -> str:
    """The unit file text for this bundle (instance name = bundle name).

    ``executable`` is the command that starts edgerunner: a bare name is looked up by systemd in
    its fixed search path; ``"/usr/bin/python3 -m edgerunner"`` works too.
    ``drain_timeout_s`` is the daemon's (None: ServeConfig's default); TimeoutStopSec covers it.
    """
    settings = unit_settings(manifest, drain_timeout_s)
    path = template or systemd_dir() / TEMPLATE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError(f"cannot read the unit template {path}: {exc}",
                           hint="reinstall edgerunner") from exc

    mem = manifest.prediction.memory
    values = {
        "MemoryHigh": f"{settings.memory_high_mb}M",
        # The daemon's own ceiling travels with the cgroup limits it must stay under.
        "MemoryMax": f"{settings.memory_max_mb}M\n"
        f"Environment=EDGERUNNER_RSS_CEILING_MB={settings.rss_ceiling_mb}",
        "TimeoutStartSec": str(settings.timeout_start_s),
        "TimeoutStopSec": str(settings.timeout_stop_s),
        "WatchdogSec": str(settings.watchdog_s),
    }
    if manifest.plan.mlock:
        # The plan locks the weights in RAM: lift the unprivileged mlock limit (64 KiB default).
        values["MemoryMax"] += "\nLimitMEMLOCK=infinity"
    if settings.cuda:
        # CUDA needs /dev/nvidia* and /dev/nvhost-*, which PrivateDevices= hides.
        values["PrivateDevices"] = "no"
    for key, value in values.items():
        text = _set_key(text, key, value, path)
    text = _set_exec(text, executable, path)
    # Substitute the instance name so the file also works when copied under another name.
    text = text.replace("%i", settings.name)
    # The template's opening comment describes the unrendered defaults; the header replaces it.
    text = text[text.index("[Unit]"):] if "[Unit]" in text else text

    header = (
        f"# Rendered by edgerunner for bundle {settings.name}: {manifest.source.name} "
        f"{manifest.plan.quant}, n_ctx {manifest.plan.n_ctx}, profile {manifest.profile.name}.\n"
        f"# Predicted peak {mem.total_mb:.0f} MiB (weights {mem.weights_mb:.0f}, "
        f"KV {mem.kv_mb:.0f}, compute {mem.compute_mb:.0f}, logits {mem.logits_mb:.0f}, "
        f"overhead {mem.overhead_mb:.0f}).\n"
        f"# RSS ceiling {settings.rss_ceiling_mb} MiB = predicted + "
        f"max({CEILING_MARGIN_FRACTION:.0%}, {CEILING_MARGIN_MIN_MB} MiB): past it the daemon "
        "drains and exits, and systemd restarts it.\n"
        f"# MemoryHigh = ceiling + max({HIGH_MARGIN_FRACTION:.0%}, {HIGH_MARGIN_MIN_MB} MiB): "
        "the kernel throttles rather than kills.\n"
        f"# MemoryMax = MemoryHigh + max({MAX_MARGIN_FRACTION:.0%}, {RESERVE_MB} MiB): the hard "
        "line, leaving the daemon's free-memory reserve above the plan. Change all three together "
        "(in a drop-in).\n"
        f"# TimeoutStartSec: {START_BASE_S} s + {START_READ_FACTOR:g} x model size / "
        f"{manifest.profile.storage.read_mbs:g} MB/s storage read. WatchdogSec: twice the "
        f"longest prompt ({manifest.plan.n_ctx} tokens) at {PROMPT_SPEEDUP:g}x the predicted "
        f"decode rate ({manifest.prediction.decode_tps:g} tok/s).\n"
        f"# TimeoutStopSec: the daemon's drain timeout ({settings.drain_timeout_s:g} s) + "
        f"{STOP_MARGIN_S} s for stopping MQTT, HTTP and the model after it; raise it with "
        "drain_timeout_s.\n"
    )
    return header + text


def _set_key(text: str, key: str, value: str, path: Path) -> str:
    pattern = re.compile(rf"^{key}=.*$", re.MULTILINE)
    new, count = pattern.subn(f"{key}={value}", text)
    if count != 1:
        raise InstallError(f"unit template {path} has {count} {key}= lines, expected one",
                           hint="reinstall edgerunner")
    return new


def _set_exec(text: str, executable: str, path: Path) -> str:
    pattern = re.compile(r"^ExecStart=edgerunner ", re.MULTILINE)
    new, count = pattern.subn(lambda _m: f"ExecStart={executable} ", text)
    if count != 1:
        raise InstallError(f"unit template {path} lacks 'ExecStart=edgerunner serve ...'",
                           hint="reinstall edgerunner")
    return new


def verify_unit(path: Path) -> list[str]:
    """Problems `systemd-analyze verify` reports for a unit file ([] = clean).

    systemd-analyze exits 0 on unknown keys and only prints them, so every line it prints
    counts as a problem.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None:
        raise InstallError("systemd-analyze is not installed", hint="install systemd")
    done = subprocess.run(
        [tool, "verify", "--man=no", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    if done.returncode != 0 and not lines:
        lines = [f"systemd-analyze verify exited {done.returncode}"]
    return lines
