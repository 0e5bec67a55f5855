"""The model's output read back into content and tool calls, incrementally: fed the text as it
is generated, the parser releases content (holding back what may be the start of a trigger)
and call deltas (index, id, name, then argument fragments) as OpenAI streams them; the whole
answer is the same parser fed once, so streamed and non-streamed answers agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from edgerunner.runtime.engine.tools.families import Family
from edgerunner.runtime.tool_protocol import ParsedCall, ToolCallDelta, new_call_id

_WS = " \t\n\r"


@dataclass
class ParseResult:
    """An answer split into its text and its calls."""

    content: str
    calls: list[ParsedCall]


@dataclass
class _Call:
    name: str | None = None
    args: str = ""  # the arguments' JSON text so far
    done: bool = False


@dataclass
class _Emitted:
    id: str = field(default_factory=new_call_id)
    args_sent: int = 0


class Incomplete(Exception):
    """The text ends inside a value."""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int:
    """Index after the JSON string starting at text[i] == '"'."""
    i += 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    raise Incomplete


def _value_end(text: str, i: int) -> int:
    """Index after the JSON value starting at text[i] (structure only, not validated)."""
    if i >= len(text):
        raise Incomplete
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth = 0
        while i < len(text):
            ch = text[i]
            if ch == '"':
                i = _string_end(text, i)
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise Incomplete
    j = i
    while j < len(text) and text[j] not in ",]}" + _WS:
        j += 1
    if j == len(text):
        raise Incomplete
    return j


def _scan_call(text: str, i: int, args_key: str, call: _Call) -> int:
    """Fill `call` from the object at text[i] == '{' (partially if the text ends first);
    the index after it."""
    i = _skip_ws(text, i + 1)
    while True:
        if i >= len(text):
            raise Incomplete
        if text[i] == "}":
            call.done = True
            return i + 1
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if text[i] != '"':
            raise ValueError("not a call object")
        end = _string_end(text, i)
        key = json.loads(text[i:end])
        i = _skip_ws(text, end)
        if i >= len(text):
            raise Incomplete
        if text[i] != ":":
            raise ValueError("not a call object")
        i = _skip_ws(text, i + 1)
        if key in (args_key, "arguments", "parameters"):
            try:
                end = _value_end(text, i)
            except Incomplete:
                call.args = text[i:]
                raise
            call.args = text[i:end]
        else:
            end = _value_end(text, i)
            if key == "name":
                name = json.loads(text[i:end])
                call.name = name if isinstance(name, str) else None
        i = _skip_ws(text, end)


def scan_json_calls(text: str, args_key: str) -> list[_Call]:
    """The call objects (first key "name") in `text`, wherever they sit (a bare object, an
    array, {"tool_calls": [...]}, between tags); the last may be partial."""
    calls: list[_Call] = []
    i = 0
    while i < len(text):
        ch = text[i]
        try:
            if ch == '"':
                i = _string_end(text, i)
                continue
            if ch == "{":
                j = _skip_ws(text, i + 1)
                if j >= len(text):
                    break
                if text[j] == '"':
                    key_end = _string_end(text, j)
                    if json.loads(text[j:key_end]) == "name":
                        call = _Call()
                        calls.append(call)
                        try:
                            i = _scan_call(text, i, args_key, call)
                        except ValueError:
                            calls.pop()
                            i += 1
                        continue
                    # another object (the generic {"tool_calls": ...}): look inside it
                    i = _skip_ws(text, key_end)
                    if i < len(text) and text[i] == ":":
                        i = _skip_ws(text, i + 1)
                        if i < len(text) and text[i] == '"':
                            i = _string_end(text, i)
                    continue
            i += 1
        except Incomplete:
            break
    return calls


_GEMMA_BLOCK = re.compile(r"<start_function_call>\s*call:([A-Za-z0-9_.\-]+)\s*(\{.*?\})\s*"
                          r"<end_function_call>", re.DOTALL)
_ESC = "<escape>"


def _gemma_value(text: str, i: int) -> tuple[Any, int]:
    if text.startswith(_ESC, i):
        end = text.index(_ESC, i + len(_ESC))
        return text[i + len(_ESC):end], end + len(_ESC)
    if text[i] == "{":
        return _gemma_object(text, i)
    if text[i] == "[":
        items: list[Any] = []
        i += 1
        while text[i] != "]":
            item, i = _gemma_value(text, i)
            items.append(item)
            if text[i] == ",":
                i += 1
        return items, i + 1
    j = i
    while text[j] not in ",}]":
        j += 1
    raw = text[i:j].strip()
    try:
        return json.loads(raw), j
    except json.JSONDecodeError:
        return raw, j


def _gemma_object(text: str, i: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    i += 1
    while text[i] != "}":
        colon = text.index(":", i)
        key = text[i:colon].strip()
        out[key], i = _gemma_value(text, colon + 1)
        if text[i] == ",":
            i += 1
    return out, i + 1


def scan_gemma_calls(text: str) -> list[_Call]:
    """FunctionGemma's `<start_function_call>call:NAME{key:<escape>v<escape>,...}
    <end_function_call>` blocks, complete ones only."""
    calls = []
    for match in _GEMMA_BLOCK.finditer(text):
        try:
            args, _ = _gemma_object(match.group(2), 0)
        except (ValueError, IndexError):
            continue
        calls.append(_Call(name=match.group(1), args=json.dumps(args, ensure_ascii=False),
                           done=True))
    return calls


class StreamParser:
    """Feed it the generated text piece by piece; it hands back content and call deltas."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self._pending = ""  # text not yet released as content, before any trigger
        self._released = ""
        self._body: str | None = None  # the text from the trigger on, once one was seen
        self._emitted: list[_Emitted] = []
        self._calls: list[_Call] = []

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        """Content (str) and call deltas this piece of text completes."""
        if self._body is not None:
            self._body += text
            return self._call_deltas()
        self._pending += text
        at = self._trigger_at()
        if at is None:
            keep = self._holdback()
            out = self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(out):]
            return self._content(out)
        content, self._body = self._pending[:at[0]], self._pending[at[1]:]
        self._pending = ""
        return self._content(content) + self._call_deltas()

    def finish(self) -> list[str | ToolCallDelta]:
        """What was held back, at the end of the answer."""
        if self._body is None:
            out, self._pending = self._pending, ""
            return self._content(out)
        return self._call_deltas()

    def result(self) -> ParseResult:
        """The answer so far as content and complete calls (call `finish` first)."""
        calls = []
        for call, sent in zip(self._calls, self._emitted, strict=False):
            if call.name is None or not call.done:
                continue
            try:
                args = json.loads(call.args) if call.args.strip() else {}
            except json.JSONDecodeError:
                continue
            if isinstance(args, str):  # arguments sent as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    continue
            if isinstance(args, dict):
                calls.append(ParsedCall(call.name, args, sent.id))
        return ParseResult(self._released, calls)

    # -- internals --------------------------------------------------------------------------

    def _content(self, text: str) -> list[str | ToolCallDelta]:
        if not text:
            return []
        self._released += text
        return [text]

    def _trigger_at(self) -> tuple[int, int] | None:
        """(where the content ends, where the call text starts) of the first trigger."""
        best: tuple[int, int] | None = None
        for trigger in self.family.triggers:
            k = self._pending.find(trigger)
            if k >= 0 and (best is None or k < best[0]):
                # JSON calls are read after the trigger; FunctionGemma's blocks from it
                best = (k, k if self.family.syntax == "gemma" else k + len(trigger))
        start = self.family.start
        if start is not None and not self._released:
            stripped = self._pending.lstrip()
            compact = re.sub(r"\s+", "", stripped)
            if compact.startswith(start):
                k = len(self._pending) - len(stripped)
                if best is None or k < best[0]:
                    best = (k, k)
        return best

    def _holdback(self) -> int:
        """How many trailing characters of the pending text may begin a trigger."""
        text = self._pending
        keep = 0
        for trigger in self.family.triggers:
            for n in range(min(len(trigger) - 1, len(text)), keep, -1):
                if text.endswith(trigger[:n]):
                    keep = n
                    break
        start = self.family.start
        if start is not None and not self._released:
            compact = re.sub(r"\s+", "", text)
            if start.startswith(compact):  # all of it may still open a call
                keep = len(text)
        return keep

    def _call_deltas(self) -> list[str | ToolCallDelta]:
        assert self._body is not None
        if self.family.syntax == "gemma":
            self._calls = scan_gemma_calls(self._body)
        else:
            self._calls = scan_json_calls(self._body, self.family.args_key)
        out: list[str | ToolCallDelta] = []
        for index, call in enumerate(self._calls):
            if call.name is None:
                break  # arguments wait for the name: OpenAI's first delta carries it
            if index == len(self._emitted):
                self._emitted.append(_Emitted())
                out.append(ToolCallDelta(index, self._emitted[index].id, call.name, ""))
            sent = self._emitted[index]
            if len(call.args) > sent.args_sent:
                out.append(ToolCallDelta(index, arguments=call.args[sent.args_sent:]))
                sent.args_sent = len(call.args)
        return out


def parse(family: Family, text: str) -> ParseResult:
    """A whole answer as content and calls."""
    parser = StreamParser(family)
    parser.feed(text)
    parser.finish()
    return parser.result()
