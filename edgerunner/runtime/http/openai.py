"""OpenAI-compatible HTTP on a unix socket (and optionally TCP): a Starlette app under uvicorn.

The app only parses, submits to the scheduler and relays events; it never touches llama.cpp.
A client that goes away (before or during streaming) cancels its job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from edgerunner.bundle.settings import ServeConfig
from edgerunner.errors import ConfigError
from edgerunner.runtime import protocol
from edgerunner.runtime.health import InfoProvider, ServedModel
from edgerunner.runtime.http.access import (
    Access,
    AccessMiddleware,
    CatchAllMiddleware,
    Gate,
    connection_cap,
    gated,
    protocol_class,
)
from edgerunner.runtime.protocol import (
    AnyRequest,
    ChatCompletionRequest,
    DoneEvent,
    ErrorEvent,
    Event,
    RequestError,
    TextEvent,
)
from edgerunner.runtime.scheduler import Job, Scheduler

logger = logging.getLogger(__name__)

MetricsProvider = Callable[[], str]

# /health answers 503 in these states so a load balancer stops sending work here
UNHEALTHY = {"draining", "pressure", "loading", "stopped"}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class BodyTooLarge(RequestError):
    """The body is over max_body_bytes: refused before it is read to its end, so the connection
    cannot be reused (the rest of the body would be read as the next request)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_request", message)


def error_response(exc: RequestError, status: int | None = None) -> JSONResponse:
    """The `{"error": ...}` body with the mapped status and, for busy codes, Retry-After."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, BodyTooLarge):
        headers["Connection"] = "close"
    return JSONResponse(exc.body(), status_code=status or exc.http_status, headers=headers)


class _App:
    """The request handlers, bound to one scheduler."""

    def __init__(self, scheduler: Scheduler, info: InfoProvider, metrics: MetricsProvider,
                 max_body_bytes: int, stream_flush_s: float) -> None:
        self.scheduler = scheduler
        self.info = info
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.stream_flush_s = stream_flush_s

    async def read_json(self, request: Request) -> Any:
        """The body, bounded by max_body_bytes as it arrives (chunked too), then decoded."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge(f"request body is {declared} bytes; the limit is "
                               f"{self.max_body_bytes} (max_body_bytes)")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise BodyTooLarge(f"request body exceeds {self.max_body_bytes} bytes "
                                   "(max_body_bytes)")
        return protocol.decode_json(bytes(body))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: Literal["chat", "completion"]) -> Response:
        parsed = protocol.parse_request(kind, await self.read_json(request))
        events = Inbox(asyncio.get_running_loop())
        job = await run_in_threadpool(lambda: self.scheduler.submit(parsed, sink=events.put))
        first = await _first_event(events, request.receive, job)
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
            _sse(first, events, job, parsed, model, self.stream_flush_s),
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


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Inbox:
    """Events from the worker thread to one request's coroutine.

    The worker wakes the event loop only when the coroutine is waiting for events (or for the
    job's final event), so a stream that lingers between writes costs the loop nothing per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Event] = collections.deque()
        self._lock = threading.Lock()
        self._waiting = False
        self._wake_pending = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        """Called from the worker thread (the scheduler's sink)."""
        with self._lock:
            self._items.append(event)
            urgent = self._waiting or not isinstance(event, TextEvent)
            if not urgent or self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, linger: float = 0.0) -> list[Event]:
        """Every event that has arrived, waiting for at least one; with `linger`, first let
        tokens gather for that long (the job's final event cuts it short)."""
        if linger > 0:
            self._waiter = self._loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._waiter), linger)
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    self._waiting = False
                    return items
                self._waiting = True
            self._waiter = self._loop.create_future()
            await self._waiter


async def _first_event(events: Inbox, receive: Receive, job: Job) -> list[Event] | None:
    """The job's first events, or None (job cancelled) if the client disconnects first."""
    getter = asyncio.ensure_future(events.get())
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if getter in done:
        return getter.result()
    getter.cancel()
    job.cancel()
    logger.info("client disconnected; cancelled %s", job.id)
    return None


