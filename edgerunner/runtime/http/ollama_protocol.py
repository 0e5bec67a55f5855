"""Ollama's request and response shapes, translated to and from edgerunner's own protocol.

An Ollama body becomes a `ChatCompletionRequest` (or, for `/api/generate` with `raw`, a
`CompletionRequest`) so it goes through the same validation, scheduler and guards as the
OpenAI endpoints. Tools, assistant `tool_calls` (arguments as objects) and `tool` messages
(`tool_name`) map onto the OpenAI fields. What Ollama offers and edgerunner does not (images,
suffix, templates, thinking, sampling it lacks) is refused with a message that says so, never
silently dropped.
Reference: docs/api.md in github.com/ollama/ollama.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner.runtime.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    Usage,
    describe_validation,
)
from edgerunner.runtime.tool_protocol import MAX_TOOLS, ParsedCall, Tool, ToolCall

# Options llama.cpp fixes when the bundle is loaded (the plan decides them): accepted, no effect.
LOAD_TIME_OPTIONS = frozenset({
    "num_keep", "num_batch", "num_gpu", "main_gpu", "num_thread", "numa", "low_vram",
    "vocab_only", "use_mmap", "use_mlock", "logits_all", "embedding_only", "penalize_newline",
})
# Sampling edgerunner does not offer: refused unless the value is Ollama's no-op default.
UNSUPPORTED_SAMPLING: dict[str, Any] = {
    "typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "repeat_last_n": 64,
}
_DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Strict):
    """`options`: the sampling edgerunner honours, plus Ollama's other names (checked)."""

    model_config = ConfigDict(extra="allow")  # other Ollama names are checked by hand below

    num_predict: int | None = Field(None, ge=-2, le=1_048_576,
                                    description="Tokens to generate; -1/-2 = up to the context")
    num_ctx: int | None = Field(None, ge=1, description="Must not exceed the served context")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling")
    top_k: int | None = Field(None, ge=0, le=100_000, description="0 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="Min-p sampling")
    seed: int | None = Field(None, le=2**32 - 1, description="Sampling seed; negative = random")
    stop: str | list[str] | None = Field(None, description="Stop sequences")
    repeat_penalty: float | None = Field(None, ge=0, le=10, description="1 = off")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    def check_extras(self) -> None:
        """Refuse option names edgerunner cannot honour; load-time ones are accepted."""
        for name, value in (self.model_extra or {}).items():
            if name in LOAD_TIME_OPTIONS:
                continue
            if name in UNSUPPORTED_SAMPLING:
                if value is None or value == UNSUPPORTED_SAMPLING[name]:
                    continue
                raise RequestError("invalid_request",
                                   f"options.{name} is not supported by edgerunner; leave it out")
            if name.startswith("mirostat_"):
                continue  # only meaningful with mirostat, which is refused above
            raise RequestError("invalid_request", f"options.{name}: unknown option")


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"] = Field(..., description="Who says it")
    content: str = Field("", description="The text")
    images: list[Any] | None = Field(None, description="Refused: text-only models")
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS,
                                              description="Calls an assistant turn made")
    tool_name: str | None = Field(None, max_length=256, description="Name of the tool (tool role)")
    thinking: str | None = Field(None, description="Earlier thinking; ignored")


class _Common(_Strict):
    model: str = Field(..., min_length=1, max_length=256, description="The bundle's name")
    format: Literal["", "json"] | dict[str, Any] | None = Field(
        None, description='"json" or a JSON schema: grammar-constrained output')
    options: Options | None = Field(None, description="Sampling options")
    stream: bool = Field(True, description="NDJSON stream (Ollama's default) or one object")
    keep_alive: float | str | None = Field(
        None, description="Accepted and validated; the daemon's keep_alive_s decides unloading")
    think: bool | str | None = Field(None, description="Refused when on: no thinking models")
    logprobs: bool | None = Field(None, description="Refused when true")
    top_logprobs: int | None = Field(None, description="Refused when set")


class ChatRequest(_Common):
    """POST /api/chat."""

    messages: list[Message] = Field(default_factory=list, max_length=4096,
                                    description="The conversation; empty = load the model")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS,
                                     description="Functions the model may call")


class GenerateRequest(_Common):
    """POST /api/generate."""

    prompt: str = Field("", max_length=4_000_000, description="Empty = load the model")
    system: str | None = Field(None, max_length=4_000_000, description="System message")
    raw: bool = Field(False, description="True: no chat template, the prompt as it is")
    suffix: str | None = Field(None, description="Refused: no fill-in-the-middle")
    template: str | None = Field(None, description="Refused: the bundle's template is used")
    context: list[int] | None = Field(None, description="Refused: send /api/chat messages")
    images: list[Any] | None = Field(None, description="Refused: text-only models")
    width: int | None = Field(None, description="Refused: no image generation")
    height: int | None = Field(None, description="Refused: no image generation")
    steps: int | None = Field(None, description="Refused: no image generation")


