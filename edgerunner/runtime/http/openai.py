"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /health and
/metrics, in one Starlette app with the Ollama routes (the listeners are in server.py).

The app only parses, submits to the scheduler and renders events (relay.py moves them); it never
touches llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgerunner.runtime import protocol
from edgerunner.runtime.health import InfoProvider, ServedModel
from edgerunner.runtime.http import ollama, relay
from edgerunner.runtime.http.access import Access, AccessMiddleware, CatchAllMiddleware
from edgerunner.runtime.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    DoneEvent,
    ErrorEvent,
    Event,
    RequestError,
    TextEvent,
    ToolDeltaEvent,
)
from edgerunner.runtime.scheduler import Job, Scheduler

MetricsProvider = Callable[[], str]

# /health answers 503 in these states so a load balancer stops sending work here
UNHEALTHY = {"draining", "pressure", "loading", "stopped"}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error_response(exc: RequestError, status: int | None = None) -> JSONResponse:
    """The `{"error": ...}` body with the mapped status and, for busy codes, Retry-After."""
    return JSONResponse(exc.body(), status_code=status or exc.http_status,
                        headers=relay.error_headers(exc))


class _App:
    """The request handlers, bound to one scheduler."""

    def __init__(self, scheduler: Scheduler, info: InfoProvider, metrics: MetricsProvider,
                 max_body_bytes: int, stream_flush_s: float) -> None:
        self.scheduler = scheduler
        self.info = info
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.stream_flush_s = stream_flush_s

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: Literal["chat", "completion"]) -> Response:
        parsed = protocol.parse_request(kind, await relay.read_json(request, self.max_body_bytes))
        events = relay.Inbox(asyncio.get_running_loop())
        job, first = await relay.submit(self.scheduler, parsed, request, events)
        if first is None:
            return Response(status_code=499)  # nobody is listening any more
        if isinstance(first[0], ErrorEvent):
            return error_response(first[0].error)
        model = self.scheduler.model_name
        if not parsed.stream:
            done = first[0]
            assert isinstance(done, DoneEvent)
            if kind == "chat":
                return JSONResponse(protocol.chat_completion(job.id, model, job.created, done))
            return JSONResponse(protocol.text_completion(
                job.id, model, job.created, done.text, done.finish_reason, done.usage))
        return StreamingResponse(
            relay.relay(first, events, job, _sse_renderer(job, parsed, model),
                        self.stream_flush_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse(protocol.model_list(self.scheduler.model_name))

    async def health(self, request: Request) -> Response:
        health = self.info()
        return JSONResponse(health.model_dump(mode="json"),
                            status_code=503 if health.state in UNHEALTHY else 200)

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics(), media_type="text/plain; version=0.0.4")


def _sse_renderer(job: Job, request: AnyRequest, model: str) -> relay.Render:
    """Each event as server-sent events: chat or completion chunks, then `[DONE]`."""
    chat = isinstance(request, ChatCompletionRequest)
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    started = False

    def data(obj: Any) -> str:
        return f"data: {_dumps(obj)}\n\n"

    def render(event: Event) -> str:
        nonlocal started
        if isinstance(event, TextEvent):
            role, started = not started, True
            if chat:
                return data(protocol.chat_chunk(job.id, model, job.created,
                                                content=event.text, role=role))
            return data(protocol.text_completion(job.id, model, job.created, event.text, None))
        if isinstance(event, ToolDeltaEvent):
            role, started = not started, True
            return data(protocol.chat_chunk(job.id, model, job.created, role=role,
                                            tool_calls=[event.delta]))
        if not isinstance(event, (DoneEvent, ErrorEvent)):
            return ""  # calls went out as deltas already
        if isinstance(event, ErrorEvent):
            return data(event.error.body()) + "data: [DONE]\n\n"
        if not chat:
            return data(protocol.text_completion(
                job.id, model, job.created, "", event.finish_reason,
                event.usage if include_usage else None)) + "data: [DONE]\n\n"
        out = data(protocol.chat_chunk(job.id, model, job.created, role=not started,
                                       finish_reason=event.finish_reason))
        if include_usage:
            chunk = protocol.chat_chunk(job.id, model, job.created, usage=event.usage)
            chunk["choices"] = []
            out += data(chunk)
        return out + "data: [DONE]\n\n"

    return render


def create_app(
    scheduler: Scheduler,
    info: InfoProvider,
    metrics: MetricsProvider,
    *,
    max_body_bytes: int = 1_048_576,
    stream_flush_s: float = 0.0,
    access: Access | None = None,
    served: ServedModel | None = None,
) -> Starlette:
    """The ASGI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    app = _App(scheduler, info, metrics, max_body_bytes, stream_flush_s)

    async def on_request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        routes = "/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics"
        message = (f"{request.method} {request.url.path}: {exc.detail}; "
                   f"endpoints are {routes}")
        return JSONResponse(RequestError("invalid_request", message).body(),
                            status_code=exc.status_code)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", app.chat, methods=["POST"]),
            Route("/v1/completions", app.completions, methods=["POST"]),
            Route("/v1/models", app.models, methods=["GET"]),
            Route("/health", app.health, methods=["GET"]),
            Route("/metrics", app.prometheus, methods=["GET"]),
            *ollama.routes(scheduler, info, max_body_bytes=max_body_bytes,
                           stream_flush_s=stream_flush_s, served=served),
        ],
        exception_handlers={
            RequestError: on_request_error,
            HTTPException: on_http_error,
        },
        # outermost first: the checks answer before any route; anything a handler did not
        # take becomes a 500 that says `Connection: close`
        middleware=[Middleware(CatchAllMiddleware),
                    Middleware(AccessMiddleware, access=access or Access())],
    )
