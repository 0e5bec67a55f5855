"""Tool calling through the real daemon on its unix socket, driven by the unmodified `openai`
and `ollama` clients: calls whole and streamed (assembled by the clients' own code), every
tool_choice, a full round trip, Home Assistant's own tool definitions, and the 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests import ha_assist
from tests.runtime.conftest import RunningDaemon
from tests.runtime.engine.tools.test_grammar import SCHEMAS, TOOLS

USER = [{"role": "user", "content": "Dim the desk lamp to 30"}]
FAST: dict[str, Any] = {"max_tokens": 64, "temperature": 0.8, "seed": 5,
                        "parallel_tool_calls": False}  # one call: well within max_tokens


@pytest.fixture
def client(served: RunningDaemon) -> Iterator[openai.OpenAI]:
    transport = httpx.HTTPTransport(uds=str(served.socket))
    with httpx.Client(transport=transport, timeout=120) as http_client:
        yield openai.OpenAI(base_url="http://localhost/v1", api_key="unused",
                            http_client=http_client, max_retries=0)


@pytest.fixture
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def create(client: openai.OpenAI, model: str, **fields: Any) -> Any:
    body = {"model": model, "messages": USER, "tools": TOOLS, **FAST, **fields}
    return client.chat.completions.create(**body)


def held(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of each call, after checking it against its tool's schema."""
    out = []
    for call in calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"
        out.append((call.function.name, arguments))
    return out


def test_required_whole_and_streamed_give_the_same_calls(client: openai.OpenAI,
                                                         model: str) -> None:
    for _ in range(2):  # the second starts from the cached prompt, as the stream will
        whole = create(client, model, tool_choice="required", temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = held(choice.message.tool_calls)
    assert calls
    # the client's own stream helper assembles delta.tool_calls into the final message
    body = {"model": model, "messages": USER, "tools": TOOLS, **FAST, "temperature": 0,
            "tool_choice": "required"}
    with client.chat.completions.stream(**body) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert held(streamed.message.tool_calls) == calls  # greedy: the same calls


def test_a_named_function_is_the_call(client: openai.OpenAI, model: str) -> None:
    answer = create(client, model, parallel_tool_calls=False,
                    tool_choice={"type": "function", "function": {"name": "HassMediaPause"}})
    calls = held(answer.choices[0].message.tool_calls)
    assert [name for name, _ in calls] == ["HassMediaPause"]
    assert calls[0][1]["mode"] in ("soft", "hard")


def test_auto_answers_in_text_or_with_held_calls(client: openai.OpenAI, model: str) -> None:
    answer = create(client, model, messages=[{"role": "user", "content": "Hello! How are you?"}],
                    max_tokens=24)
    choice = answer.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason in ("tool_calls", "length")
        held(choice.message.tool_calls)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_none_answers_in_text(client: openai.OpenAI, model: str) -> None:
    answer = create(client, model, tool_choice="none", max_tokens=24,
                    messages=[{"role": "user", "content": 'Say "{"'}])
    choice = answer.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_round_trip_user_call_result_answer(client: openai.OpenAI, model: str) -> None:
    first = create(client, model, tool_choice="required", parallel_tool_calls=False)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*USER, message.model_dump(exclude_none=True),  # the client's own shapes back
               {"role": "tool", "tool_call_id": call.id, "content": '{"success": true}'}]
    # tool_choice none: the answer to the result is text (auto may call again)
    final = create(client, model, messages=history, tool_choice="none", max_tokens=24)
    assert final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result
    again = create(client, model, messages=history, max_tokens=48)  # auto: text or a call
    choice = again.choices[0]
    if choice.message.tool_calls:
        held(choice.message.tool_calls)
    else:
        assert choice.message.content


