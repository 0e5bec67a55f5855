"""What a quantization did to this model, measured: the packed model against its source.

llama.cpp's `perplexity --kl-divergence` method, on the calibration text edgerunner ships
(edgerunner/_calibration, public domain): the text is tokenized by the source's vocabulary and
cut into chunks of CHUNK_TOKENS; each chunk starts with BOS (where the model adds one) and is
evaluated alone by both models; the tokens of its second half are scored, each with the full
first half as context. Over those positions:

- mean KL divergence KL(P_source || P_packed) of the next-token distributions (nats);
- top-1 agreement: how often both models' most likely next token is the same;
- perplexity ratio: the packed model's perplexity of the text over the source's.

Only an unquantized source (F32/F16/BF16) is a reference: against a quantized one, the figures
would measure the distance between two lossy copies, not the loss.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgerunner.bundle.manifest import QualityReport
from edgerunner.errors import ModelError

if TYPE_CHECKING:
    from edgerunner.pack.gguf_info import ModelInfo
    from edgerunner.pack.planner import PlanOptions, PlanResult
    from edgerunner.profiles import DeviceProfile

logger = logging.getLogger(__name__)

CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "_calibration" / (
    "kjv-ruth-jonah-ecclesiastes.txt")
CHUNK_TOKENS = 512
DEFAULT_CHUNKS = 8  # 8 × 256 scored tokens: ~2 s per chunk and model for a 135M model
UNQUANTIZED = frozenset({"F32", "ALL_F32", "F16", "BF16"})

StepProgress = Callable[[str, int, int], None]
"""Called with (what, done, total) as chunks are evaluated."""


def calibration_text() -> str:
    """The shipped calibration text."""
    return CALIBRATION_FILE.read_text(encoding="utf-8")


def calibration_sha256() -> str:
    return hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest()


def cannot_measure(file_type: str) -> str | None:
    """Why quality cannot be measured against a source of this type (None: it can)."""
    if file_type.upper() in UNQUANTIZED:
        return None
    return (f"the source is already quantized ({file_type}): a KL divergence against it would "
            "measure the distance between two lossy copies, not what quantizing lost; pack from "
            "an F16/BF16/F32 GGUF to measure")


def _open(path: Path, n_threads: int | None, logits_all: bool = True) -> object:
    import llama_cpp

    return llama_cpp.Llama(
        str(path), n_ctx=CHUNK_TOKENS, n_batch=CHUNK_TOKENS, n_ubatch=CHUNK_TOKENS,
        n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all, verbose=False,
        n_gpu_layers=0,
    )


def calibration_chunks(model_path: Path, n_chunks: int = DEFAULT_CHUNKS) -> list[list[int]]:
    """The calibration text as at most n_chunks chunks of CHUNK_TOKENS tokens of this model's
    vocabulary, each starting with BOS where the model adds one (llama.cpp's perplexity)."""
    import llama_cpp

    vocab_only = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    try:
        tokens = vocab_only.tokenize(calibration_text().encode(), add_bos=False, special=False)
        add_bos = vocab_only._model.add_bos_token()
        bos = vocab_only.token_bos()
    finally:
        vocab_only.close()
    chunks = []
    for i in range(min(n_chunks, len(tokens) // CHUNK_TOKENS)):
        chunk = list(tokens[i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS])
        if add_bos and bos >= 0:
            chunk[0] = bos
        chunks.append(chunk)
    if not chunks:
        raise ModelError(f"the calibration text is shorter than {CHUNK_TOKENS} tokens for "
                         f"{model_path}'s vocabulary")
    return chunks


def chunk_logits(llm: object, chunk: list[int]) -> np.ndarray:
    """Logits (float32, one row per scored position) of a chunk's second half: row i predicts
    chunk[first + i + 1], first = CHUNK_TOKENS // 2."""
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(chunk)  # type: ignore[attr-defined]
    first = len(chunk) // 2
    scores: np.ndarray = llm.scores  # type: ignore[attr-defined]
    return np.array(scores[first:len(chunk) - 1], dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@dataclass
class _Sums:
    kld: float = 0.0
    same_top: int = 0
    nll_source: float = 0.0
    nll: float = 0.0
    count: int = 0

    def add(self, source: np.ndarray, packed: np.ndarray, targets: np.ndarray) -> None:
        ls, lq = log_softmax(source), log_softmax(packed)
        rows = np.arange(len(targets))
        self.kld += float((np.exp(ls) * (ls - lq)).sum())
        self.same_top += int((source.argmax(axis=1) == packed.argmax(axis=1)).sum())
        self.nll_source -= float(ls[rows, targets].sum())
        self.nll -= float(lq[rows, targets].sum())
        self.count += len(targets)


@contextmanager
def _models(*paths: Path, n_threads: int | None) -> Iterator[list[object]]:
    opened: list[object] = []
    try:
        for path in paths:
            opened.append(_open(path, n_threads))
        yield opened
    finally:
        for llm in opened:
            llm.close()  # type: ignore[attr-defined]


def measure_quality(
    source: Path, packed: Path, *, n_chunks: int = DEFAULT_CHUNKS, n_threads: int | None = None,
    progress: StepProgress | None = None,
) -> QualityReport:
    """The packed model against its (unquantized) source on the calibration text."""
    start = time.perf_counter()
    chunks = calibration_chunks(source, n_chunks)
    sums = _Sums()
    with _models(source, packed, n_threads=n_threads) as (reference, quantized):
        if progress is not None:
            progress("measuring quality", 0, len(chunks))
        for i, chunk in enumerate(chunks):
            targets = np.array(chunk[len(chunk) // 2 + 1:], dtype=np.int64)
            sums.add(chunk_logits(reference, chunk), chunk_logits(quantized, chunk), targets)
            if progress is not None:
                progress("measuring quality", i + 1, len(chunks))
    seconds = time.perf_counter() - start
    ppl_source = math.exp(sums.nll_source / sums.count)
    ppl = math.exp(sums.nll / sums.count)
    report = QualityReport(
        measured=True, mean_kld=sums.kld / sums.count, top1_agreement=sums.same_top / sums.count,
        ppl=ppl, ppl_source=ppl_source, ppl_ratio=ppl / ppl_source, n_chunks=len(chunks),
        chunk_tokens=CHUNK_TOKENS, n_scored=sums.count, text=CALIBRATION_FILE.name,
        text_sha256=calibration_sha256(), seconds=round(seconds, 2),
    )
    logger.info("quality of %s against %s: KLD %.5f, top-1 %.1f%%, PPL ratio %.4f (%d chunks, "
                "%.1f s)", packed.name, source.name, report.mean_kld,
                100 * report.top1_agreement, report.ppl_ratio, report.n_chunks, seconds)
    return report


def unmeasured(reason: str) -> QualityReport:
    """The manifest's record that quality was not measured, and why."""
    return QualityReport(measured=False, reason=reason, text=CALIBRATION_FILE.name,
                         text_sha256=calibration_sha256())


def short_list(plan: PlanResult) -> list[str]:
    """The chosen preset and its neighbours in (table) quality among the presets that fit."""
    fits = {c.quant: c.kl_divergence for c in plan.candidates if c.fits}
    fits.setdefault(plan.chosen.quant, plan.chosen.kl_divergence)
    order = sorted(fits, key=lambda q: (fits[q], q))
    i = order.index(plan.chosen.quant)
    return order[max(0, i - 1):i + 2]


def _labelled(progress: StepProgress | None, label: str) -> StepProgress | None:
    if progress is None:
        return None
    report = progress

    def relabel(_what: str, done: int, total: int) -> None:
        report(label, done, total)

    return relabel


def measured_plan(
    source: Path, info: ModelInfo, profile: DeviceProfile, options: PlanOptions | None = None,
    *, n_chunks: int = DEFAULT_CHUNKS, n_threads: int | None = None,
    progress: StepProgress | None = None,
) -> tuple[PlanResult, dict[str, QualityReport]]:
    """`plan --measure`: quantize the short list (the table's choice and its neighbours, with
    an imatrix where pack would use one), measure each against the source, and plan again
    ranking them by what was measured. A quantized source cannot be measured: the table's
    plan comes back with a warning saying why."""
    import tempfile

    from edgerunner.pack.imatrix import IMATRIX_CHUNKS, compute_imatrix, wants_imatrix
    from edgerunner.pack.planner import PlanOptions, make_plan
    from edgerunner.pack.quantize import quantize

    options = options or PlanOptions()
    first = make_plan(info, profile, options)
    reason = cannot_measure(info.file_type)
    if reason is not None:
        first.warnings.append(f"--measure: {reason}")
        return first, {}
    quants = [options.quant.upper()] if options.quant else short_list(first)
    reports: dict[str, QualityReport] = {}
    imatrix = None
    with tempfile.TemporaryDirectory(prefix="er-measure-") as tmp:
        for quant in quants:
            if wants_imatrix(quant) and imatrix is None:
                imatrix = compute_imatrix(source, calibration_chunks(source, IMATRIX_CHUNKS),
                                          n_threads=n_threads, progress=progress)
            out = Path(tmp) / f"{quant}.gguf"
            quantize(source, out, quant, n_threads=n_threads, source_type=info.file_type,
                     imatrix=imatrix if wants_imatrix(quant) else None)
            reports[quant] = measure_quality(source, out, n_chunks=n_chunks, n_threads=n_threads,
                                             progress=_labelled(progress, f"measuring {quant}"))
            out.unlink()
    kld = {q: r.mean_kld for q, r in reports.items()}
    plan = make_plan(info, profile, options.model_copy(update={"measured_kld": kld}))
    plan.reasons.append(
        "quality measured on this model (mean KLD vs the source over the calibration text): "
        + ", ".join(f"{q} {kld[q]:.5f}" for q in sorted(kld, key=lambda q: kld[q])))
    return plan, reports
