"""`pack`: from a GGUF and a device profile to a verified bundle (directory or .tar)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgerunner import __version__
from edgerunner.bundle import (
    CONFIG_FILE,
    MODEL_FILE,
    UNIT_FILE,
    BundleStage,
    package_version,
    stage_bundle,
    utc_now,
)
from edgerunner.errors import BundleError
from edgerunner.gguf_info import ModelInfo, read_model_info
from edgerunner.manifest import SCHEMA_VERSION, BundleManifest, FileEntry, SourceModel
from edgerunner.models import ensure_default_model, sha256_file
from edgerunner.planner import PlanOptions, PlanResult, make_plan
from edgerunner.profiles import DeviceProfile
from edgerunner.quantize import Progress, check_architecture, quantize

logger = logging.getLogger(__name__)

# Room for manifest.json, config.toml and the unit on top of the model, bytes.
_SMALL_FILES_BYTES = 1 << 20
# Quant suffixes converters and hubs append to file names ("model.Q4_1", "model-f16").
_QUANT_SUFFIX = re.compile(
    r"[.\-_](?:[iI]?[qQ]\d[\w]*|[fF](?:16|32)|[bB][fF]16|[tT][qQ]\d_\d)$"
)


@dataclass
class PackResult:
    """What `pack` produced, and what it cost."""

    path: Path
    manifest: BundleManifest
    plan: PlanResult
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    actual_size: int = 0
    archive: bool = False

    @property
    def predicted_size(self) -> int:
        return self.manifest.prediction.file_size

    @property
    def size_error(self) -> float:
        """(actual - predicted) / predicted file size of model.gguf."""
        predicted = self.predicted_size
        return (self.actual_size - predicted) / predicted if predicted else 0.0


def bundle_name(model: Path, profile: DeviceProfile, quant: str) -> str:
    """<model>-<profile>-<quant>, from the file name without its quant suffix."""
    stem = _QUANT_SUFFIX.sub("", model.stem) or model.stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    return f"{stem}-{profile.name}-{quant.upper()}"


def pack(
    model: Path | None,
    profile: DeviceProfile,
    output_dir: Path,
    options: PlanOptions | None = None,
    *,
    archive: bool = False,
    progress: Progress | None = None,
    n_threads: int | None = None,
    info: ModelInfo | None = None,
) -> PackResult:
    """Plan, quantize and write a bundle for `profile` into output_dir; returns where it went."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = model if model is not None else ensure_default_model()
    if info is None:
        info = read_model_info(source)
    timings["read_header"] = time.perf_counter() - start
    check_architecture(info.architecture, source)

    mark = time.perf_counter()
    plan = make_plan(info, profile, options)
    timings["plan"] = time.perf_counter() - mark
    quant = plan.runtime.quant
    name = bundle_name(source, profile, quant)
    dest = output_dir / (f"{name}.tar" if archive else name)
    if dest.exists():
        raise BundleError(
            f"output {'archive' if archive else 'directory'} {dest} already exists",
            hint="pass a different -o, or remove the old bundle first",
        )
    # An archive holds a second copy of the model while the staged one still exists.
    _check_free_space(output_dir, plan.prediction.file_size * (2 if archive else 1))

    warnings = list(plan.warnings)
    with stage_bundle(output_dir / name, check_dest=not archive) as stage:
        # Hashed before, not beside, quantization: on a 2-core packer a hashing thread slowed
        # llama.cpp (and its GIL-taking log callback) by more than the hash itself costs.
        mark = time.perf_counter()
        source_hash = sha256_file(source)
        timings["hash_source"] = time.perf_counter() - mark
        mark = time.perf_counter()
        result = quantize(
            source, stage.path / MODEL_FILE, quant,
            n_threads=n_threads or os.cpu_count(), progress=progress,
            source_type=info.file_type,
        )
        timings["quantize"] = time.perf_counter() - mark
        warnings.extend(result.warnings)

        mark = time.perf_counter()
        model_entry = FileEntry(sha256=sha256_file(result.path), size=result.size)
        manifest = BundleManifest(
            schema_version=SCHEMA_VERSION,
            name=name,
            created=utc_now(),
            edgerunner_version=__version__,
            llama_cpp_python_version=package_version("llama-cpp-python"),
            source=SourceModel(
                name=info.name, path=str(source.resolve()), sha256=source_hash,
                architecture=info.architecture, file_type=info.file_type,
                n_params=info.n_params, n_ctx_train=info.n_ctx_train, n_vocab=info.n_vocab,
            ),
            profile=profile,
            plan=plan.runtime,
            prediction=plan.prediction,
            files={MODEL_FILE: model_entry},
        )
        _render_side_files(stage, manifest)
        if archive:
            from edgerunner.archive import write_archive

            final = stage.finalize(manifest, known={MODEL_FILE: model_entry})
            write_archive(stage.path, dest, arcname=name)
        else:
            final = stage.commit(manifest, known={MODEL_FILE: model_entry})
        timings["write"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start

    predicted = plan.prediction.file_size
    logger.info("model.gguf: predicted %d bytes, actual %d bytes (%+.2f%%)", predicted,
                result.size, 100 * (result.size - predicted) / predicted if predicted else 0.0)
    return PackResult(path=dest, manifest=final, plan=plan, warnings=warnings, timings=timings,
                      actual_size=result.size, archive=archive)


def _render_side_files(stage: BundleStage, manifest: BundleManifest) -> None:
    from edgerunner.runtime.config import render_config_toml
    from edgerunner.systemd_unit import render_unit

    stage.write_text(CONFIG_FILE, render_config_toml(manifest))
    stage.write_text(UNIT_FILE, render_unit(manifest))


def _check_free_space(output_dir: Path, predicted_size: int) -> None:
    probe = output_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    needed = predicted_size + _SMALL_FILES_BYTES
    if free < needed:
        raise BundleError(
            f"not enough disk space in {output_dir}: the bundle needs about {needed / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB are free",
            hint="free disk space or pass a different -o",
        )
