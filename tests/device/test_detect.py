"""`profiles detect`: fake /proc and /sys trees for known boards, and this machine for real."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
from click.testing import CliRunner

from edgerunner.cli import main
from edgerunner.device.detect import detect_profile, measure_bandwidth_gbs

PI5_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                "lrcpc dcpop asimddp")
PI5_CPU = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: """ + PI5_FEATURES + """
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def meminfo(total_kb: int, available_kb: int) -> str:
    return f"MemTotal:       {total_kb} kB\nMemFree:  1000 kB\nMemAvailable:   {available_kb} kB\n"


def fake_pi5(root: Path) -> Path:
    cpus = "\n".join(PI5_CPU.format(n=n) for n in range(4))
    tail = "\nRevision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
    write(root, "proc/cpuinfo", cpus + tail)
    write(root, "proc/device-tree/model", "Raspberry Pi 5 Model B Rev 1.0\0")
    write(root, "proc/meminfo", meminfo(8_245_000, 7_800_000))
    for n in range(4):
        write(root, f"sys/devices/system/cpu/cpu{n}/cpufreq/cpuinfo_max_freq", "2400000\n")
    write(root, "proc/self/cgroup", "0::/system.slice/edgerunner.service\n")
    write(root, "sys/fs/cgroup/system.slice/edgerunner.service/memory.max", "max\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_0_type", "active\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_0_temp", "50000\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_1_type", "passive\n")
    write(root, "sys/class/thermal/thermal_zone0/trip_point_1_temp", "80000\n")
    return root


def test_a_raspberry_pi_5_tree(tmp_path: Path) -> None:
    profile = detect_profile(fake_pi5(tmp_path), measure=False)
    assert profile.display_name == "Raspberry Pi 5 Model B Rev 1.0 (detected)"
    assert profile.name == "detected-raspberry-pi-5-model-b-rev-1-0"
    assert profile.arch == "aarch64"
    assert (profile.cpu.big_cores, profile.cpu.little_cores) == (4, 0)
    assert profile.cpu.core == "Cortex-A76"
    assert profile.cpu.max_mhz == 2400
    assert profile.cpu.features == ["neon", "fp16", "dotprod"]
    assert profile.memory.total_mb == 8_245_000 // 1024
    # 433 MiB in use now, plus a quarter.
    assert profile.memory.os_reserved_mb == int((8_245_000 // 1024 - 7_800_000 // 1024) * 1.25)
    assert (profile.thermal.throttle_c, profile.thermal.soft_limit_c) == (80.0, 75.0)
    assert profile.gpu.kind == "none"


def test_big_little_split_by_max_frequency(tmp_path: Path) -> None:
    parts = ["0xd05"] * 4 + ["0xd0b"] * 3 + ["0xd44"]
    freqs = [1800000] * 4 + [2400000] * 3 + [2840000]
    cpus = "\n".join(
        f"processor\t: {n}\nFeatures\t: fp asimd asimddp i8mm\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU part\t: {part}\n" for n, part in enumerate(parts))
    write(tmp_path, "proc/cpuinfo", cpus + "\nHardware\t: Qualcomm Technologies, Inc SM8350\n")
    write(tmp_path, "proc/meminfo", meminfo(8_000_000, 5_000_000))
    for n, freq in enumerate(freqs):
        write(tmp_path, f"sys/devices/system/cpu/cpu{n}/cpufreq/cpuinfo_max_freq", f"{freq}\n")
    profile = detect_profile(tmp_path, measure=False)
    assert (profile.cpu.big_cores, profile.cpu.little_cores) == (4, 4)
    assert profile.cpu.core == "Cortex-A76"
    assert profile.cpu.max_mhz == 2840
    assert profile.cpu.features == ["neon", "dotprod", "i8mm"]
    assert profile.display_name.startswith("Qualcomm")


def test_the_tightest_cgroup_limit_wins(tmp_path: Path) -> None:
    root = fake_pi5(tmp_path)
    write(root, "proc/self/cgroup", "0::/system.slice/edgerunner.service\n")
    write(root, "sys/fs/cgroup/system.slice/edgerunner.service/memory.max", f"{3 * 2**30}\n")
    write(root, "sys/fs/cgroup/system.slice/memory.max", f"{2 * 2**30}\n")
    profile = detect_profile(root, measure=False)
    assert profile.memory.total_mb == 2048
    assert profile.memory.os_reserved_mb == 0  # everything else lives outside the cgroup


def test_cgroup_v1_memory_limit(tmp_path: Path) -> None:
    root = fake_pi5(tmp_path)
    write(root, "proc/self/cgroup", "4:memory:/box\n0::/\n")
    write(root, "sys/fs/cgroup/memory/box/memory.limit_in_bytes", f"{1 * 2**30}\n")
    write(root, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert detect_profile(root, measure=False).memory.total_mb == 1024


def test_jetson_is_cuda_with_unified_memory(tmp_path: Path) -> None:
    root = fake_pi5(tmp_path)
    write(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 3.0\n")
    gpu = detect_profile(root, measure=False).gpu
    assert gpu.kind == "cuda" and gpu.unified_memory


def test_this_machine() -> None:
    profile = detect_profile()
    total_mib = psutil.virtual_memory().total // 2**20
    # RAM matches what psutil sees, unless a cgroup limit is tighter.
    assert 0 < profile.memory.total_mb <= total_mib
    assert profile.memory.total_mb == total_mib or profile.memory.os_reserved_mb == 0
    assert profile.cpu.big_cores + profile.cpu.little_cores >= 1
    assert profile.memory.bandwidth_gbs > 0
    assert profile.usable_mb > 0


def test_bandwidth_is_a_positive_number_of_gigabytes() -> None:
    assert 0.05 < measure_bandwidth_gbs(threads=1, budget_mb=64) < 2000


def test_cli_detect_writes_a_profile_that_loads(tmp_path: Path) -> None:
    from edgerunner.profiles import load_profile_file

    out = tmp_path / "mine.toml"
    result = CliRunner().invoke(main, ["profiles", "detect", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert load_profile_file(out).name == data["name"]
