"""`pack`: from a GGUF and a device profile to a verified bundle (directory or .tar)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgerunner import __version__
from edgerunner._fs import sha256_file
from edgerunner.bundle.manifest import (
    SCHEMA_VERSION,
    BundleManifest,
    FileEntry,
    ImatrixRecord,
    QualityReport,
    SourceModel,
)
from edgerunner.bundle.store import (
    CONFIG_FILE,
    MODEL_FILE,
    UNIT_FILE,
    BundleStage,
    package_version,
    stage_bundle,
    utc_now,
)
from edgerunner.errors import BundleError
from edgerunner.pack.default_model import DEFAULT_MODEL_SHA256, ensure_default_model
from edgerunner.pack.gguf_info import ModelInfo, read_model_info
from edgerunner.pack.imatrix import IMATRIX_CHUNKS, Imatrix
from edgerunner.pack.planner import PlanOptions, PlanResult, make_plan
from edgerunner.pack.quality import (
    DEFAULT_CHUNKS,
    StepProgress,
    calibration_chunks,
    calibration_sha256,
    cannot_measure,
    measure_quality,
    unmeasured,
)
from edgerunner.pack.quantize import Progress, check_architecture, quantize
from edgerunner.pack.smoke import default_smoke
from edgerunner.profiles import DeviceProfile

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
    quality_chunks: int = DEFAULT_CHUNKS,
    imatrix: Path | bool | None = None,
    step_progress: StepProgress | None = None,
) -> PackResult:
    """Plan, quantize and write a bundle for `profile` into output_dir; returns where it went.

    `quality_chunks` calibration chunks measure the packed model against an unquantized
    source (0: not measured). `imatrix`: None computes an importance matrix for the presets
    that want one (pack.imatrix.IMATRIX_PRESETS), False never, a Path is the user's own
    (llama.cpp's GGUF imatrix format). `step_progress` follows those two steps."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if model is None:
        source, hasher = ensure_default_model(), _SourceHash(None, DEFAULT_MODEL_SHA256)
    else:
        source, hasher = model, _SourceHash(model if model.is_file() else None)
    try:
        return _pack(source, hasher, profile, output_dir, options, archive=archive,
                     progress=progress, n_threads=n_threads, info=info, timings=timings,
                     start=start, extras=_Extras(quality_chunks, imatrix, step_progress))
    finally:
        hasher.cancel()


def _pack(
    source: Path,
    hasher: _SourceHash,
    profile: DeviceProfile,
    output_dir: Path,
    options: PlanOptions | None,
    *,
    archive: bool,
    progress: Progress | None,
    n_threads: int | None,
    info: ModelInfo | None,
    timings: dict[str, float],
    start: float,
    extras: _Extras | None = None,
) -> PackResult:
    extras = extras or _Extras()
    if info is None:
        info = read_model_info(source)
    timings["read_header"] = time.perf_counter() - start
    check_architecture(info.architecture, source)

    mark = time.perf_counter()
    if extras.imatrix is not None:  # --imatrix FILE / --no-imatrix: the plan's candidates follow
        options = (options or PlanOptions()).model_copy(
            update={"imatrix": extras.imatrix is not False})
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
        mark = time.perf_counter()
        source_hash = hasher.result()
        timings["hash_source_wait"] = time.perf_counter() - mark
        mark = time.perf_counter()
        threads = n_threads or os.cpu_count()
        imatrix_data, imatrix_record = _imatrix(source, quant, extras, threads)
        timings["imatrix"] = time.perf_counter() - mark
        mark = time.perf_counter()
        result = quantize(
            source, stage.path / MODEL_FILE, quant,
            n_threads=threads, progress=progress,
            source_type=info.file_type, imatrix=imatrix_data,
        )
        timings["quantize"] = time.perf_counter() - mark
        warnings.extend(result.warnings)
        mark = time.perf_counter()
        quality = _quality(source, info, result.path, extras, threads)
        timings["quality"] = time.perf_counter() - mark

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
            smoke=default_smoke(plan.prediction),
            quality=quality,
            imatrix=imatrix_record,
        )
        _render_side_files(stage, manifest)
        if archive:
            from edgerunner.bundle.archive import write_archive

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


