"""The emulated CPUs of the ARM lane, each with the /proc/cpuinfo its Raspberry Pi prints.

qemu-user emulates the CPU's instructions and its HWCAP (what ggml picks its CPU variant by),
but /proc/cpuinfo inside the guest is the host's (x86 flags): so a Pi-like cpuinfo is bound
over it, or edgerunner's ISA detection would read the host.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cpu:
    """One emulated CPU: qemu's model name, the board it stands for, what it must show."""

    qemu: str  # qemu-aarch64 -cpu name
    board: str
    profile: str  # the device profile packed for it
    part: int  # MIDR "CPU part"
    variant: int
    revision: int
    hwcaps: str  # the kernel's Features line on that board
    features: tuple[str, ...]  # what edgerunner must read from it (profile vocabulary)
    ggml_variant: str  # the ggml CPU variant llama.cpp must pick

    def cpuinfo(self, n_cpus: int = 4) -> str:
        """The /proc/cpuinfo text of the board (arm64 kernel format, 4 cores)."""
        block = (
            "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {hw}\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: 0x{v:x}\nCPU part\t: 0x{p:03x}\n"
            "CPU revision\t: {r}\n\n"
        )
        text = "".join(block.format(n=n, hw=self.hwcaps, v=self.variant, p=self.part,
                                    r=self.revision) for n in range(n_cpus))
        return text + f"Hardware\t: BCM2835\nModel\t\t: {self.board}\n"


# Features lines as the boards' kernels print them (Raspberry Pi OS, 64-bit).
CPUS = (
    Cpu("cortex-a76", "Raspberry Pi 5 Model B Rev 1.0", "rpi5-8gb", 0xD0B, 4, 1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
        "lrcpc dcpop asimddp", ("neon", "fp16", "dotprod"), "armv8.2_2"),
    Cpu("cortex-a72", "Raspberry Pi 4 Model B Rev 1.4", "rpi4-4gb", 0xD08, 0, 3,
        "fp asimd evtstrm crc32 cpuid", ("neon",), "armv8.0_1"),
    Cpu("cortex-a53", "Raspberry Pi Zero 2 W Rev 1.0", "rpi-zero2w", 0xD03, 0, 4,
        "fp asimd evtstrm crc32 cpuid", ("neon",), "armv8.0_1"),
)


def by_name(name: str) -> Cpu:
    """The lane's CPU with this qemu name."""
    for cpu in CPUS:
        if cpu.qemu == name:
            return cpu
    raise SystemExit(f"no lane CPU {name!r}: choose from {', '.join(c.qemu for c in CPUS)}")
