"""Which CPU a memory figure is for: the ISA features that decide llama.cpp's weight repacking.

ggml-cpu's repack rules (pack.memory._REPACK_RULES) name only a few features; two CPUs that
share those repack the same tensors, so a figure is keyed by them alone. Light on imports:
the daemon reads these names at start-up without the GGUF machinery.
"""

from __future__ import annotations

from collections.abc import Iterable

# The ISA features any repack rule names.
REPACK_FEATURES = ("avx2", "avx512", "neon", "dotprod", "i8mm")
# The repack ISAs llama.cpp's CPU backend tells apart, as repack_isa() names them: x86 with AVX2
# (and AVX-512), ARM with NEON only (the Pi 4, Zero 2 W), with dotprod (the Pi 5), with i8mm;
# "none": no rule applies (an older x86, or llama.cpp's extra buffer types turned off).
REPACK_ISAS = ("none", "avx2", "avx2+avx512", "neon", "neon+dotprod", "neon+dotprod+i8mm")


def repack_isa(cpu_features: Iterable[str]) -> str:
    """The CPU's features that decide llama.cpp's repacking, as one name ("none" if none)."""
    features = set(cpu_features)
    return "+".join(f for f in REPACK_FEATURES if f in features) or "none"


def isa_features(isa: str) -> list[str]:
    """repack_isa's name back to its features."""
    return [] if isa in ("", "none") else isa.split("+")
