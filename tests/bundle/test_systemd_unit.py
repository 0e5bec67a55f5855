"""The per-bundle systemd unit: rendered values, and systemd's own verdict on the file."""

from __future__ import annotations

import inspect
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from edgerunner.bundle.manifest import (
    BundleManifest,
    FileEntry,
    MemoryEstimate,
    Prediction,
    RuntimePlan,
    SourceModel,
)
from edgerunner.bundle.settings import ServeConfig
from edgerunner.bundle.unit import (
    STOP_MARGIN_S,
    render_unit,
    unit_name,
    unit_settings,
    verify_unit,
)
from edgerunner.errors import InstallError
from edgerunner.profiles import resolve_profile

HAVE_ANALYZE = shutil.which("systemd-analyze") is not None


def make_manifest(
    name: str = "smollm2-rpi5-8gb-Q4_K_M", total_mb: float = 400.0, size: int = 100_000_000,
    decode_tps: float = 40.0, profile: str = "rpi5",
) -> BundleManifest:
    weights = total_mb / 2
    return BundleManifest(
        name=name,
        edgerunner_version="0.1.0",
        llama_cpp_python_version="0.3.36",
        source=SourceModel(name="SmolLM2", sha256="0" * 64, architecture="llama", file_type="Q4_1"),
        profile=resolve_profile(profile),
        plan=RuntimePlan(n_ctx=4096),
        prediction=Prediction(
            memory=MemoryEstimate(weights_mb=weights, kv_mb=total_mb - weights),
            decode_tps=decode_tps, file_size=size,
        ),
        files={"model.gguf": FileEntry(sha256="1" * 64, size=size)},
    )


def values(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE))


def test_memory_limits_follow_the_prediction_with_margins() -> None:
    small = values(render_unit(make_manifest(total_mb=400)))
    big = values(render_unit(make_manifest(total_mb=4000)))
    # 400 MiB: the fixed floors apply (64, 32, 128 MiB); 4000 MiB: the percentages do; both
    # leave one grammar child (80 MiB) under MemoryHigh
    assert small["MemoryHigh"] == "576M"
    assert small["MemoryMax"] == "704M"
    assert big["MemoryHigh"] == "4700M"
    assert big["MemoryMax"] == "5170M"


def test_the_daemon_ceiling_sits_below_the_cgroup_limits() -> None:
    for total in (50, 400, 4000, 30000):
        s = unit_settings(make_manifest(total_mb=total))
        assert total < s.rss_ceiling_mb < s.memory_high_mb < s.memory_max_mb
        # The daemon's start check wants its 128 MiB reserve free on top of the plan.
        assert s.memory_max_mb - s.predicted_mb >= 128 + 64
    text = render_unit(make_manifest(total_mb=400))
    assert "Environment=EDGERUNNER_RSS_CEILING_MB=464\n" in text


def test_start_timeout_grows_with_model_size_over_storage_speed() -> None:
    small = unit_settings(make_manifest(size=10_000_000))
    big = unit_settings(make_manifest(size=4_000_000_000))
    assert small.timeout_start_s == 90  # the floor
    # rpi5 reads its SD card at 90 MB/s: 4 GB takes ~44 s, three times that plus 60 s.
    assert big.timeout_start_s == 60 + 134
    assert values(render_unit(make_manifest(size=4_000_000_000)))["TimeoutStartSec"] == "194"


def test_watchdog_covers_the_longest_prompt() -> None:
    fast = unit_settings(make_manifest(decode_tps=400))
    slow = unit_settings(make_manifest(decode_tps=4))
    unknown = unit_settings(make_manifest(decode_tps=0))
    assert fast.watchdog_s == 30  # the floor
    assert slow.watchdog_s == 512  # 2 x 4096 tokens / (4 tok/s x 4)
    assert unknown.watchdog_s == 600


def _default(func: object, parameter: str) -> float:
    value = inspect.signature(func).parameters[parameter].default  # type: ignore[arg-type]
    assert isinstance(value, (int, float)), (func, parameter)
    return float(value)


