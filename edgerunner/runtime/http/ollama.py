"""Ollama's HTTP API on the daemon's app, so Home Assistant's Ollama integration, Open WebUI and
the `ollama` client work unchanged: /api/version, /api/tags, /api/show, /api/ps, /api/chat and
/api/generate (NDJSON streaming by default).

Requests are translated by `ollama_protocol` and submitted to the same scheduler as the OpenAI
endpoints, so the same admission checks, guards and queue apply; errors come back in Ollama's
`{"error": "..."}` shape with the same status codes (and Retry-After when busy). Endpoints that
manage models (pull, push, create, copy, delete, blobs) and embeddings answer 501 saying so;
`GET /` answers a plain line, as Ollama does for clients that probe for a server.

Timings are measured in nanoseconds: the worker thread stamps the first token and the final
event as it hands them over, and the scheduler stamps when it began the job (Job.started_ns),
so time queued behind other requests is not counted as prompt evaluation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from edgerunner import __version__
from edgerunner.runtime.health import InfoProvider, ServedModel
from edgerunner.runtime.http import ollama_protocol as op
from edgerunner.runtime.http import relay
from edgerunner.runtime.protocol import (
    AnyRequest,
    DoneEvent,
    ErrorEvent,
    Event,
    FinalEvent,
    RequestError,
    TextEvent,
    ToolCallEvent,
)
from edgerunner.runtime.scheduler import Scheduler
from edgerunner.runtime.tool_protocol import ParsedCall

logger = logging.getLogger(__name__)

# The Ollama API version whose shapes these endpoints follow (structured outputs, done_reason,
# `think`); clients that gate features on /api/version see what they can use.
API_VERSION = "0.9.0"
ENDPOINTS = "/api/version, /api/tags, /api/show, /api/ps, /api/chat, /api/generate"
_MODEL_MANAGEMENT = ("pull", "push", "create", "copy", "delete", "blobs")
_EMBEDDINGS = ("embed", "embeddings")


def _details(card: ServedModel) -> dict[str, Any]:
    family = card.architecture
    return {"parent_model": "", "format": "gguf", "family": family,
            "families": [family] if family else None,
            "parameter_size": _count(card.n_params), "quantization_level": card.quant}


def _count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.1f}B"
    if n >= 10**6:
        return f"{n / 10**6:.0f}M"
    return str(n) if n else ""


class _Timed:
    """One request's sink: stamps tokens on the worker thread, then passes events on (text
    only when the client streams)."""

    def __init__(self, inbox: relay.Inbox, stream: bool, submitted_ns: int) -> None:
        self.inbox = inbox
        self.stream = stream
        self.submitted_ns = submitted_ns
        self.first_ns = 0
        self.done_ns = 0

    def __call__(self, event: Event) -> None:
        now = time.monotonic_ns()
        if not self.first_ns:
            self.first_ns = now
        if not isinstance(event, FinalEvent):
            if self.stream:
                self.inbox.put(event)
            return
        self.done_ns = now
        self.inbox.put(event)

    def timings(self, received_ns: int, load_ns: int, started_ns: int) -> dict[str, int]:
        started_ns = started_ns or self.submitted_ns
        return {
            "total_duration": self.done_ns - received_ns,
            "load_duration": load_ns,
            "prompt_eval_duration": max(0, self.first_ns - started_ns - load_ns),
            "eval_duration": self.done_ns - self.first_ns,
        }


class OllamaApi:
    """The /api/* handlers, bound to one scheduler."""

    def __init__(self, scheduler: Scheduler, info: InfoProvider, *, max_body_bytes: int,
                 stream_flush_s: float, served: ServedModel | None = None) -> None:
        self.scheduler = scheduler
        self.info = info
        self.max_body_bytes = max_body_bytes
        self.stream_flush_s = stream_flush_s
        # a bare name when the app serves an engine without its bundle's manifest
        self.card = served or ServedModel(name=scheduler.model_name)

    # -- model information ----------------------------------------------------------------

    async def root(self, request: Request) -> Response:
        # Ollama answers `GET /` with a plain line; clients probe it to find a server
        return PlainTextResponse("edgerunner is running (Ollama API under /api, OpenAI under /v1)")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": API_VERSION, "edgerunner": __version__})

    def _listed(self) -> dict[str, Any]:
        name = f"{self.card.name}:latest"
        return {"name": name, "model": name, "modified_at": self.card.created or
                op.timestamp(), "size": self.card.size, "digest": self.card.sha256,
                "details": _details(self.card)}

    async def tags(self, request: Request) -> Response:
        return JSONResponse({"models": [self._listed()]})

    async def ps(self, request: Request) -> Response:
        if not self.scheduler.engine.loaded:
            return JSONResponse({"models": []})
        keep = self.scheduler.keep_alive_s
        # never unloaded unless keep_alive_s is set (then: at most that long after the last job)
        expires = op.timestamp(time.time() + keep) if keep > 0 else "9999-12-31T23:59:59.000000Z"
        predicted = self.info().memory.predicted_mb
        size = int(predicted * 2**20) if predicted else self.card.size
        return JSONResponse({"models": [{**self._listed(), "expires_at": expires, "size": size,
                                         "size_vram": 0,
                                         "context_length": self.scheduler.engine.n_ctx}]})

    async def show(self, request: Request) -> Response:
        try:
            body = await relay.read_json(request, self.max_body_bytes)
            if not isinstance(body, dict):
                raise RequestError("invalid_request", "request body must be a JSON object")
            requested = body.get("model") or body.get("name")
            if not isinstance(requested, str) or not requested:
                raise RequestError("invalid_request", "model: field required")
            op.resolve_model(requested, self.card.name)
        except RequestError as exc:
            return _error(exc)
        n_ctx = self.scheduler.engine.n_ctx
        card = self.card
        info: dict[str, Any] = {"general.architecture": card.architecture,
                                "general.parameter_count": card.n_params,
                                "edgerunner.n_ctx": n_ctx, "edgerunner.profile": card.profile}
        if card.architecture and card.n_ctx_train:
            info[f"{card.architecture}.context_length"] = card.n_ctx_train
        return JSONResponse({
            "modelfile": f"# edgerunner bundle {card.name}\nFROM "
                         f"{self.scheduler.engine.model_path}\nPARAMETER num_ctx {n_ctx}\n",
            "parameters": f"num_ctx {n_ctx}\nnum_predict {self.scheduler.default_max_tokens}",
            "template": "",  # the GGUF's own chat template, applied by llama.cpp
            "details": _details(card),
            "model_info": info,
            # every model calls tools: in its family's own format, or the generic one
            "capabilities": ["completion", "tools"],
            "modified_at": card.created or op.timestamp(),
        })

    # -- generation -----------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def generate(self, request: Request) -> Response:
        return await self._generate(request, "generate")

    async def _generate(self, request: Request, kind: Literal["chat", "generate"]) -> Response:
        received_ns = time.monotonic_ns()
        try:
            body = op.parse(op.ChatRequest if kind == "chat" else op.GenerateRequest,
                            await relay.read_json(request, self.max_body_bytes))
            op.resolve_model(body.model, self.card.name)
            n_ctx = self.scheduler.engine.n_ctx
            if isinstance(body, op.ChatRequest):
                empty = not body.messages
                parsed: AnyRequest | None = None if empty else op.chat_request(body, n_ctx)
            else:
                empty = not body.prompt
                parsed = None if empty else op.generate_request(body, n_ctx)
            if parsed is None:
                return self._load_only(kind, body)
            return await self._run(request, kind, body, parsed, received_ns)
        except RequestError as exc:
            return _error(exc)

    def _load_only(self, kind: Literal["chat", "generate"], body: op._Common) -> Response:
        # Ollama's "load the model" request; edgerunner keeps the model loaded (or reloads it
        # on the next request after keep_alive_s) and never unloads on request
        if op.wants_unload(body):
            raise RequestError(
                "invalid_request",
                "edgerunner does not unload the model on request (keep_alive 0); the daemon's "
                "keep_alive_s setting (config.toml or --keep-alive) unloads it when idle")
        return JSONResponse(op.final(kind, body.model, "", "load"))

    async def _run(self, request: Request, kind: Literal["chat", "generate"], body: op._Common,
                   parsed: AnyRequest, received_ns: int) -> Response:
        events = relay.Inbox(asyncio.get_running_loop())
        was_loaded = self.scheduler.engine.loaded
        sink = _Timed(events, body.stream, time.monotonic_ns())
        job, first = await relay.submit(self.scheduler, parsed, request, events, sink)
        if first is None:
            return Response(status_code=499)  # nobody is listening any more
        if isinstance(first[0], ErrorEvent):
            return _error(first[0].error)

        def done_body(event: DoneEvent, text: str,
                      calls: tuple[ParsedCall, ...] = ()) -> dict[str, Any]:
            load_ns = 0 if was_loaded else int(self.scheduler.engine.load_seconds * 1e9)
            return op.final(kind, body.model, text, event.finish_reason, event.usage,
                            sink.timings(received_ns, load_ns, job.started_ns), calls)

        if not body.stream:
            done = first[0]
            assert isinstance(done, DoneEvent)
            return JSONResponse(done_body(done, done.text, done.tool_calls))
        return StreamingResponse(
            relay.relay(first, events, job, _ndjson_renderer(kind, body.model, done_body),
                        self.stream_flush_s),
            media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})

    # -- everything else under /api -------------------------------------------------------

    async def unsupported(self, request: Request) -> Response:
        endpoint = request.url.path.removeprefix("/api/").split("/")[0]
        where = f"{request.method} {request.url.path}"
        if endpoint in _MODEL_MANAGEMENT:
            message = (f"{where} is not supported by edgerunner: a device serves the one model "
                       "it was packed with (`edgerunner pack`, then `edgerunner install`); "
                       "models cannot be pulled, pushed, created, copied or deleted over the API")
            return JSONResponse({"error": message}, status_code=501)
        if endpoint in _EMBEDDINGS:
            message = (f"{where} is not supported by edgerunner: the device serves a "
                       "generative model only, no embeddings")
            return JSONResponse({"error": message}, status_code=501)
        known = {"version", "tags", "ps", "show", "chat", "generate"}
        if endpoint in known:
            return JSONResponse({"error": f"{where}: method not allowed; endpoints are "
                                 f"{ENDPOINTS}"}, status_code=405)
        return JSONResponse({"error": f"{where}: not found; the Ollama endpoints here are "
                             f"{ENDPOINTS}"}, status_code=404)



def _ndjson_renderer(kind: Literal["chat", "generate"], model: str,
                     done_body: Callable[[DoneEvent, str], dict[str, Any]]) -> relay.Render:
    """Each event as one NDJSON line: pieces, each tool call whole in its own piece (as Ollama
    streams them), then the final object (or the error)."""
    def render(event: Event) -> str:
        if isinstance(event, TextEvent):
            return _line(op.piece(kind, model, event.text))
        if isinstance(event, ToolCallEvent):
            return _line(op.piece(kind, model, "", [event.call.ollama(event.index)]))
        if not isinstance(event, FinalEvent):
            return ""  # call deltas: Ollama sends calls whole
        if isinstance(event, ErrorEvent):
            return _line(op.error_body(event.error))
        return _line(done_body(event, ""))

    return render


def _line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(op.error_body(exc), status_code=exc.http_status,
                        headers=relay.error_headers(exc))


def routes(scheduler: Scheduler, info: InfoProvider, *, max_body_bytes: int = 1_048_576,
           stream_flush_s: float = 0.0, served: ServedModel | None = None) -> list[BaseRoute]:
    """The /api/* routes for create_app; anything else under /api/ gets an Ollama-shaped error."""
    api = OllamaApi(scheduler, info, max_body_bytes=max_body_bytes,
                    stream_flush_s=stream_flush_s, served=served)
    return [
        Route("/", api.root, methods=["GET", "HEAD"]),
        Route("/api/version", api.version, methods=["GET"]),
        Route("/api/tags", api.tags, methods=["GET"]),
        Route("/api/ps", api.ps, methods=["GET"]),
        Route("/api/show", api.show, methods=["POST"]),
        Route("/api/chat", api.chat, methods=["POST"]),
        Route("/api/generate", api.generate, methods=["POST"]),
        Route("/api/{rest:path}", api.unsupported,
              methods=["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]),
    ]
