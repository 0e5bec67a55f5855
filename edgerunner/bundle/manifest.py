"""The bundle's manifest.json: what was packed, for which device, and what it should cost."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgerunner.profiles import DeviceProfile

SCHEMA_VERSION = 1

KVType = Literal["f16", "q8_0"]
MAX_PARALLEL = 16
PREFIX_CACHE_ENTRIES = 4  # prompts the shared-prefix cache keeps at most (LRU)
# The bundle's signature (`pack --sign`): beside manifest.json, never listed in it.
SIGNATURE_FILE = "manifest.sig"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemoryEstimate(_Model):
    """Predicted peak RSS of a serving process, in MiB, by part."""

    weights_mb: float = Field(0.0, ge=0, description="Quantized tensors as loaded")
    kv_mb: float = Field(0.0, ge=0, description="KV cache for n_ctx cells")
    compute_mb: float = Field(0.0, ge=0, description="llama.cpp's reserved compute graph buffer")
    logits_mb: float = Field(0.0, ge=0, description="Output buffers + llama-cpp-python's scores")
    overhead_mb: float = Field(0.0, ge=0, description="Python, libraries, tokenizer, runtime")

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.kv_mb + self.compute_mb + self.logits_mb + self.overhead_mb


class RuntimePlan(_Model):
    """How the daemon must configure llama.cpp for this bundle."""

    quant: str = Field("Q4_K_M", description="Quantization preset, e.g. Q4_K_M")
    n_ctx: int = Field(2048, ge=16, description="Context window in tokens")
    kv_type: KVType = Field("f16", description="KV cache element type (q8_0 needs flash_attn)")
    flash_attn: bool = Field(False, description="Use flash attention")
    swa_full: bool = Field(True, description="Full-size cache for sliding-window layers")
    n_threads: int = Field(4, ge=1, le=256, description="Decode threads")
    n_batch: int = Field(512, ge=1, description="Logical batch for prompt processing")
    n_ubatch: int = Field(512, ge=1, description="Physical batch")
    mmap: bool = Field(True, description="Memory-map the weights")
    mlock: bool = Field(False, description="Lock weights in RAM")
    n_parallel: int = Field(1, ge=1, le=MAX_PARALLEL,
                            description="Requests decoded together in one batch (continuous "
                            "batching); they share the n_ctx KV cells")
    prefix_cache_cells: int = Field(0, ge=0, description="KV cells the shared-prefix cache may "
                                    "hold for recent prompts (part of n_ctx; 0: no cache)")

    @property
    def n_seq_max(self) -> int:
        """Sequences the llama.cpp context is created for: one per parallel slot, plus the
        prefix cache's own (each cached prompt is a sequence whose cells others copy)."""
        return self.n_parallel + (PREFIX_CACHE_ENTRIES if self.prefix_cache_cells else 0)


class Prediction(_Model):
    """What the plan predicts for this device."""

    memory: MemoryEstimate = Field(default_factory=MemoryEstimate)
    decode_tps: float = Field(0.0, ge=0, description="Predicted decode tokens/s (one stream)")
    stream_tps: float = Field(0.0, ge=0, description="Predicted tokens/s of each stream when "
                              "n_parallel decode together")
    aggregate_tps: float = Field(0.0, ge=0, description="Predicted tokens/s summed over "
                                 "n_parallel streams")
    file_size: int = Field(0, ge=0, description="Predicted model.gguf size in bytes")
    cpu: str = Field("", description="The repack ISA memory is predicted for: the profile CPU's "
                     "features that decide which weights llama.cpp repacks (\"neon+dotprod\", "
                     "\"avx2\", \"none\"); empty in bundles packed before it was recorded")
    weights_mb_by_cpu: dict[str, float] = Field(
        default_factory=dict, description="Resident weights (MiB, the plan's mmap) on each repack "
        "ISA: a CPU other than the profile's repacks other tensors, and the daemon predicts "
        "for the CPU that serves")


class QualityReport(_Model):
    """The packed model measured against its source on the calibration text (pack.quality)."""

    measured: bool = Field(False, description="False: not measured (see reason)")
    reason: str = Field("", description="Why it was not measured")
    mean_kld: float = Field(0.0, ge=0, description="Mean KL divergence vs the source, nats")
    top1_agreement: float = Field(0.0, ge=0, le=1, description="Share of positions where both "
                                  "models' most likely next token agree")
    ppl_ratio: float = Field(0.0, ge=0, description="Perplexity of the packed model over the "
                             "source's on the calibration text")
    ppl: float = Field(0.0, ge=0, description="Perplexity of the packed model")
    ppl_source: float = Field(0.0, ge=0, description="Perplexity of the source")
    n_chunks: int = Field(0, ge=0, description="Chunks evaluated")
    chunk_tokens: int = Field(0, ge=0, description="Tokens per chunk (its second half scored)")
    n_scored: int = Field(0, ge=0, description="Token positions scored")
    text: str = Field("", description="Calibration text file")
    text_sha256: str = Field("", description="sha256 of the calibration text")
    seconds: float = Field(0.0, ge=0, description="Time the measurement took")


class ImatrixRecord(_Model):
    """Whether llama.cpp's quantizer was given an importance matrix, and which."""

    used: Literal["none", "computed", "file"] = Field(
        "none", description="computed from the calibration text, a user's file, or none")
    reason: str = Field("", description="Why none was used")
    path: str = Field("", description="The user's imatrix file (used=file)")
    sha256: str = Field("", description="sha256 of the user's file, or of the calibration text")
    entries: int = Field(0, ge=0, description="Weight matrices it covers")
    n_chunks: int = Field(0, ge=0, description="Calibration chunks it was computed over")
    seconds: float = Field(0.0, ge=0, description="Time computing it took")


class SourceModel(_Model):
    name: str = Field(..., description="Model name from the GGUF header")
    path: str = Field("", description="Where it was packed from")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    architecture: str = Field(..., description="general.architecture")
    file_type: str = Field(..., description="Source precision, e.g. F16")
    n_params: int = Field(0, ge=0)
    n_ctx_train: int = Field(0, ge=0)
    n_vocab: int = Field(0, ge=0)


class FileEntry(_Model):
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    size: int = Field(..., ge=0)


class SmokePrompt(_Model):
    """One prompt `install` sends a freshly started bundle before it commits the update."""

    name: str = Field(..., description="Short name used in reports")
    prompt: str = Field(..., description="User message")
    max_tokens: int = Field(32, ge=1, le=4096, description="Tokens the answer may use")
    json_schema: dict[str, Any] | None = Field(
        None, description="Ask with response_format json_schema; the answer must parse as JSON "
        "and validate against it")
    max_seconds: float = Field(60.0, gt=0, description="The answer must arrive within this many "
                               "seconds (from the plan's predicted speed, generous margin)")


class BundleManifest(_Model):
    """manifest.json. Every file of the bundle except this one is listed with its hash."""

    schema_version: int = Field(SCHEMA_VERSION, description="Manifest schema version")
    name: str = Field(..., description="Bundle directory name: <model>-<profile>-<quant>")
    created: str = Field("", description="ISO-8601 creation time (UTC)")
    edgerunner_version: str
    llama_cpp_python_version: str
    source: SourceModel
    profile: DeviceProfile
    plan: RuntimePlan
    prediction: Prediction
    files: dict[str, FileEntry] = Field(default_factory=dict)
    smoke: list[SmokePrompt] = Field(default_factory=list,
                                     description="Prompts that prove an installed bundle answers")
    quality: QualityReport | None = Field(None, description="Measured against the source")
    imatrix: ImatrixRecord | None = Field(None, description="Importance matrix used, if any")
