"""A bundle packed for one CPU and served on another: the daemon predicts for the CPU that serves.

llama.cpp repacks weights by the serving CPU's rules. A Pi 5 bundle of a tied-embedding Q8_0
model holds a repacked copy of the output matrix there (q8_0_4x4, dotprod) that this x86 host
never makes, so the manifest's figure (for the profile's CPU) is far off here. The manifest
keeps the weights for every repack ISA, and the daemon's memory fit takes this CPU's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgerunner.bundle.settings import ServeConfig
from edgerunner.bundle.store import load_bundle
from edgerunner.host.cpu import host_cpu_features
from edgerunner.pack.isa import repack_isa
from edgerunner.pack.packer import pack
from edgerunner.pack.planner import PlanOptions
from edgerunner.profiles import resolve_profile
from edgerunner.runtime.engine.preflight import serving_features, system_info
from edgerunner.runtime.supervise.daemon import Daemon
from tests.shapes import MATRIX, buffer_parts, matrix_source, serve_and_measure

N_CTX = 2048
# the held-out case of the issue: 262k vocabulary, tied output, sliding-window layers
SHAPE = next(s for s in MATRIX if s.n_vocab == 262144 and s.tied and s.sliding_window)


@pytest.mark.slow
def test_an_arm_bundle_served_here_is_predicted_for_this_cpu(
    default_model: Path, tmp_path: Path
) -> None:
    here = repack_isa(serving_features(system_info(), host_cpu_features()))
    if here.startswith("neon+dotprod"):
        pytest.skip("this host repacks as a Pi 5 does: nothing differs to predict")
    source = matrix_source(SHAPE, default_model)
    packed = pack(source, resolve_profile("rpi5-8gb"), tmp_path / "out",
                  PlanOptions(max_ctx=N_CTX, parallel=1), quality_chunks=0, imatrix=False)
    manifest = packed.manifest
    prediction = manifest.prediction
    assert manifest.plan.quant == "Q8_0"  # a tied Q8_0 output: the copy only ARM repacks
    assert prediction.cpu == "neon+dotprod"
    by_cpu = prediction.weights_mb_by_cpu
    assert by_cpu["neon+dotprod"] == pytest.approx(prediction.memory.weights_mb, abs=0.01)
    assert by_cpu["neon+dotprod"] - by_cpu[here] > 100  # the 170 MiB output copy

    # the daemon's own start-up: preflight, then the memory fit, for this CPU
    bundle = load_bundle(packed.path, verify=False)
    short = Path(f"/tmp/er-host-{tmp_path.name[-12:]}")
    short.mkdir(exist_ok=True)
    daemon = Daemon(bundle, ServeConfig.model_validate(
        {"socket": short / "d.sock", "n_threads": 2}))
    daemon.run_preflight()
    fit = daemon.fit_memory()
    assert fit.plan.n_ctx == manifest.plan.n_ctx == N_CTX
    assert fit.predicted_mb == pytest.approx(
        prediction.memory.total_mb - by_cpu["neon+dotprod"] + by_cpu[here], abs=0.05)

    served = serve_and_measure(bundle.model_path, fit.plan, prompt_tokens=N_CTX - 8)
    weights = buffer_parts(served.buffers, fit.plan.mmap)["weights"]
    assert weights == pytest.approx(by_cpu[here], abs=1.0)
    error = (fit.predicted_mb - served.vmhwm_mb) / served.vmhwm_mb
    profile_error = (prediction.memory.total_mb - served.vmhwm_mb) / served.vmhwm_mb
    assert abs(error) <= 0.05, (
        f"predicted here {fit.predicted_mb:.1f} MiB, VmHWM {served.vmhwm_mb:.1f} MiB "
        f"({error:+.1%}; the profile's figure {profile_error:+.1%}); buffers {served.buffers}")
    assert profile_error > 0.2  # what serving the profile's figure would have been off by
