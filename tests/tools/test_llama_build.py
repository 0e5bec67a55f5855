"""tools/build/llama_build.py: explicit flags per platform, a cache key that follows them, and the
installed llama.cpp really being the portable build (a cached native wheel must not come back)."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "build" / "llama_build.py"


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama_build", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["llama_build"] = module
    spec.loader.exec_module(module)
    return module


def test_x86_is_portable_unless_native_is_asked_for(build: ModuleType) -> None:
    portable = build.cmake_args("x86_64", native=False)
    assert "-DGGML_NATIVE=OFF" in portable
    assert {"-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"} <= set(portable)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AVX512=OFF"} <= set(portable)
    assert "-DGGML_NATIVE=ON" in build.cmake_args("x86_64", native=True)
    assert "-DGGML_NATIVE=ON" in build.cmake_args("aarch64", native=False)  # builds for itself


def test_the_cache_key_follows_version_machine_and_flags(build: ModuleType) -> None:
    portable = build.cmake_args("x86_64", native=False)
    native = build.cmake_args("x86_64", native=True)
    key = build.cache_key(portable, "x86_64")
    assert key.startswith(f"{build.VERSION}-x86_64-")
    assert key != build.cache_key(native, "x86_64")
    assert key != build.cache_key(portable, "aarch64")
    assert key == build.cache_key(list(portable), "x86_64")


def test_the_version_is_the_one_pyproject_pins(build: ModuleType) -> None:
    pyproject = (TOOL.parents[2] / "pyproject.toml").read_text()
    assert f'"llama-cpp-python=={build.VERSION}"' in pyproject


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable baseline is x86's")
@pytest.mark.skipif(os.environ.get("EDGERUNNER_LLAMA_NATIVE", "") not in ("", "0"),
                    reason="a native build was asked for")
def test_the_installed_llama_cpp_is_the_portable_build() -> None:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    used = set(re.findall(r"(\w+) = 1", info))
    assert "AVX2" in used, info
    assert not {f for f in used if f.startswith(("AVX512", "AMX"))}, info