async def _sse(
    first: list[Event], events: Inbox, job: Job, request: AnyRequest, model: str,
    flush_s: float,
) -> AsyncIterator[str]:
    chat = isinstance(request, ChatCompletionRequest)
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    started = False
    final = False

    def data(obj: Any) -> str:
        return f"data: {_dumps(obj)}\n\n"

    def render(event: Event) -> str:
        nonlocal started, final
        if isinstance(event, TextEvent):
            role, started = not started, True
            if chat:
                return data(protocol.chat_chunk(job.id, model, job.created,
                                                content=event.text, role=role))
            return data(protocol.text_completion(job.id, model, job.created, event.text, None))
        final = True
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

    batch = first
    try:
        while True:
            # everything that arrived since the last wake-up goes out in one write
            yield "".join(render(event) for event in batch)
            if final:
                return
            # the first token went out at once; later ones gather for flush_s so that a 2-4
            # core board spends its cores on llama.cpp, not on one write per token
            batch = await events.get(linger=flush_s)
    finally:
        if not final:
            job.cancel()
            logger.info("client left the stream of %s; cancelled it", job.id)


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
    from edgerunner.runtime.http import ollama  # imports Inbox from here

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


# ---------------------------------------------------------------------------- listeners


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at `path` with `mode`; refuses to replace a live daemon's socket."""
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"{path} exists and is not a socket",
                              "choose another --socket path or remove that file")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left behind by a daemon that died without cleaning up
        else:
            raise ConfigError(f"another daemon is already listening on {path}",
                              "stop it, or pass a different --socket")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never visible with wider permissions than asked, even briefly
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            raise ConfigError(f"socket path {path} is too long for a unix socket (≤107 bytes)",
                              "pass a shorter --socket path") from exc
        raise ConfigError(f"cannot create socket {path}: {exc.strerror}",
                          "check the directory exists and is writable") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          "pick a free port or another --http address") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class _Server(uvicorn.Server):
    # the daemon owns SIGTERM/SIGINT (drain first, then stop the server)
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpTransport:
    """uvicorn serving the app on a unix socket and optionally TCP, inside the daemon's loop."""

    def __init__(self, app: Starlette, socket_path: Path, socket_mode: int = 0o660,
                 tcp: tuple[str, int] | None = None, graceful_s: float = 5.0, *,
                 max_connections: int = 256, idle_timeout_s: float = 10.0,
                 api_key_set: bool = False) -> None:
        self.app = app
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.tcp = tcp
        self.graceful_s = graceful_s
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.api_key_set = api_key_set
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []

    async def start(self) -> None:
        """Bind and serve; returns once uvicorn accepts connections."""
        self._sockets = [bind_unix_socket(self.socket_path, self.socket_mode)]
        try:
            if self.tcp is not None:
                self._sockets.append(bind_tcp(*self.tcp))
        except ConfigError:
            self._remove_socket()
            raise
        # below the open-file limit, so accept() never fails with EMFILE (each connection is
        # one descriptor); the rest are answered 503 and closed at once
        cap = connection_cap(self.max_connections)
        gate = Gate(cap)
        self._sockets = [gated(sock, gate) for sock in self._sockets]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=max(1, round(self.graceful_s)), server_header=False,
            http=protocol_class(gate, self.idle_timeout_s),
            timeout_keep_alive=max(1, round(self.idle_timeout_s)),
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=self._sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # surface the start-up failure
                raise RuntimeError("uvicorn stopped during start-up")
            await asyncio.sleep(0.01)
        logger.info("listening on unix:%s%s (at most %d connections)", self.socket_path,
                    f" and http://{self.tcp[0]}:{self.tcp[1]}" if self.tcp else "", cap)
        if self.tcp is not None and not is_loopback(self.tcp[0]):
            logger.warning(
                "http: listening on %s:%d, which other machines can reach; %s", *self.tcp,
                "requests need the API key" if self.api_key_set else
                "anyone on the network can use the model: set api_key_file (or "
                "EDGERUNNER_API_KEY), or bind 127.0.0.1")

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (bounded), remove the socket file."""
        try:
            if self._server is not None and self._task is not None:
                self._server.should_exit = True
                await self._task
        finally:
            self._remove_socket()

    def _remove_socket(self) -> None:
        for sock in self._sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def transport_from_config(config: ServeConfig, scheduler: Scheduler, info: InfoProvider,
                          metrics: MetricsProvider, served: ServedModel | None = None
                          ) -> HttpTransport:
    """The app and its listeners as `config` describes them (what the daemon serves)."""
    api_key = config.http_api_key()
    access = Access(api_key=api_key, allowed_hosts=frozenset(config.http_allowed_hosts),
                    allowed_origins=frozenset(config.http_allowed_origins))
    app = create_app(scheduler, info, metrics, max_body_bytes=config.max_body_bytes,
                     stream_flush_s=config.stream_flush_s, access=access, served=served)
    return HttpTransport(app, config.socket_path(), config.socket_mode, config.http_host_port(),
                         max_connections=config.max_connections,
                         idle_timeout_s=config.idle_timeout_s, api_key_set=api_key is not None)
