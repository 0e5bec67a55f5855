"""The smoke prompts `pack` writes into a bundle: what `install` asks before it commits.

Two prompts: a short free answer (the model loads and speaks) and a JSON answer constrained by a
schema (the grammar path an IoT app relies on works). Each must answer within a bound derived
from the plan's predicted decode speed, with a wide margin: a first request also pays for the
grammar build and a cold page cache, and the device may be busy.
"""

from __future__ import annotations

from edgerunner.bundle.manifest import Prediction, SmokePrompt

LATENCY_BASE_S = 60.0  # a first JSON request also builds its grammar in a child process
LATENCY_FACTOR = 10.0  # x the predicted time of the answer's tokens
MIN_TPS = 1.0

STATUS_SCHEMA = {
    "type": "object",
    "properties": {"device": {"type": "string"}, "ok": {"type": "boolean"}},
    "required": ["device", "ok"],
    "additionalProperties": False,
}


def latency_bound(max_tokens: int, prediction: Prediction) -> float:
    """Seconds an answer of max_tokens may take: base + LATENCY_FACTOR x predicted."""
    tps = max(prediction.decode_tps, MIN_TPS)
    return round(LATENCY_BASE_S + LATENCY_FACTOR * max_tokens / tps, 1)


def default_smoke(prediction: Prediction) -> list[SmokePrompt]:
    """The prompts every packed bundle carries."""
    return [
        SmokePrompt(name="greeting", prompt="Say hello in one short sentence.", max_tokens=24,
                    max_seconds=latency_bound(24, prediction)),
        SmokePrompt(name="json-status",
                    prompt="Report the status of the device pump-1 as JSON: its name in "
                    "\"device\" and whether it works in \"ok\".",
                    max_tokens=64, json_schema=STATUS_SCHEMA,
                    max_seconds=latency_bound(64, prediction)),
    ]
