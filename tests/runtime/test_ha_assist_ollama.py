"""Home Assistant's own Assist turn through /api/chat, byte for byte as its Ollama integration
sends it (tests/ha_assist.py: the system prompt with the exposed entities, the intent tools as
the `ollama` client serializes them, tool results with neither a name nor an id), on the real
daemon: accepted, streamed as Ollama streams, and any call held to HA's schemas."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests import ha_assist as HA
from tests.runtime.conftest import RunningDaemon

ENTITIES = 1  # one light: 6 tools, a prompt the suite can afford (25 entities: 3.6k tokens)


@pytest.mark.slow
def test_home_assistants_turn_after_two_tool_round_trips(served: RunningDaemon) -> None:
    name = served.daemon.manifest.name
    body = HA.ollama_request(ENTITIES, model=name, history=HA.round_trips(ENTITIES))
    body["options"] = {**body["options"], "num_predict": 24, "temperature": 0}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(served.socket)),
                      base_url="http://edgerunner", timeout=300) as http:
        n_ctx = http.post("/api/show", json={"model": name}).json()[
            "model_info"]["edgerunner.n_ctx"]
        body["options"]["num_ctx"] = min(HA.OLLAMA_NUM_CTX, n_ctx)
        with http.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200, response.read()
            lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] and lines[-1]["done_reason"] in ("stop", "length")
    assert lines[-1]["prompt_eval_count"] > 800  # the instructions, entities, tools, history
    schemas = HA.schemas(HA.tools(HA.exposed_domains(ENTITIES)))
    for line in lines:
        for call in line["message"].get("tool_calls") or ():
            jsonschema.validate(call["function"]["arguments"],
                                schemas[call["function"]["name"]])
