"""A bundle's manifest carries n_parallel, the prefix cache and the per-stream speeds; a
manifest written before they existed still loads, as one stream without a prefix cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.store import MANIFEST, read_manifest, verify_bundle
from edgerunner.bundle.unit import CEILING_MARGIN_FRACTION, CEILING_MARGIN_MIN_MB, unit_settings


def test_packed_manifest_records_the_streams(rpi5_bundle: Path) -> None:
    manifest = read_manifest(rpi5_bundle)
    plan, pred = manifest.plan, manifest.prediction
    assert plan.n_parallel > 1 and plan.prefix_cache_cells > 0
    assert plan.n_seq_max > plan.n_parallel  # the prefix cache's sequences
    assert 0 < pred.stream_tps <= pred.decode_tps < pred.aggregate_tps


def test_manifest_without_the_parallel_fields_loads_as_one_stream(
    rpi5_bundle: Path, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(rpi5_bundle, tmp_path / rpi5_bundle.name))
    path = bundle / MANIFEST
    data = json.loads(path.read_text())
    for key in ("n_parallel", "prefix_cache_cells"):
        del data["plan"][key]
    for key in ("stream_tps", "aggregate_tps"):
        del data["prediction"][key]
    path.write_text(json.dumps(data))
    manifest = read_manifest(bundle)
    assert (manifest.plan.n_parallel, manifest.plan.prefix_cache_cells) == (1, 0)
    assert manifest.plan.n_seq_max == 1
    assert manifest.prediction.stream_tps == manifest.prediction.aggregate_tps == 0.0
    assert verify_bundle(bundle).ok


def test_unit_limits_come_from_the_predicted_total(rpi5_bundle: Path) -> None:
    manifest = read_manifest(rpi5_bundle)
    total = manifest.prediction.memory.total_mb
    settings = unit_settings(manifest)
    assert settings.predicted_mb == total
    assert settings.rss_ceiling_mb == math.ceil(
        total + max(total * CEILING_MARGIN_FRACTION, CEILING_MARGIN_MIN_MB))
    # more streams: more output rows and samplers, higher limits
    data = manifest.model_dump()
    data["prediction"]["memory"]["logits_mb"] += 100
    bigger = unit_settings(BundleManifest.model_validate(data))
    assert bigger.memory_high_mb > settings.memory_high_mb
    assert bigger.memory_max_mb > settings.memory_max_mb
