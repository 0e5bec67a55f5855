"""How one request samples its tokens: the parameters the sampler chain is built from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgerunner.runtime.protocol import AnyRequest


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling parameters, as `batch.sampler_chain` reads them."""

    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 40  # 0 = off
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # 1 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None = a fresh random seed per request

    @classmethod
    def of(cls, request: AnyRequest) -> SamplingParams:
        """The validated request's sampling fields."""
        return cls(
            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, repeat_penalty=request.repeat_penalty,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty, seed=request.seed,
        )

    def as_kwargs(self) -> dict[str, Any]:
        """As keyword arguments of llama-cpp-python's `Llama.create_completion`."""
        return asdict(self)
