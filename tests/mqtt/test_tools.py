"""Tool calling over MQTT (the /v1/chat/completions body), against a real Mosquitto and the real
model in process: a whole reply carries message.tool_calls, a stream carries delta.tool_calls
chunks that assemble to the same call, each chunk within the broker's packet size."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.runtime.engine.tools.test_grammar import SCHEMAS, TOOLS

pytestmark = pytest.mark.mqtt

CALL = {"messages": [{"role": "user", "content": "Dim the desk lamp to 30"}], "tools": TOOLS,
        "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 64,
        "temperature": 0}


def assemble(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls from delta.tool_calls chunks, accumulated as the openai client does."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in delta:
                call["id"] = delta["id"]
            call["name"] += delta["function"].get("name", "")
            call["arguments"] += delta["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def test_whole_and_streamed_replies_carry_the_same_calls(broker, serve, probe) -> None:
    serve(broker.url, stream_interval_s=0)  # a chunk per token: the call in many deltas
    p = probe(broker.url, "edgerunner/reply/tools/#")
    for _ in range(2):  # the second starts from the cached prompt, as the stream will
        p.publish("edgerunner/dev1/request", json.dumps(CALL),
                  response_topic="edgerunner/reply/tools/whole", correlation=b"w")
        whole = p.json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls and all(c["id"].startswith("call_") for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            SCHEMAS[call["function"]["name"]])

    p.publish("edgerunner/dev1/request", json.dumps({**CALL, "stream": True}),
              response_topic="edgerunner/reply/tools/stream", correlation=b"s")
    messages = [p.next()]
    while json.loads(messages[-1].payload)["choices"][0]["finish_reason"] is None:
        messages.append(p.next())
    chunks = [json.loads(m.payload) for m in messages]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert sum("tool_calls" in c["choices"][0]["delta"] for c in chunks) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    streamed = assemble(chunks)
    # greedy: the same calls (their ids are new per answer)
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert all(c["id"] and c["id"].startswith("call_") for c in streamed)


def test_tool_errors_are_the_http_error_bodies(broker, serve, probe) -> None:
    serve(broker.url)
    p = probe(broker.url, "edgerunner/reply/bad")
    named = {**CALL, "tool_choice": {"type": "function", "function": {"name": "Nope"}}}
    p.publish("edgerunner/dev1/request", json.dumps(named),
              response_topic="edgerunner/reply/bad", correlation=b"n")
    error = p.json()["error"]
    assert error["code"] == "invalid_request"
    assert "not in tools" in error["message"] and "HassTurnOn" in error["message"]


def test_a_call_too_long_for_one_packet_is_split_into_argument_fragments() -> None:
    """The reply stream's packet budget applied to a call's arguments (a broker whose
    max_packet_size is below the request itself cannot carry the request, so the splitting
    is driven here with the publisher recording what it is handed)."""
    from edgerunner.runtime.mqtt.reply import Replier, ReplyRoute, ReplyStream
    from edgerunner.runtime.protocol import DoneEvent, ToolDeltaEvent, Usage
    from edgerunner.runtime.tool_protocol import ParsedCall, ToolCallDelta

    sent: list[bytes] = []
    replier = Replier(lambda topic, payload, props, final: sent.append(payload),
                      lambda: 640, 1 << 20)
    route = ReplyRoute("edgerunner/reply/x", v5=True, correlation=b"c")
    stream = ReplyStream(replier, route, model="m", stream=True, interval=10)
    arguments = json.dumps({"name": "a very long name " * 30})
    stream(ToolDeltaEvent(ToolCallDelta(0, "call_x", "HassTurnOn")))  # the first goes at once
    stream(ToolDeltaEvent(ToolCallDelta(0, arguments=arguments[:10])))
    stream(ToolDeltaEvent(ToolCallDelta(0, arguments=arguments[10:])))
    stream(DoneEvent("", "tool_calls", Usage(), (ParsedCall("HassTurnOn", {}, "call_x"),)))
    assert len(sent) > 3 and all(len(p) <= replier.budget(route) for p in sent)
    chunks = [json.loads(p) for p in sent]
    (call,) = assemble(chunks)
    assert call["id"] == "call_x" and call["name"] == "HassTurnOn"
    assert json.loads(call["arguments"]) == json.loads(arguments)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
