"""Tool-calling families on their real chat templates (templates/README.md says where each came
from): detection, rendering with tools, and the render → parse round trip of a call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgerunner.runtime.engine.tools import families as F
from edgerunner.runtime.engine.tools.parse import StreamParser, parse
from edgerunner.runtime.tool_protocol import ParsedCall, Tool, ToolCallDelta

TEMPLATES = Path(__file__).parent / "templates"

TOOLS = [Tool.model_validate(t) for t in [
    {"type": "function", "function": {
        "name": "HassTurnOn", "description": "Turns on a device",
        "parameters": {"type": "object", "properties": {
            "name": {"type": "string"},
            "domain": {"type": "array", "items": {"type": "string", "enum": ["light", "switch"]}}},
            "required": ["name"]}}},
    {"type": "function", "function": {"name": "GetLiveContext",
                                      "description": "The current state of the home"}},
]]
CALL = ParsedCall("HassTurnOn", {"name": "kitchen \"main\" light", "domain": ["light"]},
                  "abcdefghi")

# fixture file -> (family, the template renders an assistant turn's tool_calls)
FIXTURES = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "Qwen-Qwen3-0.6B.jinja": "hermes",
    "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
    "llama-cpp-microsoft-Phi-4-mini-instruct.jinja": "phi4",
    "google-gemma-2-2b-it.jinja": "generic",
}


def _template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def _history(with_call: bool) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You control the home."},
        {"role": "user", "content": "Turn on the kitchen light"}]
    if with_call:
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": CALL.id, "type": "function",
             "function": {"name": CALL.name, "arguments": CALL.arguments}}]})
    return messages


@pytest.mark.parametrize("name", FIXTURES)
def test_detection_names_the_family(name: str) -> None:
    assert F.detect(_template(name)).name == FIXTURES[name]


def test_no_template_and_templates_without_tools_are_generic() -> None:
    assert F.detect(None) is F.GENERIC
    assert F.detect("{{ '<tool_call>' }}{% for m in messages %}{{ m.content }}{% endfor %}") \
        is F.GENERIC  # the marker without any use of `tools`


@pytest.mark.parametrize("name", FIXTURES)
def test_tools_reach_the_prompt(name: str) -> None:
    family = F.detect(_template(name))
    prompt = F.render(_template(name), _history(False), TOOLS, bos_token="<s>",
                      eos_token="</s>")
    for tool in TOOLS:
        assert tool.function.name in prompt
    assert '"enum"' in prompt  # the parameters' schema, not only the names
    assert "kitchen light" in prompt
    if family is F.GENERIC:
        assert F.GENERIC_INTRO in prompt


@pytest.mark.parametrize("name", FIXTURES)
def test_rendered_call_parses_back(name: str) -> None:
    """The assistant turn the template renders for a call, read by the family's parser, is
    that call (the template's own call syntax is what the model learned to write)."""
    template = _template(name)
    family = F.detect(template)
    before = F.render(template, _history(False), TOOLS, bos_token="<s>", eos_token="</s>")
    after = F.render(template, _history(True), TOOLS, bos_token="<s>", eos_token="</s>",
                     add_generation_prompt=False)
    if family is F.MISTRAL:  # Mistral lists the tools after the last user turn only
        assert after.count("[TOOL_CALLS]") == 1
        turn = after[after.index("[TOOL_CALLS]"):]
    else:
        assert after.startswith(before.rstrip()), (before[-200:], after[-300:])
        turn = after[len(before.rstrip()):]
    result = parse(family, turn)
    assert [(c.name, c.arguments) for c in result.calls] == [(CALL.name, CALL.arguments)]
    assert "HassTurnOn" not in result.content


def _model_output(family: F.Family) -> tuple[list[ParsedCall], str, str]:
    """(the calls, the content before them, the text) of an answer shaped as the model
    writes it: two calls where the format carries several, text first where it may."""
    calls = [CALL, ParsedCall("GetLiveContext", {}, "b")]
    if not family.parallel:
        calls = calls[:1]
    lead = "" if family.start is not None else "Sure, one moment. "
    return calls, lead, lead + family.format_calls(calls)


@pytest.mark.parametrize("family", [f for f in F.FAMILIES], ids=lambda f: f.name)
def test_model_shaped_output_round_trips_with_content_and_parallel_calls(
        family: F.Family) -> None:
    calls, lead, text = _model_output(family)
    result = parse(family, text)
    assert result.content == lead
    assert [(c.name, c.arguments) for c in result.calls] == [(c.name, c.arguments)
                                                             for c in calls]


@pytest.mark.parametrize("family", [f for f in F.FAMILIES], ids=lambda f: f.name)
def test_streaming_in_small_pieces_gives_what_openai_clients_assemble(
        family: F.Family) -> None:
    calls, lead, text = _model_output(family)
    for size in (1, 3, 7):
        parser = StreamParser(family)
        out: list[str | ToolCallDelta] = []
        for k in range(0, len(text), size):
            out += parser.feed(text[k:k + size])
        out += parser.finish()
        content = "".join(x for x in out if isinstance(x, str))
        assert content == lead
        assembled: dict[int, dict[str, str]] = {}
        for delta in (x for x in out if isinstance(x, ToolCallDelta)):
            if delta.id is not None:  # the first delta of a call: id and name, as OpenAI's
                assert delta.index not in assembled and delta.name is not None
                assembled[delta.index] = {"id": delta.id, "name": delta.name, "arguments": ""}
            assembled[delta.index]["arguments"] += delta.arguments
        assert [(a["name"], json.loads(a["arguments"])) for a in assembled.values()] == [
            (c.name, c.arguments) for c in calls]
        assert [a["id"] for a in assembled.values()] == [c.id for c in parser.result().calls]


@pytest.mark.parametrize("text", ["<tool_", "I use <tool", "{\"name", "  {\"na"])
def test_a_possible_trigger_is_held_back_then_released_as_text(text: str) -> None:
    family = F.HERMES if "tool" in text else F.LLAMA3
    parser = StreamParser(family)
    assert parser.feed(text) == ([text[:text.index("<")]] if "I use" in text else [])
    assert "".join(x for x in parser.finish() if isinstance(x, str)) == (
        text[text.index("<"):] if "I use" in text else text)
    assert parser.result().calls == []


@pytest.mark.parametrize(("family", "text", "calls"), [
    # Phi-4-mini's template writes calls between its own tags
    (F.PHI4, '<|tool_call|>{"name": "HassTurnOn", "arguments": {"name": "a"}}<|/tool_call|>',
     [("HassTurnOn", {"name": "a"})]),
    # the grammar allows whitespace before the bracket, so the parser must read it too
    (F.PHI4, 'functools [{"name": "GetLiveContext", "arguments": {}}]',
     [("GetLiveContext", {})]),
    (F.FUNCTIONGEMMA, "<start_function_call>call:set{level:<escape>a, b{c}<escape>,n:3,"
     "on:true,xs:[1,<escape>y<escape>],o:{k:<escape>v<escape>}}<end_function_call>",
     [("set", {"level": "a, b{c}", "n": 3, "on": True, "xs": [1, "y"], "o": {"k": "v"}})]),
    # a call's shape mid-answer is content for the formats that call only at the start
    (F.LLAMA3, 'Here is JSON: {"name": "x", "parameters": {}}', []),
], ids=["phi4-tags", "phi4-space", "functiongemma-values", "llama3-mid-answer"])
def test_answers_parse_to_their_calls(family: F.Family, text: str,
                                      calls: list[tuple[str, dict[str, Any]]]) -> None:
    result = parse(family, text)
    assert [(c.name, c.arguments) for c in result.calls] == calls
    if not calls:
        assert result.content == text


def test_generic_history_renders_calls_and_results_as_text() -> None:
    messages = [*_history(True), {"role": "tool", "tool_call_id": CALL.id,
                                  "name": CALL.name, "content": "on"}]
    prompt = F.render(_template("google-gemma-2-2b-it.jinja"), messages, TOOLS)
    assert F.GENERIC.format_calls([CALL]) in prompt
    assert '"tool_response"' in prompt and '"content": "on"' in prompt
