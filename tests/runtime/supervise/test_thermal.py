"""Thermal readings from a fake sysfs tree, the governor's policy, and live thread changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerunner.profiles import ThermalSpec
from edgerunner.runtime.supervise.thermal import (
    ThermalGovernor,
    ThermalReading,
    ThrottleFlags,
    read_thermal,
)


def fake_sysfs(root: Path, zones: dict[str, tuple[str, str | None]],
               throttled: str | None = None, pi5: bool = False) -> Path:
    for zone, (kind, temp) in zones.items():
        folder = root / "sys/class/thermal" / zone
        folder.mkdir(parents=True)
        (folder / "type").write_text(kind + "\n")
        if temp is not None:
            (folder / "temp").write_text(temp + "\n")
    # cooling devices live in the same directory and must be ignored
    (root / "sys/class/thermal/cooling_device0").mkdir(parents=True, exist_ok=True)
    if throttled is not None:
        firmware = ("sys/devices/platform/soc@107c000000/soc@107c000000:firmware" if pi5
                    else "sys/devices/platform/soc/soc:firmware")
        (root / firmware).mkdir(parents=True)
        (root / firmware / "get_throttled").write_text(throttled + "\n")
    return root


def test_reads_every_zone_and_the_hottest(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {
        "thermal_zone0": ("cpu-thermal", "52600"),
        "thermal_zone1": ("gpu-thermal", "61250"),
        "thermal_zone10": ("soc-thermal", "48000"),
        "thermal_zone2": ("battery", "garbage"),
        "thermal_zone3": ("acpitz", None),
    })
    reading = read_thermal(root)
    assert [z.zone for z in reading.zones] == [
        "thermal_zone0", "thermal_zone1", "thermal_zone2", "thermal_zone3", "thermal_zone10"]
    assert reading.zones[0].type == "cpu-thermal"
    assert reading.zones[0].temp_c == pytest.approx(52.6)
    assert reading.zones[2].temp_c is None
    assert reading.zones[3].temp_c is None
    assert reading.max_c == pytest.approx(61.25)
    assert reading.throttled is None


def test_no_sensors_means_none_not_zero(tmp_path: Path) -> None:
    reading = read_thermal(tmp_path)
    assert reading == ThermalReading(zones=[], max_c=None, throttled=None)


@pytest.mark.parametrize("pi5", [False, True])
def test_pi_throttled_flags_are_decoded(tmp_path: Path, pi5: bool) -> None:
    # 0x50005: under-voltage and throttled now, both have occurred since boot.
    root = fake_sysfs(tmp_path, {"thermal_zone0": ("cpu-thermal", "70000")}, "50005", pi5=pi5)
    flags = read_thermal(root).throttled
    assert flags is not None
    assert flags.raw == 0x50005
    assert flags.under_voltage and flags.throttled
    assert flags.under_voltage_occurred and flags.throttled_occurred
    assert not flags.freq_capped and not flags.soft_temp_limit
    assert not flags.freq_capped_occurred and not flags.soft_temp_limit_occurred
    assert flags.slowing_now


def test_soft_limit_history_alone_is_not_slowing_now() -> None:
    flags = ThrottleFlags.from_word(0x80000)
    assert flags.soft_temp_limit_occurred
    assert not flags.slowing_now
    assert ThrottleFlags.from_word(0x8).soft_temp_limit


def test_this_machine_reads_without_error() -> None:
    reading = read_thermal()
    assert all(z.temp_c is None or -50 < z.temp_c < 150 for z in reading.zones)


def reading(temp: float | None, word: int | None = None) -> ThermalReading:
    return ThermalReading(max_c=temp, throttled=ThrottleFlags.from_word(word) if word else None)


def test_governor_sheds_threads_above_the_soft_limit_and_recovers() -> None:
    gov = ThermalGovernor(ThermalSpec(soft_limit_c=75, throttle_c=80), base_threads=4)
    assert gov.update(reading(60)).level == "normal"
    assert gov.state.threads == 4
    assert [gov.update(reading(76)).threads for _ in range(4)] == [3, 2, 1, 1]
    assert gov.state.level == "warm" and gov.state.pause_s == 0
    # Inside the hysteresis band (70..75): hold.
    assert gov.update(reading(72)).threads == 1
    # Cooler: one thread back per reading.
    assert [gov.update(reading(65)).threads for _ in range(4)] == [2, 3, 4, 4]
    assert gov.state.level == "normal"


def test_governor_pauses_at_the_throttle_temperature_or_firmware_throttling() -> None:
    gov = ThermalGovernor(ThermalSpec(soft_limit_c=75, throttle_c=80), base_threads=4)
    hot = gov.update(reading(81))
    assert (hot.level, hot.threads) == ("hot", 1)
    assert hot.pause_s > 0 and "throttle" in hot.reason
    gov = ThermalGovernor(ThermalSpec(soft_limit_c=75, throttle_c=80), base_threads=4)
    firmware = gov.update(reading(60, 0x4))
    assert firmware.level == "hot" and "0x4" in firmware.reason
    # The flag clears: no more pause, threads climb back.
    cooled = gov.update(reading(60))
    assert cooled.pause_s == 0 and cooled.threads == 2


def test_governor_reduces_load_on_under_voltage() -> None:
    gov = ThermalGovernor(ThermalSpec(), base_threads=4)
    state = gov.update(reading(50, 0x1))
    assert (state.level, state.threads, state.reason) == ("warm", 3, "under-voltage")


def test_governor_without_sensors_runs_at_full_threads() -> None:
    gov = ThermalGovernor(ThermalSpec(), base_threads=2)
    state = gov.update(reading(None))
    assert (state.level, state.threads) == ("unknown", 2)

