"""Request, response and error shapes shared by every transport (OpenAI-compatible JSON).

Requests are validated here, before they reach the scheduler; unknown fields are refused so a
typo never silently changes sampling. Responses are built with the helpers at the bottom so that
HTTP and MQTT send byte-for-byte the same objects.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgerunner.runtime.tool_protocol import (
    MAX_TOOLS,
    ParsedCall,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolsOptions,
)

ErrorCode = Literal[
    "invalid_request",
    "context_length_exceeded",
    "busy",
    "memory_pressure",
    "timeout",
    "cancelled",
    "model_not_found",
    "unauthorized",
    "forbidden",
    "internal_error",
]

HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "model_not_found": 404,
    "unauthorized": 401,
    "forbidden": 403,
    "busy": 503,
    "memory_pressure": 503,
    "cancelled": 503,
    "timeout": 504,
    "internal_error": 500,
}

# OpenAI's error "type" for each code, so existing clients classify them sensibly
ERROR_TYPE: dict[str, str] = {
    "invalid_request": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "model_not_found": "invalid_request_error",
    "unauthorized": "authentication_error",
    "forbidden": "permission_error",
    "busy": "server_busy",
    "memory_pressure": "server_busy",
    "cancelled": "cancelled",
    "timeout": "timeout",
    "internal_error": "server_error",
}


class RequestError(Exception):
    """A request the daemon will not (or can no longer) answer; carries the wire error code."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> dict[str, Any]:
        """The `{"error": {...}}` JSON body."""
        return ErrorBody.of(self).model_dump()


class BusyError(RequestError):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__("busy", message, retry_after=retry_after)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"] = Field("text", description="Only text parts are supported")
    text: str = Field(..., max_length=4_000_000, description="The text")


class ChatMessage(_Strict):
    """A chat message; tool-calling clients' too: an assistant turn may carry `tool_calls` and
    no content, a `tool` turn answers a call by `tool_call_id` (OpenAI) or `tool_name`
    (Ollama)."""

    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(
        ..., description="Who says it"
    )
    content: str | list[TextPart] | None = Field(None, description="Text, or text parts")
    name: str | None = Field(None, max_length=256, description="Optional speaker name")
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS,
                                              description="Calls an assistant turn made")
    tool_call_id: str | None = Field(None, max_length=256, description="The call answered")
    tool_name: str | None = Field(None, max_length=256,
                                  description="Ollama: the function whose result this is")

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r}")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs content")
        return self

    def text(self) -> str:
        """The content as one string ("" for a call-only assistant turn)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_dict(self, content: str | None = None) -> dict[str, Any]:
        """The message as chat templates read it (arguments as objects, as HF templates and
        llama-server's --jinja give them); `content` stands in for the text when given."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text() if content is None else content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": call.id or "", "type": "function",
                 "function": {"name": call.function.name,
                              "arguments": call.function.arguments_dict()}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_name is not None or self.name is not None:
            out["name"] = self.tool_name or self.name
        return out


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", max_length=256, description="Schema name (informational)")
    description: str | None = Field(None, description="Informational")
    schema_: dict[str, Any] = Field(
        ..., alias="schema", description="JSON Schema the output must match"
    )
    strict: bool | None = Field(None, description="Accepted for compatibility; always enforced")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        "text", description="text, any JSON object, or JSON matching json_schema"
    )
    json_schema: JsonSchemaFormat | None = Field(None, description="Required for json_schema")

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format type "json_schema" needs a "json_schema" object')
        return self


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a final chunk carrying usage")