def test_stop_timeout_outlasts_the_daemons_whole_stop() -> None:
    from edgerunner.runtime.http.server import HttpTransport
    from edgerunner.runtime.mqtt.transport import MqttTransport

    drain = ServeConfig().drain_timeout_s
    stop = int(values(render_unit(make_manifest()))["TimeoutStopSec"])
    assert stop == math.ceil(drain + STOP_MARGIN_S)
    # After the drain come the transports' own bounded stops; SIGKILL must not cut them short.
    http_s = _default(HttpTransport.__init__, "graceful_s")
    mqtt_s = _default(MqttTransport.stop, "timeout")
    assert stop >= drain + http_s + mqtt_s + 5  # + the scheduler's 5 s worker join


def test_stop_timeout_follows_a_configured_drain_timeout() -> None:
    assert values(render_unit(make_manifest(), drain_timeout_s=120))["TimeoutStopSec"] == str(
        120 + STOP_MARGIN_S)
    assert unit_settings(make_manifest(), drain_timeout_s=0).timeout_stop_s == STOP_MARGIN_S
    assert f"drain timeout ({ServeConfig().drain_timeout_s:g} s)" in render_unit(make_manifest())


def test_rendered_unit_carries_the_service_contract() -> None:
    text = render_unit(make_manifest())
    v = values(text)
    assert v["Type"] == "notify"
    assert v["NotifyAccess"] == "main"
    assert v["Restart"] == "on-failure"
    assert v["User"] == v["Group"] == "edgerunner"
    assert v["ProtectSystem"] == "strict"
    assert v["PrivateDevices"] == "yes"
    assert v["ExecStart"] == (
        "edgerunner serve /var/lib/edgerunner/bundles/smollm2-rpi5-8gb-Q4_K_M "
        "--socket /run/edgerunner/smollm2-rpi5-8gb-Q4_K_M/api.sock "
        "--config /etc/edgerunner/smollm2-rpi5-8gb-Q4_K_M.toml"
    )
    assert "%i" not in text


def test_cuda_profiles_keep_device_nodes(tmp_path: Path) -> None:
    jetson = make_manifest()
    profile = jetson.profile.model_copy(update={"gpu": jetson.profile.gpu.model_copy(
        update={"kind": "cuda", "unified_memory": True})})
    cuda = jetson.model_copy(update={"profile": profile})
    assert values(render_unit(cuda))["PrivateDevices"] == "no"


def test_a_plan_that_locks_weights_lifts_the_memlock_limit() -> None:
    plain = make_manifest()
    locked = plain.model_copy(update={"plan": plain.plan.model_copy(update={"mlock": True})})
    assert "LimitMEMLOCK" not in render_unit(plain)
    assert values(render_unit(locked))["LimitMEMLOCK"] == "infinity"


def test_names_systemd_cannot_take_are_refused() -> None:
    with pytest.raises(InstallError, match="instance name"):
        unit_name("my model")
    with pytest.raises(InstallError, match="instance name"):
        render_unit(make_manifest(name="../etc"))


@pytest.mark.skipif(not HAVE_ANALYZE, reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_accepts_the_rendered_unit(tmp_path: Path) -> None:
    manifest = make_manifest()
    # verify checks that ExecStart's binary exists: point it at this interpreter.
    text = render_unit(manifest, executable=f"{sys.executable} -m edgerunner")
    path = tmp_path / unit_name(manifest.name)
    path.write_text(text, encoding="utf-8")
    assert verify_unit(path) == []


@pytest.mark.skipif(not HAVE_ANALYZE, reason="systemd-analyze is not installed on this machine")
def test_verify_reports_what_systemd_warns_about(tmp_path: Path) -> None:
    text = render_unit(make_manifest(), executable=f"{sys.executable} -m edgerunner")
    path = tmp_path / "edgerunner@x.service"
    path.write_text(text.replace("MemoryHigh=", "MemoryHihg="), encoding="utf-8")
    problems = verify_unit(path)
    assert any("MemoryHihg" in line for line in problems)
