"""runtime.tool_protocol: the tool fields as OpenAI and Ollama clients send them, and the 400s
(kept beside the engine's tool tests; the module itself sits by runtime/protocol.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edgerunner.runtime.protocol import ChatMessage, RequestError, parse_request
from edgerunner.runtime.tool_protocol import (
    ParsedCall,
    ToolCallDelta,
    ToolsOptions,
)

TOOL = {"type": "function", "function": {"name": "HassTurnOn", "parameters": {
    "type": "object", "properties": {"name": {"type": "string"}}}}}


def test_openai_history_with_calls_and_results() -> None:
    call = ChatMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "HassTurnOn", "arguments": '{"name": "kitchen"}'}}]})
    result = ChatMessage.model_validate(
        {"role": "tool", "tool_call_id": "call_1", "content": "done"})
    assert call.template_dict()["tool_calls"][0]["function"]["arguments"] == {"name": "kitchen"}
    assert call.text() == ""
    assert result.template_dict() == {"role": "tool", "content": "done",
                                      "tool_call_id": "call_1"}


def test_ollama_history_with_object_arguments_and_tool_name() -> None:
    call = ChatMessage.model_validate(
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"index": 0, "name": "HassTurnOn", "arguments": {"name": "k"}}}]})
    result = ChatMessage.model_validate(
        {"role": "tool", "tool_name": "HassTurnOn", "content": "done"})
    assert call.template_dict()["tool_calls"][0]["function"]["arguments"] == {"name": "k"}
    assert result.template_dict()["name"] == "HassTurnOn"


@pytest.mark.parametrize("message", [
    {"role": "user", "content": None},
    {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
])
def test_malformed_messages_are_refused(message: dict) -> None:
    with pytest.raises(ValidationError):
        ChatMessage.model_validate(message)


def test_arguments_that_are_not_an_object_say_so() -> None:
    message = ChatMessage.model_validate(
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1"}}]})
    with pytest.raises(RequestError, match="not valid JSON"):
        message.template_dict()


def test_tool_choice_forms() -> None:
    assert ToolsOptions.model_validate({"tools": [TOOL]}).active
    assert not ToolsOptions.model_validate({"tools": [TOOL], "tool_choice": "none"}).active
    assert not ToolsOptions.model_validate({"tools": [TOOL]}).forced
    assert ToolsOptions.model_validate({"tools": [TOOL], "tool_choice": "required"}).forced
    named = ToolsOptions.model_validate(
        {"tools": [TOOL, {"type": "function", "function": {"name": "Other"}}],
         "tool_choice": {"type": "function", "function": {"name": "Other"}}})
    named.check()
    assert named.forced and [t.function.name for t in named.offered()] == ["Other"]
    with pytest.raises(ValidationError):
        ToolsOptions.model_validate({"tools": [TOOL], "tool_choice": "sometimes"})
    with pytest.raises(ValidationError):
        ToolsOptions.model_validate({"tools": [{"type": "function",
                                                "function": {"name": "has space"}}]})


@pytest.mark.parametrize(("body", "phrase"), [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "X"}}},
     "not in tools (declared: HassTurnOn)"),
    ({"tools": [TOOL, TOOL]}, "declared twice"),
    ({"tool_choice": "required"}, "at least one entry in tools"),
])
def test_refusals_name_the_fix(body: dict, phrase: str) -> None:
    with pytest.raises(RequestError) as info:
        ToolsOptions.model_validate(body).check()
    assert info.value.http_status == 400
    assert phrase in info.value.message


def test_wire_shapes() -> None:
    call = ParsedCall("HassTurnOn", {"name": "kitchen"}, "call_x")
    assert call.openai() == {"id": "call_x", "type": "function", "function": {
        "name": "HassTurnOn", "arguments": json.dumps({"name": "kitchen"})}}
    assert call.ollama(1) == {"id": "call_x", "function": {
        "index": 1, "name": "HassTurnOn", "arguments": {"name": "kitchen"}}}
    assert ToolCallDelta(0, "call_x", "HassTurnOn").openai() == {
        "index": 0, "id": "call_x", "type": "function",
        "function": {"name": "HassTurnOn", "arguments": ""}}
    assert ToolCallDelta(0, arguments='{"na').openai() == {
        "index": 0, "function": {"arguments": '{"na'}}


def test_the_chat_request_carries_the_tool_fields() -> None:
    request = parse_request("chat", {
        "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
        "tool_choice": "required", "parallel_tool_calls": False})
    options = request.tools_options()  # type: ignore[union-attr]
    assert options.forced and not options.parallel_tool_calls
    assert request.uses_tools  # type: ignore[union-attr]
    plain = parse_request("chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert not plain.uses_tools  # type: ignore[union-attr]
    assert plain.tools_options().tool_choice == "auto"  # type: ignore[union-attr]
    with pytest.raises(RequestError, match="tool_choice"):
        parse_request("chat", {"messages": [{"role": "user", "content": "hi"}],
                               "tool_choice": "sometimes"})