class _Sampling(_Strict):
    model: str | None = Field(None, max_length=256, description="Must name the served model")
    max_tokens: int | None = Field(
        None, ge=1, le=1_048_576, description="Tokens to generate at most (default from config)"
    )
    temperature: float = Field(0.7, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling")
    top_k: int = Field(40, ge=0, le=100_000, description="0 = off")
    min_p: float = Field(0.05, ge=0, le=1, description="Min-p sampling")
    repeat_penalty: float = Field(1.0, ge=0, le=10, description="1 = off")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI frequency penalty")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="OpenAI presence penalty")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Sampling seed")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop sequences")
    stream: bool = Field(False, description="Server-sent events / MQTT chunk sequence")
    stream_options: StreamOptions | None = Field(None, description="Streaming extras")
    user: str | None = Field(None, max_length=256, description="Caller id (logged, not used)")
    n: Literal[1] = Field(1, description="Only one choice per request is supported")

    @model_validator(mode="after")
    def _stop_bounds(self) -> _Sampling:
        stops = self.stop_list()
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop must be at most 16 non-empty strings of up to 256 characters")
        return self

    def stop_list(self) -> list[str]:
        """Stop sequences as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions body (also the MQTT request payload)."""

    messages: list[ChatMessage] = Field(
        ..., min_length=1, max_length=4096, description="The conversation so far"
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=1_048_576, description="Newer OpenAI name for max_tokens"
    )
    response_format: ResponseFormat | None = Field(None, description="Constrain output to JSON")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS,
                                     description="Functions the model may call")
    tool_choice: ToolChoice | None = Field(
        None, description="auto (default with tools), none, required or one function")
    parallel_tool_calls: bool | None = Field(None, description="Several calls in one answer")

    @model_validator(mode="after")
    def _merge_max(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def tools_options(self) -> ToolsOptions:
        """The tool fields as the engine takes them (OpenAI's defaults filled in)."""
        return ToolsOptions(tools=self.tools or [], tool_choice=self.tool_choice or "auto",
                            parallel_tool_calls=self.parallel_tool_calls is not False)

    @property
    def uses_tools(self) -> bool:
        """Tool fields sent, or a conversation that already holds calls or their results."""
        return bool(self.tools) or self.tool_choice is not None or any(
            m.tool_calls or m.role == "tool" for m in self.messages)


class CompletionRequest(_Sampling):
    """POST /v1/completions body: raw text continuation, no chat template."""

    prompt: str = Field(..., min_length=1, max_length=4_000_000, description="Text to continue")
    response_format: ResponseFormat | None = Field(None, description="Constrain output to JSON")


AnyRequest = ChatCompletionRequest | CompletionRequest

# Arrays and objects inside each other, at most: far above any real request (a json_schema with
# twenty levels of nested objects is ~45), far below where a recursive walk (pydantic, json,
# llama.cpp's schema converter) runs out of stack.
MAX_JSON_DEPTH = 64
# Only a \uD800-\uDFFF escape can put a surrogate into a decoded JSON string (UTF-8 cannot).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_json(data: bytes, what: str = "request body") -> Any:
    """Parse a request body; RequestError(invalid_request) for bad UTF-8, bad JSON, nesting
    deeper than MAX_JSON_DEPTH or a lone UTF-16 surrogate — never RecursionError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            "invalid_request",
            f"the {what} is not UTF-8 text (bad byte at offset {exc.start}); send a JSON "
            "object") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            "invalid_request",
            f"the {what} is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}); send a JSON object with Content-Type: application/json") from exc
    except RecursionError as exc:
        raise _too_deep(what) from exc
    if json_depth(value) > MAX_JSON_DEPTH:
        raise _too_deep(what)
    if _SURROGATE_ESCAPE.search(data):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            lone = f"\\u{ord(exc.object[exc.start]):04x}"
            raise RequestError(
                "invalid_request",
                f"the {what} contains a lone UTF-16 surrogate ({lone}); JSON strings must be "
                "valid Unicode (write a pair, \\ud83d\\ude00, or the character itself)") from exc
    return value


def _too_deep(what: str) -> RequestError:
    return RequestError(
        "invalid_request",
        f"the {what} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels (the nesting "
        "limit); flatten it")


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON value (a scalar is 0)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest  # enough to refuse; the rest need not be walked
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return deepest


def parse_request(kind: Literal["chat", "completion"], payload: Any) -> AnyRequest:
    """Validate a decoded JSON body; RequestError(invalid_request) names every bad field."""
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    if not isinstance(payload, dict):
        raise RequestError("invalid_request", "request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise RequestError("invalid_request", describe_validation(exc)) from exc


def describe_validation(exc: ValidationError) -> str:
    """One readable line per problem: `messages.0.role: Input should be ...`."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field (not supported)" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


class ErrorDetail(_Strict):
    type: str = Field(..., description="OpenAI-style error class")
    code: ErrorCode = Field(..., description="edgerunner error code")
    message: str = Field(..., description="What was wrong and what to do")


class ErrorBody(_Strict):
    """`{"error": {"type", "code", "message"}}` — the one error shape of every transport."""

    error: ErrorDetail

    @classmethod
    def of(cls, exc: RequestError) -> ErrorBody:
        return cls(error=ErrorDetail(type=ERROR_TYPE[exc.code], code=exc.code, message=exc.message))


class Usage(_Strict):
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    total_tokens: int = Field(0, ge=0)


FinishReason = Literal["stop", "length", "tool_calls"]


# Events the scheduler hands a transport's sink, in order: streamed events (TextEvent, and with
# tools ToolDeltaEvent and ToolCallEvent; streaming requests only) then DoneEvent | ErrorEvent.
@dataclass(frozen=True)
class TextEvent:
    """A piece of generated text (streaming requests only); with tools, content only."""

    text: str


@dataclass(frozen=True)
class ToolDeltaEvent:
    """A streamed piece of a tool call, as OpenAI's `delta.tool_calls[]` carries it: the
    first of each call has its index, id and name, the rest argument text."""

    delta: ToolCallDelta


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call the model has finished writing (Ollama streams calls whole)."""

    call: ParsedCall
    index: int  # its place among the answer's calls


@dataclass(frozen=True)
class DoneEvent:
    """Generation finished: the whole text (the content, with tools), why it stopped, token
    counts, and the tool calls the answer made."""

    text: str
    finish_reason: FinishReason
    usage: Usage = field(default_factory=lambda: Usage.model_validate({}))
    tool_calls: tuple[ParsedCall, ...] = ()


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; no more events follow."""

    error: RequestError


StreamEvent = TextEvent | ToolDeltaEvent | ToolCallEvent
FinalEvent = DoneEvent | ErrorEvent
Event = StreamEvent | FinalEvent


def chat_completion(job_id: str, model: str, created: int, done: DoneEvent) -> dict[str, Any]:
    """A `chat.completion` object (content null beside tool calls, as OpenAI sends it)."""
    message: dict[str, Any] = {"role": "assistant", "content": done.text}
    if done.tool_calls:
        message["content"] = done.text or None
        message["tool_calls"] = [call.openai() for call in done.tool_calls]
    return {
        "id": job_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": done.finish_reason,
        }],
        "usage": done.usage.model_dump(),
    }


def chat_chunk(
    job_id: str,
    model: str,
    created: int,
    *,
    content: str | None = None,
    role: bool = False,
    finish_reason: FinishReason | None = None,
    usage: Usage | None = None,
    tool_calls: list[ToolCallDelta] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` object."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = [piece.openai() for piece in tool_calls]
    chunk: dict[str, Any] = {
        "id": job_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def text_completion(
    job_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: FinishReason | None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A `text_completion` object (also each streamed completion chunk)."""
    out: dict[str, Any] = {
        "id": job_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        out["usage"] = usage.model_dump()
    return out


def model_list(model: str, created: int | None = None) -> dict[str, Any]:
    """GET /v1/models body: the one served model."""
    return {
        "object": "list",
        "data": [{
            "id": model,
            "object": "model",
            "created": created if created is not None else int(time.time()),
            "owned_by": "edgerunner",
        }],
    }
