"""Home Assistant's own Assist request (tests/ha_assist.py) against the tool machinery: its
tools pass the protocol's checks, every schema is valid JSON Schema, the combined call grammar
builds within the engine's bounds and llama.cpp takes it, and the rendered prompt carries
every tool and entity."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from edgerunner.runtime.engine.grammar import GrammarBuilder
from edgerunner.runtime.engine.tools import families as F
from edgerunner.runtime.engine.tools.grammar import build
from edgerunner.runtime.tool_protocol import ToolsOptions
from tests import ha_assist as HA
from tests.runtime.engine.tools.test_families import TEMPLATES


@pytest.mark.parametrize("n", [0, 10, 25, 50])
def test_the_request_is_well_formed_at_every_size(n: int) -> None:
    body = HA.request(n)
    options = ToolsOptions.model_validate({"tools": body["tools"], "tool_choice": "required"})
    options.check()
    names = [t["function"]["name"] for t in body["tools"]]
    assert len(names) == len(set(names))
    for tool in body["tools"]:
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
    # no entities: no live context and no domain-bound intents, as HA does
    assert ("GetLiveContext" in names) == (n > 0)
    assert ("HassLightSet" in names) == ("light" in HA.exposed_domains(n))
    prompt = body["messages"][0]["content"]
    assert all(e["names"] in prompt for e in HA.entities(n))
    ollama = HA.ollama_request(n, history=HA.round_trips(max(n, 1)))
    assert all(isinstance(c["function"]["arguments"], dict)
               for m in ollama["messages"] for c in m.get("tool_calls") or ())
    # the ollama client HA sends through keeps no bounds: /api/chat sees HassLightSet's
    # brightness as a bare integer
    wire = json.dumps(ollama["tools"])
    assert [t["function"]["name"] for t in ollama["tools"]] == names
    assert "minimum" not in wire and "maximum" not in wire and "anyOf" not in wire


def test_the_tools_grammar_builds_within_the_bounds(default_model: Path) -> None:
    from llama_cpp import llama_cpp

    from edgerunner.runtime.engine.tools.grammar import lazy_patterns

    builder = GrammarBuilder(default_model)
    tools = HA.request(50)["tools"]
    required = build(ToolsOptions.model_validate({"tools": tools, "tool_choice": "required"}),
                     F.GENERIC, builder)
    auto = build(ToolsOptions.model_validate({"tools": tools}), F.GENERIC, builder)
    assert required is not None and not required.lazy
    assert auto is not None and auto.lazy
    assert auto.trigger_patterns == tuple(lazy_patterns(F.GENERIC))
    # every enum value of HA's schemas is in the grammar, as a JSON string
    for schema in HA.schemas(tools).values():
        for prop in schema["properties"].values():
            for value in (prop.get("items") or prop).get("enum", []):
                assert f'\\"{value}\\"' in required.gbnf, value
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(default_model).encode(), params)
    try:
        sampler = llama_cpp.llama_sampler_init_grammar(
            llama_cpp.llama_model_get_vocab(model), required.gbnf.encode(), b"root")
        assert sampler
        llama_cpp.llama_sampler_free(sampler)
    finally:
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("fixture", sorted(p.name for p in TEMPLATES.glob("*.jinja")))
def test_every_family_renders_the_whole_request(fixture: str) -> None:
    template = (TEMPLATES / fixture).read_text()
    body = HA.request(25, history=HA.round_trips(25))
    tools = ToolsOptions.model_validate({"tools": body["tools"]}).tools
    messages = []
    for m in body["messages"]:
        if m.get("tool_calls"):  # templates read the arguments as an object
            m = {**m, "tool_calls": [
                {**c, "function": {**c["function"],
                                   "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]}
        messages.append(m)
    prompt = F.render(template, messages, tools)
    for tool in body["tools"]:
        assert tool["function"]["name"] in prompt
    assert "Kitchen Ceiling" in prompt and "Live Context" in prompt
