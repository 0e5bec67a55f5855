"""A request's events read through its family's parser: between the scheduler and the
transport's sink, generated text becomes content (TextEvent), call deltas (ToolDeltaEvent) and
finished calls (ToolCallEvent), and the final DoneEvent carries the content, the calls and
finish_reason "tool_calls". Streamed and whole answers go through the same parser, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable

from edgerunner.runtime.engine.tools.families import Family
from edgerunner.runtime.engine.tools.parse import StreamParser
from edgerunner.runtime.protocol import (
    DoneEvent,
    Event,
    TextEvent,
    ToolCallEvent,
    ToolDeltaEvent,
)
from edgerunner.runtime.tool_protocol import ToolCallDelta

Sink = Callable[[Event], None]


class ToolEvents:
    """The sink of one request with tools: parses, then passes typed events on to `sink`
    (called from the worker thread, like any sink)."""

    def __init__(self, sink: Sink, family: Family) -> None:
        self.sink = sink
        self.parser = StreamParser(family)
        self._fed = False  # streamed text arrived (a whole answer is parsed at DoneEvent)
        self._finished: set[str] = set()  # ids of the calls already sent whole

    def __call__(self, event: Event) -> None:
        if isinstance(event, TextEvent):
            self._fed = True
            self._send(self.parser.feed(event.text))
            return
        if not isinstance(event, DoneEvent):
            self.sink(event)  # errors pass as they are
            return
        if self._fed:
            self._send(self.parser.finish())
        else:
            self.parser.feed(event.text)
            self.parser.finish()
        result = self.parser.result()
        # a call cut off by max_tokens keeps "length"; a finished answer with calls asks for them
        reason = "tool_calls" if result.calls and event.finish_reason == "stop" \
            else event.finish_reason
        self.sink(DoneEvent(result.content, reason, event.usage, tuple(result.calls)))

    def _send(self, pieces: list[str | ToolCallDelta]) -> None:
        for piece in pieces:
            if isinstance(piece, str):
                self.sink(TextEvent(piece))
            else:
                self.sink(ToolDeltaEvent(piece))
        # a call is whole when its object closes, which may add no delta of its own
        for index, call in enumerate(self.parser.result().calls):
            if call.id not in self._finished:
                self._finished.add(call.id)
                self.sink(ToolCallEvent(call, index))
