"""What both HTTP front-ends (OpenAI, Ollama) share: reading a bounded body, submitting to the
scheduler, relaying its events to the client as they arrive, and shaping errors' headers.

Each front-end keeps only its renderer: how one event looks on its wire (SSE chunks, NDJSON
lines) and how an error body looks. A client that goes away, before its first event or during
the stream, cancels its job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgerunner.runtime import protocol
from edgerunner.runtime.protocol import AnyRequest, Event, FinalEvent, RequestError
from edgerunner.runtime.scheduler import Job, Scheduler

logger = logging.getLogger(__name__)

Render = Callable[[Event], str]  # one event as the front-end writes it


class BodyTooLarge(RequestError):
    """The body is over max_body_bytes: refused before it is read to its end, so the connection
    cannot be reused (the rest of the body would be read as the next request)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_request", message)


async def read_json(request: Request, max_body_bytes: int) -> Any:
    """The body, bounded by max_body_bytes as it arrives (chunked too), then decoded."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise BodyTooLarge(f"request body is {declared} bytes; the limit is "
                           f"{max_body_bytes} (max_body_bytes)")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_body_bytes:
            raise BodyTooLarge(f"request body exceeds {max_body_bytes} bytes (max_body_bytes)")
    return protocol.decode_json(bytes(body))


def error_headers(exc: RequestError) -> dict[str, str]:
    """Retry-After for busy answers, `Connection: close` when the body was left unread."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, BodyTooLarge):
        headers["Connection"] = "close"
    return headers


class Inbox:
    """Events from the worker thread to one request's coroutine.

    The worker wakes the event loop only when the coroutine is waiting for events (or for the
    job's final event), so a stream that lingers between writes costs the loop nothing per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Event] = collections.deque()
        self._lock = threading.Lock()
        self._waiting = False  # the reader waits for the next event (put wakes it)
        self._wake_pending = False
        self._waiter: asyncio.Future[None] | None = None
        self._released = loop.time()  # when `get` last handed events out
        self._slow = False  # tokens come further apart than the linger
        self.wakeups = 0  # times the reader was woken (by a put or by its linger's timer)

    def put(self, event: Event) -> None:
        """Called from the worker thread (the scheduler's sink)."""
        with self._lock:
            self._items.append(event)
            urgent = self._waiting or isinstance(event, FinalEvent)
            if not urgent or self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._resolve()

    def _resolve(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self.wakeups += 1
            self._waiter.set_result(None)

    async def get(self, linger: float = 0.0) -> list[Event]:
        """Every event that has arrived, waiting for at least one. With `linger`, tokens
        gather: one batch per `linger` seconds at most, counted from the last one handed out
        (the job's final event is never held). A stream slower than that wakes the reader
        once per token, which goes out at once; a faster one once per batch, by a timer."""
        release_at = self._released + linger
        timed_out = False
        while True:
            with self._lock:
                now = self._loop.time()
                final = bool(self._items) and isinstance(self._items[-1], FinalEvent)
                if self._items and (now >= release_at or final):
                    items = list(self._items)
                    self._items.clear()
                    self._waiting = False
                    self._released = now
                    return items
                if self._items and self._slow:
                    self._slow = False  # a token came sooner than the linger: gather again
                elif timed_out:
                    self._slow = True  # the linger passed with nothing to send
                # a slow stream waits for its next token, a fast one for release_at
                self._waiting = not self._items and (self._slow or now >= release_at)
            self._waiter = self._loop.create_future()
            timer = None if self._waiting else self._loop.call_at(release_at, self._resolve)
            try:
                await self._waiter
            finally:
                if timer is not None:
                    timer.cancel()
            timed_out = self._loop.time() >= release_at


async def submit(scheduler: Scheduler, parsed: AnyRequest, request: Request, events: Inbox,
                 sink: Callable[[Event], None] | None = None
                 ) -> tuple[Job, list[Event] | None]:
    """Queue the request and wait for its first events; None for those if the client
    disconnected first (the job is cancelled). Submitted on the loop when that is quick (a
    short prompt, no grammar), else in a thread: submit tokenizes and may compile a grammar."""
    def queue() -> Job:
        return scheduler.submit(parsed, sink=sink or events.put)

    job = queue() if scheduler.prepares_quickly(parsed) else await run_in_threadpool(queue)
    return job, await _first_events(events, request, job)


async def _first_events(events: Inbox, request: Request, job: Job) -> list[Event] | None:
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    getter = asyncio.ensure_future(events.get())
    watcher = asyncio.ensure_future(disconnected())
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


async def relay(first: list[Event], events: Inbox, job: Job, render: Render,
                flush_s: float) -> AsyncIterator[str]:
    """The stream's body: each batch of events rendered as one write, until the final event
    (done or error); a client that leaves before it cancels the job."""
    final = False
    batch = first
    try:
        while True:
            # everything that arrived since the last wake-up goes out in one write
            final = isinstance(batch[-1], FinalEvent)
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
