"""One inference worker decoding up to n_parallel requests together, a bounded FIFO queue,
deadlines and cancellation.

Contract for transports (HTTP, MQTT, anything else):

    job = scheduler.submit(request, sink=callback)   # ChatCompletionRequest | CompletionRequest
    job = scheduler.submit(request, sink=callback, deadline=time.monotonic() + expiry_s)

* `submit` validates admission on the caller's thread and raises `RequestError` at once for
  `context_length_exceeded` (names prompt tokens, max_tokens and n_ctx), `memory_pressure`,
  `busy` (a `BusyError` with `.retry_after` seconds: queue full), or `cancelled` when the daemon
  is draining. Nothing was queued when it raises.
* Otherwise the job is queued and `sink(event)` is later called **from the worker thread**, in
  order: zero or more `TextEvent(text)` (only when `request.stream` is true; with tools also
  `ToolDeltaEvent` and `ToolCallEvent`, and the text is the content), then exactly one
  `DoneEvent(text, finish_reason, usage)` or `ErrorEvent(RequestError)`. Every job gets exactly
  one final event — a job is never dropped silently. The sink must be quick and thread-safe
  (e.g. `loop.call_soon_threadsafe(queue.put_nowait, event)` for asyncio, or a paho publish). If
  the sink raises, the job is cancelled.
* Up to `engine.n_parallel` jobs run at once (continuous batching: the worker's every step
  decodes a token of each, and a chunk of a newcomer's prompt). A job starts when a slot is free
  and the KV cells it may need (prompt + max_tokens) are not reserved by the running ones;
  until then it waits in the queue, in order.
* `job.cancel()` (any thread) stops generation within one step (a token, or one n_batch chunk
  while the prompt is evaluated) and frees its KV cells; the final event is then
  `ErrorEvent(code="cancelled")`. The other running jobs are not affected.
* Every job has the daemon's `request_timeout_s`; `deadline=` (absolute `time.monotonic()`,
  e.g. from MQTT Message Expiry) can only make it earlier. A job whose deadline passes while
  queued is answered with `ErrorEvent(code="timeout")` without generating (the message says
  "expired before it could run" for an explicit deadline); one that passes mid-generation stops
  and gets the same timeout code after the text already streamed.
* `job.id` ("chatcmpl-..." / "cmpl-..."), `job.created` and `scheduler.model_name` are what the
  response objects carry (see protocol.chat_completion / chat_chunk / text_completion).
* Transports never touch llama.cpp; only this module's worker calls the Engine.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from edgerunner.runtime.engine.batch import Generation
from edgerunner.runtime.engine.core import Engine, Prepared
from edgerunner.runtime.protocol import (
    AnyRequest,
    BusyError,
    ChatCompletionRequest,
    DoneEvent,
    ErrorEvent,
    Event,
    RequestError,
    TextEvent,
    Usage,
)

logger = logging.getLogger(__name__)

Sink = Callable[[Event], None]
IDLE_WAKEUP_S = 1.0  # an idle worker still beats this often
WORKER_STOP_S = 5.0  # a cancelled job ends within a token or a ubatch; longer means stuck
AdmissionCheck = Callable[[], None]
# a prompt this long (about 4,000 tokens) renders and tokenizes in a few milliseconds
QUICK_PROMPT_CHARS = 16_384


@dataclass
class Job:
    """One queued or running request."""

    request: AnyRequest
    prepared: Prepared
    sink: Sink
    deadline: float  # submit time + request_timeout_s (monotonic): then the job fails, `timeout`
    expires: float | None = None  # the caller's own deadline (submit(deadline=)), if earlier
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    submitted: float = field(default_factory=time.monotonic)
    started_ns: int = 0  # time.monotonic_ns() when the worker began it; 0 while it waits
    started: float = 0.0  # time.monotonic() of the same moment
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cells(self) -> int:
        """KV cells this job may come to hold."""
        return len(self.prepared.prompt_tokens) + self.prepared.max_tokens

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if isinstance(self.request, ChatCompletionRequest) else "cmpl"
            self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"

    def cancel(self) -> None:
        """Ask the worker to stop this job (within one token if it is running)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def overdue(self, now: float) -> bool:
        """True once the request timeout or the caller's deadline has passed."""
        return now > self.deadline or (self.expires is not None and now > self.expires)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the final event was delivered."""
        return self._finished.wait(timeout)


@dataclass
class Stats:
    """Counters for /metrics and /health."""

    submitted: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    refused: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0  # summed over jobs (overlapping when they run together)
    avg_job_seconds: float = 2.0  # moving average, seeds the Retry-After hint
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prefix_cache_tokens: int = 0  # prompt tokens the prefix cache supplied


class Scheduler:
    """Owns the Engine through one worker thread; transports only call submit/cancel."""

    # The worker alone touches the engine and the jobs in `_active`; `_cond` guards the queue,
    # `_active`'s membership and the flags submit/drain/shutdown read.

    def __init__(
        self,
        engine: Engine,
        *,
        queue_depth: int = 8,
        request_timeout_s: float = 300.0,
        default_max_tokens: int = 512,
        keep_alive_s: float = 0.0,
        admission: AdmissionCheck | None = None,
        log_prompts: bool = False,
        heartbeat: Callable[[], None] | None = None,
        before_job: Callable[[Engine], None] | None = None,
        reload_budget_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.queue_depth = queue_depth
        self.request_timeout_s = request_timeout_s
        self.default_max_tokens = default_max_tokens
        self.keep_alive_s = keep_alive_s
        self.admission = admission
        self.log_prompts = log_prompts
        # heartbeat: called on every worker wake-up and token (feeds the systemd watchdog)
        self.heartbeat = heartbeat or (lambda: None)
        # before_job: runs on the worker thread before each job (thermal thread changes)
        self.before_job = before_job
        # a keep_alive reload beats the heartbeat for up to this long (then a hung load shows)
        self.reload_budget_s = reload_budget_s
        self.stats = Stats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: dict[Generation, Job] = {}
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.warmed = threading.Event()  # set once the worker's warm-up decode is over
        self._last_activity = time.monotonic()

    @property
    def model_name(self) -> str:
        return self.engine.name

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running ones)."""
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> int:
        """Jobs decoding now (slots in use)."""
        with self._cond:
            return len(self._active)

    @property
    def slots(self) -> int:
        """Jobs that can decode together."""
        return self.engine.n_parallel

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        """Start the worker and accept work (the engine should already be loaded)."""
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name="edgerunner-worker", daemon=True)
        self._thread.start()

    def prepares_quickly(self, request: AnyRequest) -> bool:
        """True when `submit` does no slow work for `request`: no grammar to build, a prompt
        of at most QUICK_PROMPT_CHARS and the weights' vocabulary loaded (so a short template
        and tokenization, about a millisecond). A transport may then submit from its event loop
        rather than hand it to a thread, whose wake-up the request would otherwise wait for."""
        fmt = request.response_format
        if not self.engine.loaded or (fmt is not None and fmt.type != "text") \
                or getattr(request, "tools", None):
            return False
        if isinstance(request, ChatCompletionRequest):
            chars = sum(len(m.text()) for m in request.messages)
        else:
            chars = len(request.prompt)
        return chars <= QUICK_PROMPT_CHARS

    def submit(self, request: AnyRequest, *, sink: Sink, deadline: float | None = None,
               job_id: str = "") -> Job:
        """Admit and queue a request; RequestError if it cannot be taken (nothing queued then).

        `deadline` (a `time.monotonic()` value) ends the job earlier than request_timeout_s;
        `job_id` is the id the transport already answers with (a new one when empty).
        """
        try:
            return self._submit(request, sink, deadline, job_id)
        except RequestError as exc:
            self.stats.refused[exc.code] += 1
            raise

    def _submit(self, request: AnyRequest, sink: Sink, deadline: float | None,
                job_id: str) -> Job:
        if not self._accepting:
            raise RequestError("cancelled", "the daemon is shutting down; retry on another device")
        if request.model is not None and request.model != self.model_name:
            raise RequestError("model_not_found",
                               f"model {request.model!r} is not served here; this daemon serves "
                               f"{self.model_name!r} (see /v1/models), or leave `model` out")
        prepared = self.engine.prepare(request, self.default_max_tokens)
        n_prompt, n_ctx = len(prepared.prompt_tokens), self.engine.n_ctx
        if n_prompt + prepared.max_tokens > n_ctx:
            raise RequestError(
                "context_length_exceeded",
                f"prompt is {n_prompt} tokens and max_tokens is {prepared.max_tokens}: "
                f"{n_prompt + prepared.max_tokens} > the context window of {n_ctx} tokens; "
                "shorten the prompt or lower max_tokens",
            )
        if self.admission is not None:
            self.admission()
        timeout_at = time.monotonic() + self.request_timeout_s
        # with tools the sink hears content, call deltas and calls, not raw text
        job = Job(request=request, prepared=prepared, sink=prepared.sink(sink),
                  deadline=timeout_at,
                  expires=deadline if deadline is not None and deadline < timeout_at else None,
                  id=job_id)
        with self._cond:
            # checked again under the lock: shutdown() may have emptied the queue since the
            # check above, and a job appended after that would never get its final event
            if self._stopping or not self._accepting:
                raise RequestError("cancelled",
                                   "the daemon is shutting down; retry on another device")
            if len(self._queue) >= self.queue_depth:
                raise self.busy_error()
            self._queue.append(job)
            self.stats.submitted += 1
            self._cond.notify()
        logger.info("queued", extra={"event": "queued", "job": job.id, "prompt_tokens": n_prompt,
                                     "max_tokens": prepared.max_tokens})
        if self.log_prompts:
            logger.info("prompt %s: %r", job.id, prepared.prompt_text)
        return job

    def busy_error(self, waiting_elsewhere: int = 0) -> BusyError:
        """The one `busy` answer: how many wait, and when to retry. `waiting_elsewhere` counts
        requests a transport holds that will queue here first (MQTT's admission queue)."""
        with self._cond:
            waiting = len(self._queue) + waiting_elsewhere
        # those and a running one, n_parallel at a time, at the recent average job length
        rounds = (waiting + 1) / self.slots
        retry_after = float(max(1, min(120, math.ceil(self.stats.avg_job_seconds * rounds))))
        return BusyError(f"queue full ({waiting} waiting); retry later", retry_after=retry_after)

    def stop_accepting(self) -> None:
        """New submits fail with `cancelled`; queued and running work continues."""
        self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Stop accepting, wait up to `timeout` for queued and running work; True if all done."""
        self.stop_accepting()
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._active:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    @property
    def stopped(self) -> bool:
        """True once the worker thread has ended (or never started): the engine is free."""
        return self._thread is None or not self._thread.is_alive()

    def shutdown(self, drain_timeout: float = 0.0, join_timeout: float | None = None) -> bool:
        """Drain, cancel whatever is left, stop the worker; True if nothing had to be cancelled.

        A cancelled job stops within one step (a token, or one n_batch chunk of its prompt); a
        worker still running `join_timeout` (default WORKER_STOP_S) seconds later is stuck, and
        `stopped` stays False.
        """
        join_timeout = WORKER_STOP_S if join_timeout is None else join_timeout
        clean = self.drain(drain_timeout)
        with self._cond:
            leftovers = list(self._queue)
            self._queue.clear()
            for running in self._active.values():
                running.cancel()
            self._stopping = True
            self._cond.notify_all()
        for job in leftovers:
            self._finish(job, ErrorEvent(RequestError(
                "cancelled", "the daemon shut down before this request ran; retry")))
        if self._thread is not None:
            self._thread.join(timeout=join_timeout)
            if self._thread.is_alive():
                logger.error("the inference worker did not stop within %g s of its cancel",
                             join_timeout)
        return clean and not leftovers

    # -- worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        self._warm_up()
        self.warmed.set()
        while self._wait_for_work():
            try:
                if self._queue and not self.engine.loaded and not self._reloaded():
                    continue
                while (job := self._admit()) is not None:
                    self._begin(job)
                if self._active:
                    self._step()
            except Exception as exc:  # the worker must survive anything a step does
                logger.exception("inference step failed")
                self._fail_active(RequestError(
                    "internal_error", f"generation failed: {type(exc).__name__}: {exc}"))

    def _warm_up(self) -> None:
        # on this thread, the one that decodes (the daemon waits for it before READY)
        try:
            self.engine.warm_up()
        except Exception:  # a warm-up is never a reason to stop serving
            logger.exception("warm-up decode failed")

    def _reloaded(self) -> bool:
        """Load the weights keep_alive unloaded; if that fails, the queue's head gets the error
        (the next one tries again) and False is returned."""
        try:
            self._reload()
            return True
        except Exception as exc:
            logger.exception("reloading the model failed")
            with self._cond:
                job = self._queue.popleft() if self._queue else None
            if job is not None:
                self._finish(job, ErrorEvent(RequestError(
                    "internal_error", f"the model failed to load: {type(exc).__name__}: {exc}")))
            return False

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do (unloading after keep_alive); False: stop."""
        with self._cond:
            while not self._queue and not self._active and not self._stopping:
                idle_for = time.monotonic() - self._last_activity
                if self.keep_alive_s > 0 and self.engine.loaded and idle_for >= self.keep_alive_s:
                    self._cond.release()
                    try:
                        self.engine.unload()
                    finally:
                        self._cond.acquire()
                    continue
                wait = IDLE_WAKEUP_S
                if self.keep_alive_s > 0 and self.engine.loaded:
                    wait = min(wait, max(0.05, self.keep_alive_s - idle_for))
                self._cond.wait(wait)
                self.heartbeat()
            # stopping: the running jobs were cancelled; they end over the next step
            return not (self._stopping and not self._active)

    def _admit(self) -> Job | None:
        """The queue's head, once a slot and its KV cells are free (or it ends unrun)."""
        with self._cond:
            if not self._queue or self._stopping:
                return None
            job = self._queue[0]
            ends_unrun = job.cancelled or job.overdue(time.monotonic())
            if not ends_unrun and not (self.engine.loaded
                                       and self.engine.batcher.room_for(job.cells)):
                # it waits, and the jobs behind it, until running ones end (or, unloaded,
                # until the worker's next turn reloads the weights)
                return None
            return self._queue.popleft()

    def _begin(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job, ErrorEvent(RequestError("cancelled", "request was cancelled")))
            return
        if job.overdue(time.monotonic()):
            self._finish(job, ErrorEvent(self._timeout(job, queued=True)))
            return
        job.started_ns = time.monotonic_ns()
        job.started = time.monotonic()
        self.heartbeat()
        if self.before_job is not None:
            self.before_job(self.engine)

        def on_text(text: str) -> None:
            try:
                job.sink(TextEvent(text))
            except Exception:
                logger.warning("sink of %s failed; cancelling it", job.id, exc_info=True)
                job.cancel()

        try:
            generation = self.engine.start(job.prepared, on_text if job.request.stream else None)
        except Exception as exc:
            logger.exception("job %s could not start", job.id)
            self._finish(job, ErrorEvent(RequestError(
                "internal_error", f"generation failed to start: {type(exc).__name__}: {exc}")))
            return
        with self._cond:
            self._active[generation] = job

    def _step(self) -> None:
        ended = set(self.engine.step())
        self.heartbeat()
        now = time.monotonic()
        for generation, job in list(self._active.items()):
            # ended in this step, or stopped: either way its KV cells go back now
            if generation in ended or job.cancelled or job.overdue(now):
                self._complete(generation, job)

    def _fail_active(self, error: RequestError) -> None:
        for generation, job in list(self._active.items()):
            with self._cond:
                del self._active[generation]
            try:
                self.engine.end(generation)
            except Exception:
                logger.exception("could not free the sequence of %s", job.id)
            self._finish(job, ErrorEvent(error))
        self._idle_if_empty()

    def _complete(self, generation: Generation, job: Job) -> None:
        """Take a job's sequence out of the batch and send its final event."""
        outcome = self.engine.end(generation)
        with self._cond:
            del self._active[generation]
        elapsed = time.monotonic() - job.started
        self.stats.avg_job_seconds = 0.8 * self.stats.avg_job_seconds + 0.2 * elapsed
        self.stats.prompt_tokens += outcome.prompt_evaluated
        self.stats.completion_tokens += outcome.completion_tokens
        self.stats.generation_seconds += elapsed
        if outcome.cached_tokens:
            self.stats.prefix_cache_hits += 1
            self.stats.prefix_cache_tokens += outcome.cached_tokens
        elif self.engine.prefix_cache_cells:
            self.stats.prefix_cache_misses += 1
        self._idle_if_empty()
        if generation.error is not None:
            self._finish(job, ErrorEvent(generation.error))
            return
        if outcome.finish_reason is None:
            error = (RequestError("cancelled", "request was cancelled") if job.cancelled else
                     self._timeout(job, queued=False))
            self._finish(job, ErrorEvent(error))
            return
        usage = Usage(prompt_tokens=outcome.prompt_tokens,
                      completion_tokens=outcome.completion_tokens,
                      total_tokens=outcome.prompt_tokens + outcome.completion_tokens)
        logger.info("done", extra={"event": "done", "job": job.id, "seconds": elapsed,
                                   "finish_reason": outcome.finish_reason,
                                   "completion_tokens": outcome.completion_tokens,
                                   "cached_tokens": outcome.cached_tokens})
        if self.log_prompts:
            logger.info("output %s: %r", job.id, outcome.text)
        self._finish(job, DoneEvent(outcome.text, outcome.finish_reason, usage))

    def _idle_if_empty(self) -> None:
        with self._cond:
            if not self._active:
                self._last_activity = time.monotonic()
            self._cond.notify_all()

    def _reload(self) -> None:
        # mapping the weights again can outlast the watchdog's silence limit: beat meanwhile,
        # but only for the time a load may take, so a load that hangs still stops the pings
        done = threading.Event()

        def beat() -> None:
            end = time.monotonic() + self.reload_budget_s
            while not done.wait(IDLE_WAKEUP_S) and time.monotonic() < end:
                self.heartbeat()

        beater = threading.Thread(target=beat, name="edgerunner-reload-beat", daemon=True)
        beater.start()
        try:
            self.engine.load()
        finally:
            done.set()
            beater.join()
        self._warm_up()
        self.heartbeat()

    def _timeout(self, job: Job, *, queued: bool) -> RequestError:
        # the caller's deadline binds when it was set (it is never later than the timeout)
        if job.expires is not None:
            if queued:
                return RequestError(
                    "timeout", "request expired before it could run (message expiry: its "
                    "deadline passed while it waited in the queue); send it again with a longer "
                    "expiry, or when the device is less busy")
            return RequestError(
                "timeout", "request ran past its deadline (message expiry) while generating; "
                "give it a longer expiry or lower max_tokens")
        if queued:
            return RequestError(
                "timeout", f"request waited longer than {self.request_timeout_s:g} s in the "
                "queue; retry, or raise request_timeout_s")
        return RequestError(
            "timeout", f"request ran past its {self.request_timeout_s:g} s timeout; "
            "lower max_tokens or raise request_timeout_s")

    def _finish(self, job: Job, event: DoneEvent | ErrorEvent) -> None:
        if isinstance(event, DoneEvent):
            self.stats.completed += 1
        else:
            self.stats.failed[event.error.code] += 1
            logger.info("failed", extra={"event": "failed", "job": job.id,
                                         "code": event.error.code})
        try:
            job.sink(event)
        except Exception:
            logger.warning("sink of %s failed on its final event", job.id, exc_info=True)
        finally:
            job._finished.set()
