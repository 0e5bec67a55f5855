"""A bundle packed before the manifest kept the weights per CPU: the daemon asks a child once.

Its answer is kept beside the preflight's verdicts, so a restart does not pay a child process
parsing the GGUF header again (2.9 s for a 1B model here), and a cache file that does not read
is asked again, never trusted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgerunner.bundle.store import load_bundle
from edgerunner.runtime.engine.predict import weights_saving_mb

X86 = ["avx", "avx2", "f16c", "fma"]  # repacks as x86 AVX2; the rpi5 profile as neon+dotprod


def test_an_old_manifest_is_predicted_once_per_model_and_plan(
    rpi5_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(rpi5_bundle, verify=False)
    manifest = bundle.manifest
    by_cpu = manifest.prediction.weights_mb_by_cpu
    expected = by_cpu["neon+dotprod"] - by_cpu["avx2"]
    old = manifest.model_copy(update={"prediction": manifest.prediction.model_copy(
        update={"weights_mb_by_cpu": {}})})
    store = tmp_path / "preflight"

    first = weights_saving_mb(old, bundle.model_path, X86, store=store)
    assert first == pytest.approx(expected, abs=1.0)  # the child's figure, as pack made it
    (cached,) = store.glob("weights-*.json")

    with monkeypatch.context() as no_child:  # a child would need this interpreter
        no_child.setattr(sys, "executable", str(tmp_path / "no-python"))
        assert weights_saving_mb(old, bundle.model_path, X86, store=store) == first
        other_plan = old.model_copy(update={"plan": old.plan.model_copy(update={"n_ctx": 512})})
        with pytest.raises(FileNotFoundError):  # another plan is another question
            weights_saving_mb(other_plan, bundle.model_path, X86, store=store)

    cached.write_text('{"avx2": "truncat')
    assert weights_saving_mb(old, bundle.model_path, X86, store=store) == first
    assert '"avx2"' in cached.read_text()  # asked again and rewritten
