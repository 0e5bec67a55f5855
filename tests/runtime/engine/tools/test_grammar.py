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
from edgerunner.runtime.engine.tools.grammar import (
    ToolGrammar,
    add_to_chain,
    build,
    call_schema,
    hold_schema,
    lazy_patterns,
)
from edgerunner.runtime.engine.tools.parse import StreamParser
from edgerunner.runtime.protocol import RequestError, parse_request
from edgerunner.runtime.tool_protocol import ParsedCall, ToolCallDelta, ToolsOptions
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
    calls = check_calls(generate(engine, grammar, "Dim the lights", 4), {"HassMediaPause"})
    assert len(calls) == 1
    assert calls[0][1]["mode"] in ("soft", "hard")


@pytest.mark.slow
def test_auto_is_lazy_and_any_call_it_makes_is_held(engine: Engine) -> None:
    grammar = build(options(), F.GENERIC, engine.grammars)
    assert grammar is not None and grammar.lazy
    assert grammar.trigger_patterns == tuple(lazy_patterns(F.GENERIC))
    for seed in (6, 7):
        text = generate(engine, grammar, "Hello! How are you today?", seed, max_tokens=30)
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


def test_enum_arrays_are_capped_and_integer_ranges_become_enums() -> None:
    schema = call_schema(ToolsOptions.model_validate({"tools": TOOLS}).tools, "arguments")
    turn_on, light_set, _ = (alt["properties"]["arguments"] for alt in schema["anyOf"])
    assert turn_on["properties"]["domain"]["maxItems"] == 3  # HA's domain had no maxItems
    assert light_set["properties"]["brightness"] == {"enum": list(range(101))}
    held = hold_schema({"type": "object", "properties": {
        "few": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 1},
        "many": {"type": "array", "items": {"enum": ["a"]}, "minItems": 2},
        "wide": {"type": "integer", "minimum": 0, "maximum": 10_000},
        "open": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4},
        "any": {"description": "a domain or a list of them"},  # HA's GetLiveContext
        "description": {"type": "string"}}})  # a property named like a keyword
    props = held["properties"]
    assert props["any"]["type"] == ["string", "number", "boolean", "array", "object", "null"]
    assert props["description"] == {"type": "string"}
    assert props["few"]["maxItems"] == 1 and props["many"]["maxItems"] == 2
    assert props["wide"] == {"type": "integer", "minimum": 0, "maximum": 10_000}  # too many
    assert props["open"] == {"enum": [1, 2, 3]}


def test_refs_inside_parameters_point_into_the_combined_schema() -> None:
    tool = {"type": "function", "function": {"name": "Set", "parameters": {
        "type": "object", "$defs": {"level": {"type": "integer"}},
        "properties": {"level": {"$ref": "#/$defs/level"}}}}}
    schema = call_schema(ToolsOptions.model_validate({"tools": [*TOOLS, tool]}).tools,
                         "arguments")
    assert json.dumps(schema).count('"#/anyOf/3/properties/arguments/$defs/level"') == 1


# In a child: llama.cpp aborts the process when the text replayed at a trigger does not fit
# the grammar, so the runner must not be the process that finds out.
_REPLAY_CHILD = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
from llama_cpp._internals import LlamaModel

job = json.loads(sys.stdin.read())
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = LlamaModel(path_model=job["model"], params=params, verbose=False)
vocab = model.vocab
n = llama_cpp.llama_vocab_n_tokens(vocab)


def allowed(sampler):
    data = np.zeros(n, dtype=np.dtype([("id", np.intc), ("logit", np.single),
                                       ("p", np.single)], align=True))
    data["id"] = np.arange(n, dtype=np.intc)
    cands = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1,
        sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cands))
    ids = data["id"][: cands.size]
    return set(ids[np.isfinite(data["logit"][: cands.size])].tolist())


out = []
for case in job["cases"]:
    patterns = (ctypes.c_char_p * len(case["patterns"]))(
        *[p.encode() for p in case["patterns"]])
    sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab, case["gbnf"].encode(), b"root", patterns, len(case["patterns"]),
        (llama_cpp.llama_token * 0)(), 0)
    tokens = model.tokenize(case["text"].encode(), add_bos=False, special=False)
    held_from, accepted = None, 0
    for token in tokens:
        ok = allowed(sampler)
        if len(ok) < n and held_from is None:
            held_from = accepted
        if token not in ok:  # generation could not have sampled it: stop there
            break
        llama_cpp.llama_sampler_accept(sampler, token)
        accepted += 1
    out.append({"tokens": len(tokens), "accepted": accepted, "held_from": held_from,
                "held_at_end": len(allowed(sampler)) < n})
    llama_cpp.llama_sampler_free(sampler)
print(json.dumps(out))
"""


def test_lazy_triggers_replay_only_text_the_grammar_takes(engine: Engine,
                                                          default_model: Path) -> None:
    """Each family's lazy grammar on the real vocabulary, fed a model-shaped answer token by
    token (tokens that straddle the trigger included): free until the trigger, every token
    of the call accepted, held after it; and text that only looks like a trigger start
    neither aborts llama.cpp nor holds the answer."""
    import subprocess
    import sys

    from llama_cpp import llama_grammar

    assert llama_grammar.SPACE_RULE == '" "?'  # what the trigger patterns assume
    call = ParsedCall("HassLightSet", {"brightness": 40, "name": "desk"}, "x")
    cases, expect = [], []
    for family in F.FAMILIES:
        grammar = build(options(), family, engine.grammars)
        if grammar is None:
            continue
        lead = "" if family.start is not None else "Sure, one moment. "
        for text, is_call in [(lead + family.format_calls([call]), True),
                              (lead + "<tool_call]> { no", False),
                              ("{ [not a call] }", False),
                              (lead + family.format_calls([call])[:-3] + ">>> {", None)]:
            cases.append({"gbnf": grammar.gbnf, "patterns": list(grammar.trigger_patterns),
                          "text": text})
            expect.append((family.name, text, is_call))
    proc = subprocess.run([sys.executable, "-c", _REPLAY_CHILD], capture_output=True,
                          text=True, timeout=120,
                          input=json.dumps({"model": str(default_model), "cases": cases}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (family, text, is_call), got in zip(expect, json.loads(proc.stdout), strict=True):
        if is_call:
            assert got["accepted"] == got["tokens"], (family, text, got)
            assert got["held_from"] is not None and got["held_from"] > 0, (family, got)
            assert got["held_at_end"], (family, got)
        elif is_call is False:
            assert got["held_from"] is None and not got["held_at_end"], (family, text, got)


def test_the_default_models_template_is_generic_and_its_prefix_repeats(engine: Engine) -> None:
    """SmolLM2's own template has no tool syntax; the tools block sits in the system turn,
    identical every turn, so a follow-up turn starts with the first turn's prompt (the prefix
    cache's hit)."""
    template = engine._llm._model.metadata()["tokenizer.chat_template"]  # type: ignore[union-attr]
    assert F.detect(template) is F.GENERIC
    tools = options().tools
    first = [{"role": "user", "content": "Turn on the kitchen light"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "HassTurnOn", "arguments": {"name": "kitchen"}}}]}
    answer = {"role": "tool", "tool_call_id": "call_1", "name": "HassTurnOn",
              "content": '{"success": true}'}
    one = F.render(template, first, tools, add_generation_prompt=True)
    two = F.render(template, [*first, call, answer], tools)
    assert two.startswith(one.removesuffix("<|im_start|>assistant\n"))
    assert F.GENERIC.format_calls([ParsedCall("HassTurnOn", {"name": "kitchen"})]) in two
