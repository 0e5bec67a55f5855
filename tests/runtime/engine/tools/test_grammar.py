"""The schema-held tool grammar on the real default model (SmolLM2-135M: no tool syntax in its
template, so the generic format): built through the engine's bounded child, added to a real
sampler chain with the integration hook, generated in the batch engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from llama_cpp._internals import LlamaSampler

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.engine.tools import families as F
from edgerunner.runtime.engine.tools.grammar import ToolGrammar, add_to_chain, build, call_schema
from edgerunner.runtime.engine.tools.parse import StreamParser
from edgerunner.runtime.protocol import RequestError, parse_request
from edgerunner.runtime.tool_protocol import ToolCallDelta, ToolsOptions
from tests.runtime.conftest import loaded_engine

PLAN = RuntimePlan(quant="Q4_1", n_ctx=2048, kv_type="q8_0", flash_attn=True, n_threads=1,
                   n_batch=256, n_ubatch=256)

# Home Assistant's intent tools, shaped as its Ollama integration sends them
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "HassTurnOn", "description": "Turns on/opens a device or entity",
        "parameters": {"type": "object", "properties": {
            "name": {"type": "string"},
            "area": {"type": "string"},
            "domain": {"type": "array", "items": {"type": "string",
                                                  "enum": ["light", "switch", "fan"]}}},
            "required": []}}},
    {"type": "function", "function": {
        "name": "HassLightSet", "description": "Sets the brightness of a light",
        "parameters": {"type": "object", "properties": {
            "name": {"type": "string"},
            "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["brightness"]}}},
    {"type": "function", "function": {
        "name": "HassMediaPause", "description": "Pauses a media player",
        "parameters": {"type": "object", "properties": {
            "mode": {"type": "string", "enum": ["soft", "hard"]}},
            "required": ["mode"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[Engine]:
    with loaded_engine(default_model, PLAN) as eng:
        yield eng


def options(**extra: Any) -> ToolsOptions:
    return ToolsOptions.model_validate({"tools": TOOLS, **extra})


def generate(engine: Engine, grammar: ToolGrammar, user: str, seed: int,
             max_tokens: int = 160) -> str:
    """The answer to `user` with the tools offered the generic way, sampled under `grammar`."""
    messages = F.generic_messages(F.GENERIC, [{"role": "user", "content": user}],
                                  options().tools)
    prepared = engine.prepare(parse_request("chat", {"messages": messages}), max_tokens)
    model = engine._llm._model  # type: ignore[union-attr]
    chain = LlamaSampler()
    add_to_chain(chain, model, grammar)
    chain.add_top_k(40)
    chain.add_top_p(0.95, 1)
    chain.add_temp(0.8)
    chain.add_dist(seed)
    pieces: list[str] = []
    generation = engine.batcher.add(prepared.prompt_tokens, max_tokens, chain, prepared.stop,
                                    pieces.append)
    try:
        while not generation.done:
            engine.step()
    finally:
        engine.end(generation)
    return "".join(pieces)


def check_calls(text: str, allowed: set[str]) -> list[tuple[str, dict[str, Any]]]:
    parser = StreamParser(F.GENERIC)
    deltas = parser.feed(text) + parser.finish()
    result = parser.result()
    assert result.calls, text
    for call in result.calls:
        assert call.name in allowed, text
        jsonschema.validate(call.arguments, SCHEMAS[call.name])
    streamed = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert [d.name for d in streamed if d.name] == [c.name for c in result.calls]
    return [(c.name, c.arguments) for c in result.calls]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_calls_always_parse_and_validate(engine: Engine, seed: int) -> None:
    grammar = build(options(tool_choice="required"), F.GENERIC, engine.grammars)
    assert grammar is not None and not grammar.lazy
    text = generate(engine, grammar, "Turn on the kitchen light and pause the TV", seed)
    assert text.lstrip().startswith("{")
    check_calls(text, set(SCHEMAS))


@pytest.mark.slow
def test_a_named_function_is_the_only_call(engine: Engine) -> None:
    grammar = build(options(tool_choice={"type": "function",
                                         "function": {"name": "HassMediaPause"}},
                            parallel_tool_calls=False), F.GENERIC, engine.grammars)
    assert grammar is not None
    for seed in (4, 5):
        calls = check_calls(generate(engine, grammar, "Dim the lights", seed),
                            {"HassMediaPause"})
        assert len(calls) == 1
        assert calls[0][1]["mode"] in ("soft", "hard")


@pytest.mark.slow
def test_auto_is_lazy_and_any_call_it_makes_is_held(engine: Engine) -> None:
    grammar = build(options(), F.GENERIC, engine.grammars)
    assert grammar is not None and grammar.lazy
    assert grammar.trigger_patterns == tuple(F.GENERIC.lazy_patterns())
    for seed in (6, 7):
        text = generate(engine, grammar, "Hello! How are you today?", seed, max_tokens=60)
        parser = StreamParser(F.GENERIC)
        parser.feed(text)
        parser.finish()
        result = parser.result()
        # no trigger, no grammar: the greeting is answered in free text
        assert result.content.strip() and not result.content.lstrip().startswith("{"), text
        for call in result.calls:
            jsonschema.validate(call.arguments, SCHEMAS[call.name])


def test_every_family_wraps_a_grammar_llama_cpp_builds(engine: Engine) -> None:
    from llama_cpp import llama_cpp

    vocab = engine._llm._model.vocab  # type: ignore[union-attr]
    for family in F.FAMILIES:
        grammar = build(options(tool_choice="required"), family, engine.grammars)
        if family.gbnf_one is None:
            assert grammar is None  # FunctionGemma's syntax is not JSON: parsed, not held
            continue
        assert grammar is not None
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.gbnf.encode(), b"root")
        assert sampler, (family.name, grammar.gbnf[:300])
        llama_cpp.llama_sampler_free(sampler)


def test_refusals_say_what_to_change(engine: Engine) -> None:
    with pytest.raises(RequestError, match="not in tools"):
        options(tool_choice={"type": "function", "function": {"name": "Nope"}}).check()
    with pytest.raises(RequestError, match="response_format"):
        options().check(response_format=True)
    options(tool_choice="none").check(response_format=True)  # no call possible: allowed
    bomb = {"type": "function", "function": {"name": "Big", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "maxLength": 50_000}}}}}
    with pytest.raises(RequestError) as info:
        build(ToolsOptions.model_validate({"tools": [*TOOLS, bomb]}), F.GENERIC,
              engine.grammars)
    assert info.value.http_status == 400
    assert "tools[3].function.parameters.properties.x" in info.value.message
    assert "maxLength 50000" in info.value.message


def test_refs_inside_parameters_point_into_the_combined_schema() -> None:
    tool = {"type": "function", "function": {"name": "Set", "parameters": {
        "type": "object", "$defs": {"level": {"type": "integer"}},
        "properties": {"level": {"$ref": "#/$defs/level"}}}}}
    schema = call_schema(ToolsOptions.model_validate({"tools": [*TOOLS, tool]}).tools,
                         "arguments")
    assert json.dumps(schema).count('"#/anyOf/3/properties/arguments/$defs/level"') == 1