@dataclass(frozen=True)
class _Extras:
    """pack's measuring options: quality chunks, the imatrix choice, their progress."""

    quality_chunks: int = DEFAULT_CHUNKS
    imatrix: Path | bool | None = None
    step_progress: StepProgress | None = None


def _imatrix(
    source: Path, quant: str, extras: _Extras, n_threads: int | None
) -> tuple[Imatrix | None, ImatrixRecord]:
    """The importance matrix handed to the quantizer, and the manifest's record of it."""
    from edgerunner.pack.imatrix import compute_imatrix, read_imatrix, wants_imatrix

    if isinstance(extras.imatrix, Path):
        data = read_imatrix(extras.imatrix)
        return data, ImatrixRecord(used="file", path=str(extras.imatrix.resolve()),
                                   sha256=sha256_file(extras.imatrix), entries=len(data.sums),
                                   n_chunks=data.n_chunks)
    if extras.imatrix is False:
        return None, ImatrixRecord(used="none", reason="turned off (--no-imatrix)")
    if not wants_imatrix(quant):
        return None, ImatrixRecord(used="none", reason=f"{quant} keeps 4 bits or more per "
                                   "weight: llama.cpp's quantizer does well without one")
    chunks = calibration_chunks(source, IMATRIX_CHUNKS)
    data = compute_imatrix(source, chunks, n_threads=n_threads, progress=extras.step_progress)
    return data, ImatrixRecord(used="computed", sha256=calibration_sha256(),
                               entries=len(data.sums), n_chunks=data.n_chunks,
                               seconds=round(data.seconds, 2))


def _quality(
    source: Path, info: ModelInfo, packed: Path, extras: _Extras, n_threads: int | None
) -> QualityReport:
    """The packed model measured against its source, or why it was not."""
    reason = cannot_measure(info.file_type)
    if reason is None and extras.quality_chunks <= 0:
        reason = "not asked for (--quality-chunks 0)"
    if reason is not None:
        logger.info("quality not measured: %s", reason)
        return unmeasured(reason)
    return measure_quality(source, packed, n_chunks=extras.quality_chunks, n_threads=n_threads,
                           progress=extras.step_progress)


class _SourceHash:
    """sha256 of the source, computed while the header is read and the plan is made.

    Header parsing is pure Python on one core; hashing mostly runs with the GIL released, so
    the two overlap well. Quantization is a different story: on a 2-core packer a hashing
    thread beside llama.cpp slowed it by more than the hash costs, so result() is awaited
    before quantizing starts.
    """

    _CHUNK = 8 << 20  # few GIL round trips per GiB

    def __init__(self, path: Path | None, known: str | None = None) -> None:
        self._digest = hashlib.sha256()
        self._known = known
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if path is not None and known is None:
            self._thread = threading.Thread(target=self._run, args=(path,), daemon=True,
                                            name="edgerunner-hash-source")
            self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            with path.open("rb") as handle:
                while not self._stop.is_set() and (block := handle.read(self._CHUNK)):
                    self._digest.update(block)
        except OSError as exc:
            self._error = exc

    def result(self) -> str:
        """The hex digest (waits for the thread)."""
        if self._known is not None:
            return self._known
        if self._thread is None:
            raise BundleError("the source model vanished while packing", hint="pack it again")
        self._thread.join()
        if self._error is not None or self._stop.is_set():
            raise BundleError(f"could not read the source model: {self._error}") from self._error
        self._known = self._digest.hexdigest()
        return self._known

    def cancel(self) -> None:
        """Stop hashing (pack failed or finished) and let the thread end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _render_side_files(stage: BundleStage, manifest: BundleManifest) -> None:
    from edgerunner.bundle.settings import render_config_toml
    from edgerunner.bundle.unit import render_unit

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
