"""IQ2/IQ3 presets: the per-tensor types llama.cpp's quantizer picks with an importance matrix,
their fallbacks on rows the 256-blocks do not divide, and when the plan offers them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerunner.errors import PlanError
from edgerunner.pack.gguf_info import ModelInfo, read_model_info
from edgerunner.pack.imatrix import Imatrix, compute_imatrix
from edgerunner.pack.memory import dry_run_types, predict_weights
from edgerunner.pack.planner import PlanOptions, allowed_presets, make_plan
from edgerunner.pack.quality import calibration_chunks
from edgerunner.pack.quant_rules import IMATRIX_ONLY, tensor_types
from edgerunner.pack.quantize import quantize
from edgerunner.profiles import resolve_profile
from tests.pack.test_memory import default_info, f16_llama  # noqa: F401  (fixtures)
from tests.shapes import f16_from_default

IQ_PRESETS = sorted(IMATRIX_ONLY)


@pytest.fixture(scope="module")
def f16_source(default_model: Path) -> Path:
    return f16_from_default(default_model)


@pytest.fixture(scope="module")
def imatrix(f16_source: Path) -> Imatrix:
    # the types depend on whether there is an imatrix, not on its values: two chunks do
    return compute_imatrix(f16_source, calibration_chunks(f16_source, 2), n_threads=2)


@pytest.mark.parametrize("preset", ["IQ2_XS", "IQ3_XXS"])
def test_predicted_types_are_what_llama_cpp_writes_with_an_imatrix(
    f16_source: Path, imatrix: Imatrix, tmp_path: Path, preset: str
) -> None:
    """SmolLM2's 576-wide rows fall back from the 256-blocks to IQ4_NL (IQ2_XS's attn_v, Q2_K,
    to Q4_0); its 1536-wide ffn_down rows keep the IQ type (IQ2_XS's first eighth: Q2_K)."""
    info = read_model_info(f16_source)
    out = tmp_path / f"{preset}.gguf"
    quantize(f16_source, out, preset, n_threads=2, source_type=info.file_type, imatrix=imatrix)
    written = {t.name: t.type for t in read_model_info(out).tensors}
    predicted = tensor_types(info, preset)
    assert predicted == written
    assert abs(predict_weights(info, preset) - out.stat().st_size) / out.stat().st_size < 0.01
    assert {"IQ4_NL", preset} <= set(written.values())


@pytest.mark.parametrize("preset", IQ_PRESETS)
def test_iq_mixtures_match_llama_cpp_on_rows_256_blocks_divide(f16_llama: Path,  # noqa: F811
                                                               preset: str) -> None:
    info = read_model_info(f16_llama)
    assert tensor_types(info, preset, imatrix=True) == dry_run_types(f16_llama, preset,
                                                                     imatrix=True)


def test_iq3_xxs_without_an_imatrix_is_typed_as_llama_cpp_would(f16_llama: Path  # noqa: F811
                                                                ) -> None:
    info = read_model_info(f16_llama)
    assert tensor_types(info, "IQ3_XXS", imatrix=False) == dry_run_types(f16_llama, "IQ3_XXS")


def test_q2_k_and_q3_k_s_fall_back_alike_on_smollm2(default_model: Path, f16_source: Path,
                                                    tmp_path: Path) -> None:
    """Q2_K and Q3_K_S write the same file on SmolLM2: every 576-wide row falls back from
    Q2_K/Q3_K to Q4_0 (the tied embeddings' Q6_K to Q8_0), and ffn_down is Q3_K in both (Q2_K
    bumps it to Q3_K, Q3_K_S's default is Q3_K)."""
    info = read_model_info(f16_source)
    q2, q3 = tensor_types(info, "Q2_K"), tensor_types(info, "Q3_K_S")
    assert q2 == q3
    assert {q2[t.name] for t in info.tensors if len(t.shape) > 1} == {"Q4_0", "Q3_K", "Q8_0"}
    out = tmp_path / "q3_k_s.gguf"
    quantize(f16_source, out, "Q3_K_S", n_threads=2, source_type=info.file_type)
    assert {t.name: t.type for t in read_model_info(out).tensors} == q3


def test_iq_presets_are_candidates_only_with_an_imatrix(default_info: ModelInfo  # noqa: F811
                                                        ) -> None:
    assert set(IQ_PRESETS) <= set(allowed_presets(default_info))
    assert not set(IQ_PRESETS) & set(allowed_presets(default_info, imatrix=False))
    profile = resolve_profile("rpi-zero2w")
    plan = make_plan(default_info, profile, PlanOptions(imatrix=False))
    assert not {c.quant for c in plan.candidates} & set(IQ_PRESETS)
    with pytest.raises(PlanError, match="needs an importance matrix"):
        make_plan(default_info, profile, PlanOptions(quant="IQ2_XS", imatrix=False))
    forced = make_plan(default_info, profile, PlanOptions(quant="IQ3_XXS"))
    assert forced.runtime.quant == "IQ3_XXS"