@pytest.mark.parametrize(("fields", "phrase"), [
    ({"tool_choice": {"type": "function", "function": {"name": "Nope"}}},
     "tool_choice names function 'Nope', which is not in tools"),
    ({"response_format": {"type": "json_object"}},
     "tools and response_format cannot be combined"),
    ({"tools": [*TOOLS, {"type": "function", "function": {"name": "Big", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "maxLength": 50_000}}}}}]},
     "tools[3].function.parameters.properties.x"),
])
def test_refusals_are_400s_that_say_what_to_change(client: openai.OpenAI, model: str,
                                                   fields: dict[str, Any],
                                                   phrase: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        create(client, model, **fields)
    assert info.value.status_code == 400
    assert phrase in info.value.message


# -- the Ollama API ---------------------------------------------------------------------------


@pytest.fixture
def uds(served: RunningDaemon) -> Iterator[ollama.Client]:
    made = served.ollama_client()
    yield made
    made.close()


def ha_tools() -> list[dict[str, Any]]:
    """Home Assistant's own tool definitions for a home whose exposed entities are lights."""
    return ha_assist.tools({"light"})


def test_ollama_client_with_home_assistants_tools(uds: ollama.Client,
                                                  served: RunningDaemon) -> None:
    name = served.daemon.manifest.name
    schemas = ha_assist.schemas(ha_tools())
    messages = [{"role": "user", "content": "Turn on the kitchen light"}]
    options = {"num_predict": 16, "temperature": 0}
    for _ in range(2):  # the second starts from the cached prompt, as the stream will
        whole = uds.chat(model=name, messages=messages, tools=ha_tools(), stream=False,
                         options=options)
    assert whole.done and whole.done_reason in ("stop", "length")
    pieces = list(uds.chat(model=name, messages=messages, tools=ha_tools(), stream=True,
                           options=options))
    assert pieces[-1].done
    streamed_calls = [c for p in pieces for c in p.message.tool_calls or []]
    # greedy: the same answer both ways, text or calls held to HA's schemas
    assert "".join(p.message.content or "" for p in pieces) == whole.message.content
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed_calls] == [
        (c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls or []]
    for call in streamed_calls:
        jsonschema.validate(dict(call.function.arguments), schemas[call.function.name])


def test_ollama_history_with_calls_and_tool_results(uds: ollama.Client,
                                                    served: RunningDaemon) -> None:
    name = served.daemon.manifest.name
    user = {"role": "user", "content": "Turn on the kitchen light"}
    history = [user,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}}]},
               {"role": "tool", "tool_name": "HassTurnOn", "content": '{"success": true}'}]
    options = {"num_predict": 4, "temperature": 0}
    first = uds.chat(model=name, messages=[user], tools=ha_tools(), options=options)
    after = uds.chat(model=name, messages=history, tools=ha_tools(), options=options)
    assert after.done
    assert after.prompt_eval_count > first.prompt_eval_count  # the call and its result


def _ollama_turn(user: str, name: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_name": name, "content": "ok"},
            {"role": "assistant", "content": "Done."}]


# three earlier turns that called tools: the small model then calls one itself under auto
# (Ollama has no tool_choice; a 135M model sometimes answers in prose or imitates a tool
# result instead, so the last request is tried with a few phrasings until one calls)
FEW_SHOT = [*_ollama_turn("Turn on the desk lamp", "HassTurnOn", {"name": "desk lamp"}),
            *_ollama_turn("Pause the TV", "HassMediaPause", {"mode": "soft"}),
            *_ollama_turn("Dim the hall light to 40", "HassLightSet",
                          {"name": "hall light", "brightness": 40})]
ASKS = ["Turn on the kitchen light", "Dim the kitchen light to 20", "Turn on the desk lamp"]


def test_ollama_call_whole_and_streamed(uds: ollama.Client, served: RunningDaemon) -> None:
    name = served.daemon.manifest.name
    options = {"num_predict": 48, "temperature": 0}
    for ask in ASKS:
        messages = [*FEW_SHOT, {"role": "user", "content": ask}]
        for _ in range(2):  # the second starts from the cached prompt, as the stream will
            whole = uds.chat(model=name, messages=messages, tools=TOOLS, stream=False,
                             options=options)
        if whole.message.tool_calls:
            break
    assert whole.done_reason == "stop" and whole.message.content == ""
    calls = [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls]
    assert calls
    for call_name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[call_name])
    pieces = list(uds.chat(model=name, messages=messages, tools=TOOLS, stream=True,
                           options=options))
    with_calls = [p for p in pieces if p.message.tool_calls]
    # each call arrives whole, arguments as an object, in a piece of its own before the end
    assert [len(p.message.tool_calls or []) for p in with_calls] == [1] * len(calls)
    assert all(not p.done for p in with_calls) and pieces[-1].done
    assert [(c.function.name, dict(c.function.arguments))
            for p in with_calls for c in p.message.tool_calls or []] == calls


def test_ollama_streams_each_call_whole_in_its_own_line() -> None:
    """The NDJSON line a finished call becomes, read by the ollama client's own model."""
    from edgerunner.runtime.http import ollama as ollama_api
    from edgerunner.runtime.protocol import ToolCallEvent, ToolDeltaEvent
    from edgerunner.runtime.tool_protocol import ParsedCall, ToolCallDelta

    render = ollama_api._ndjson_renderer("chat", "m", lambda event, text: {})
    assert render(ToolDeltaEvent(ToolCallDelta(0, "call_x", "HassTurnOn"))) == ""
    line = render(ToolCallEvent(ParsedCall("HassTurnOn", {"name": "kitchen"}, "call_x"), 0))
    piece = ollama.ChatResponse.model_validate(json.loads(line))
    assert not piece.done and piece.message.content == ""
    (call,) = piece.message.tool_calls or []
    assert call.function.name == "HassTurnOn" and call.function.arguments == {"name": "kitchen"}
