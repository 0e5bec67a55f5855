"""A short request without a grammar is submitted from the HTTP event loop (no thread hop before
the worker sees it); one with a grammar, a long prompt, or while the weights are unloaded goes
through a thread, where the slow work cannot hold up the loop."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from edgerunner.bundle.store import Bundle
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.protocol import ChatMessage
from edgerunner.runtime.scheduler import QUICK_PROMPT_CHARS, Scheduler
from tests.runtime.conftest import RunningDaemon, chat

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_which_requests_prepare_quickly(served: RunningDaemon, bundle: Bundle) -> None:
    scheduler = served.daemon.scheduler
    assert scheduler is not None
    assert scheduler.prepares_quickly(chat("Hi.", system="Be brief."))
    assert not scheduler.prepares_quickly(chat("Hi.", SCHEMA))
    assert not scheduler.prepares_quickly(chat("Hi.", response_format={"type": "json_object"}))
    assert scheduler.prepares_quickly(chat("x" * (QUICK_PROMPT_CHARS - 10), system="Be brief."))
    assert not scheduler.prepares_quickly(chat("x" * QUICK_PROMPT_CHARS, system="Be brief."))
    # a call-only assistant turn has no content: it counts as no text, not as an error
    history = chat("Hi.").model_copy(update={"messages": [
        *chat("Turn the fan on.").messages,
        ChatMessage(role="assistant", tool_calls=[{
            "id": "call_1", "type": "function",
            "function": {"name": "HassTurnOn", "arguments": '{"name": "fan"}'}}]),
        ChatMessage(role="tool", tool_call_id="call_1", content='{"success": true}')]})
    assert scheduler.prepares_quickly(history)
    unloaded = Scheduler(Engine(bundle.model_path, bundle.manifest.plan, name="smol"))
    assert not unloaded.prepares_quickly(chat("Hi."))  # it would open a vocab-only copy


def test_the_loop_submits_a_short_request_and_a_thread_one_with_a_grammar(
    served: RunningDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = served.daemon.scheduler
    assert scheduler is not None
    submitted_on: list[threading.Thread] = []
    submit = scheduler.submit

    def recording(*args: Any, **kwargs: Any) -> Any:
        submitted_on.append(threading.current_thread())
        return submit(*args, **kwargs)

    monkeypatch.setattr(scheduler, "submit", recording)
    loop_thread = served._thread
    with served.client(timeout=120) as http:
        short = _ask(http, {"messages": [{"role": "user", "content": "Hi."}],
                            "max_tokens": 2, "stream": True})
        schema = _ask(http, {"messages": [{"role": "user", "content": "A city?"}],
                             "max_tokens": 8, "response_format": {
                                 "type": "json_schema", "json_schema": {"schema": SCHEMA}}})
    assert short.status_code == 200 and "data: [DONE]" in short.text
    assert schema.status_code == 200
    assert submitted_on[0] is loop_thread
    assert submitted_on[1] is not loop_thread


def _ask(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body)