def parse(model: type[ChatRequest] | type[GenerateRequest], payload: Any
          ) -> ChatRequest | GenerateRequest:
    """Validate a decoded body; RequestError(invalid_request) names every bad field."""
    if not isinstance(payload, dict):
        raise RequestError("invalid_request", "request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise RequestError("invalid_request", describe_validation(exc)) from exc


def _refuse(what: str, why: str) -> RequestError:
    return RequestError("invalid_request", f"{what} is not supported by edgerunner: {why}")


def _check_common(req: _Common) -> None:
    if req.think not in (None, False, "", "false"):
        raise _refuse("think", "the served model does not think; leave `think` out or false")
    if req.logprobs or req.top_logprobs:
        raise _refuse("logprobs", "leave `logprobs` and `top_logprobs` out")
    if req.keep_alive is not None and isinstance(req.keep_alive, str) and not (
            _DURATION.match(req.keep_alive) or _is_number(req.keep_alive)):
        raise RequestError("invalid_request",
                           f"keep_alive {req.keep_alive!r} is not a duration (e.g. 5m, 1h, -1)")
    if req.options is not None:
        req.options.check_extras()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def wants_unload(req: _Common) -> bool:
    """keep_alive 0 (Ollama's "unload now")."""
    value = req.keep_alive
    if value is None:
        return False
    if isinstance(value, str):
        if _is_number(value):
            return float(value) == 0
        return bool(re.fullmatch(r"0+(ns|us|µs|ms|s|m|h)", value))
    return value == 0


def resolve_model(requested: str, served: str) -> None:
    """The bundle's name, with or without `:latest`; model_not_found otherwise."""
    if requested in (served, f"{served}:latest"):
        return
    raise RequestError("model_not_found",
                       f"model {requested!r} not found: this device serves {served!r} (see "
                       "/api/tags); models cannot be pulled or created here")


def _sampling(req: _Common, n_ctx: int) -> dict[str, Any]:
    out: dict[str, Any] = {"stream": True}  # always: the first token's time is measured
    opts = req.options
    if opts is not None:
        if opts.num_ctx is not None and opts.num_ctx > n_ctx:
            raise RequestError(
                "context_length_exceeded",
                f"options.num_ctx {opts.num_ctx} is larger than the context this device serves "
                f"({n_ctx} tokens, fixed by the bundle's plan); send num_ctx {n_ctx} or less "
                "(Home Assistant: the Ollama integration's 'Context window size')")
        if opts.num_predict is not None and opts.num_predict > 0:
            out["max_tokens"] = opts.num_predict
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                     "presence_penalty", "frequency_penalty", "stop"):
            value = getattr(opts, name)
            if value is not None:
                out[name] = value
        if opts.seed is not None and opts.seed >= 0:
            out["seed"] = opts.seed
    if req.format == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "format", "schema": req.format}}
    return out


def _validated(model: type[ChatCompletionRequest] | type[CompletionRequest],
               body: dict[str, Any]) -> AnyRequest:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestError("invalid_request", describe_validation(exc)) from exc


def chat_request(req: ChatRequest, n_ctx: int) -> ChatCompletionRequest:
    """The OpenAI-shaped request an /api/chat body stands for."""
    _check_common(req)
    messages = []
    for i, msg in enumerate(req.messages):
        if msg.images:
            raise _refuse(f"messages.{i}.images", "the served model reads text only")
        entry: dict[str, Any] = {"role": msg.role, "content": msg.content}
        if msg.tool_calls:
            entry["tool_calls"] = [call.model_dump(exclude_none=True) for call in msg.tool_calls]
        if msg.tool_name:
            entry["tool_name"] = msg.tool_name
        messages.append(entry)
    body: dict[str, Any] = {"messages": messages, **_sampling(req, n_ctx)}
    if req.tools:
        body["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
    parsed = _validated(ChatCompletionRequest, body)
    assert isinstance(parsed, ChatCompletionRequest)
    return parsed


def generate_request(req: GenerateRequest, n_ctx: int) -> AnyRequest:
    """The OpenAI-shaped request an /api/generate body stands for (raw = plain completion)."""
    _check_common(req)
    for name, why in (("suffix", "no fill-in-the-middle"),
                      ("template", "the bundle's own chat template is used; send raw: true "
                       "with a templated prompt instead"),
                      ("context", "send the conversation as /api/chat messages"),
                      ("images", "the served model reads text only"),
                      ("width", "no image generation"), ("height", "no image generation"),
                      ("steps", "no image generation")):
        if getattr(req, name):
            raise _refuse(name, why)
    sampling = _sampling(req, n_ctx)
    if req.raw:
        if req.system:
            raise _refuse("system with raw: true", "put the system text into the raw prompt")
        return _validated(CompletionRequest, {"prompt": req.prompt, **sampling})
    messages = [{"role": "system", "content": req.system}] if req.system else []
    messages.append({"role": "user", "content": req.prompt})
    return _validated(ChatCompletionRequest, {"messages": messages, **sampling})


# -- responses ---------------------------------------------------------------------------------


def timestamp(at: float | None = None) -> str:
    """RFC 3339 UTC with microseconds, as Ollama's created_at."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def piece(kind: Literal["chat", "generate"], model: str, text: str,
          tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One streamed object (done: false)."""
    body: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            body["message"]["tool_calls"] = tool_calls
    else:
        body["response"] = text
    body["done"] = False
    return body


def final(kind: Literal["chat", "generate"], model: str, text: str, done_reason: str,
          usage: Usage | None = None, timings: dict[str, int] | None = None,
          tool_calls: Sequence[ParsedCall] = ()) -> dict[str, Any]:
    """The last object: done, why, token counts and durations (nanoseconds); an unstreamed
    answer's tool calls (Ollama says "stop" after calls, not OpenAI's "tool_calls")."""
    body = piece(kind, model, text, [call.ollama(i) for i, call in enumerate(tool_calls)])
    body["done"] = True
    body["done_reason"] = "stop" if done_reason == "tool_calls" else done_reason
    if timings is not None:
        body.update(timings)
    if usage is not None:
        body["prompt_eval_count"] = usage.prompt_tokens
        body["eval_count"] = usage.completion_tokens
    return body


def error_body(exc: RequestError) -> dict[str, str]:
    """Ollama's error shape: `{"error": "message"}`."""
    return {"error": exc.message}
