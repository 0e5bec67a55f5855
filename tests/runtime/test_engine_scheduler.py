"""The engine and scheduler on the real model, without any transport."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.protocol import (
    DoneEvent,
    ErrorEvent,
    RequestError,
    parse_request,
)
from edgerunner.runtime.scheduler import Job, Scheduler
from tests.runtime.conftest import PLAN, Collector, chat, loaded_engine, started

# a grammar that cannot end early: generation runs until max_tokens or a cancel
LONG = {"type": "json_schema", "json_schema": {"name": "nums", "schema": {
    "type": "array", "items": {"type": "integer"}, "minItems": 400}}}


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[Engine]:
    with loaded_engine(default_model, PLAN) as eng:
        yield eng


def hold_worker(scheduler: Scheduler, max_tokens: int = 3) -> tuple[threading.Event, Collector,
                                                                   Job]:
    """Submit a streaming job whose sink holds the worker until the returned gate is set."""
    gate, generating = threading.Event(), threading.Event()
    blocker = Collector(on_text=lambda e: (generating.set(), gate.wait(30)))
    # greedy digits under a grammar: the first piece streams at once (free text may be held
    # back to the end as a partial UTF-8 character, and then nothing runs after the gate)
    job = scheduler.submit(chat("n", max_tokens=max_tokens, stream=True, temperature=0,
                                response_format=LONG), sink=blocker)
    assert generating.wait(30)
    return gate, blocker, job


def test_chat_template_and_greedy_generation(engine: Engine) -> None:
    prepared = engine.prepare(chat("What is 2+2?", temperature=0, max_tokens=12), 100)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prepared.prompt_text  # GGUF template
    assert "<|im_end|>" in prepared.stop
    pieces: list[str] = []
    engine.run(prepared, None, lambda: False)  # warm the prompt cache (see test_client)
    first = engine.run(prepared, pieces.append, lambda: False)
    second = engine.run(prepared, None, lambda: False)
    assert first.text == second.text == "".join(pieces)  # greedy is deterministic
    assert first.prompt_tokens == len(prepared.prompt_tokens)
    assert 1 <= first.completion_tokens <= 12 + 3  # llama.cpp holds back partial UTF-8


def test_stop_sequence_ends_generation(engine: Engine) -> None:
    free = engine.run(engine.prepare(chat("Count: 1, 2, 3,", temperature=0, max_tokens=40),
                                     100), None, lambda: False)
    assert len(free.text) > 3
    cut = free.text[len(free.text) // 2:][:3].strip() or free.text[-2:]
    stopped = engine.run(engine.prepare(chat("Count: 1, 2, 3,", temperature=0, max_tokens=40,
                                             stop=[cut]), 100), None, lambda: False)
    assert cut not in stopped.text
    assert stopped.finish_reason == "stop"
    assert free.text.startswith(stopped.text)


def test_json_schema_output_parses_and_matches(engine: Engine) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    request = chat("Invent a person.", temperature=0, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    out = engine.run(engine.prepare(request, 100), None, lambda: False)
    data = json.loads(out.text)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"$ref": "#/definitions/missing"},
                                    {"type": "string", "pattern": "(["}])
def test_invalid_json_schema_is_a_request_error(engine: Engine, schema: dict) -> None:
    request = chat("x", response_format={"type": "json_schema",
                                         "json_schema": {"schema": schema}})
    with pytest.raises(RequestError) as info:
        engine.prepare(request, 10)
    assert info.value.code == "invalid_request"
    assert "json_schema" in info.value.message


def test_cancel_stops_within_one_token(engine: Engine) -> None:
    request = chat("numbers", temperature=0, max_tokens=300, response_format=LONG)
    pieces: list[str] = []
    # should_stop is polled inside llama.cpp too: it turns true once five pieces are out
    out = engine.run(engine.prepare(request, 100), pieces.append, lambda: len(pieces) >= 5)
    assert out.finish_reason is None  # interrupted
    assert len(pieces) == 5 and out.text == "".join(pieces)
    assert out.completion_tokens == 5  # the decode of the sixth token was aborted
    assert out.prompt_evaluated == out.prompt_tokens


def test_cancel_during_a_long_prompt_stops_within_a_batch(default_model: Path) -> None:
    plan = PLAN.model_copy(update={"n_ctx": 2048})
    with loaded_engine(default_model, plan) as eng:
        short = eng.prepare(chat("Say hi.", temperature=0, max_tokens=8), 8)
        before = eng.run(short, None, lambda: False)
        long = eng.prepare(parse_request("completion", {"prompt": "word " * 1500,
                                                        "max_tokens": 8}), 8)
        assert 1400 < len(long.prompt_tokens) < plan.n_ctx - 8
        calls = 0

        def stop_soon() -> bool:  # polled before each step: true from the second on
            nonlocal calls
            calls += 1
            return calls > 1

        out = eng.run(long, None, stop_soon)
        assert out.finish_reason is None and out.completion_tokens == 0 and out.text == ""
        # the prompt goes in by n_batch chunks, one per step: one chunk went in, not all six
        assert out.prompt_evaluated == plan.n_batch
        # the aborted decode left a usable context: the next request answers as before
        after = eng.run(short, None, lambda: False)
        assert after.finish_reason is not None and after.completion_tokens >= 1
        assert after.text == before.text


def test_job_cancelled_during_its_prompt_ends_cancelled_and_the_next_one_runs(
    engine: Engine,
) -> None:
    jobs: list[Job] = []

    def heartbeat() -> None:
        # the worker beats after every step: cancel at the first one the job ran in, while
        # its prompt (four n_batch chunks) is a quarter in
        if scheduler.busy and jobs:
            jobs[0].cancel()

    with started(Scheduler(engine, heartbeat=heartbeat)) as scheduler:
        sink = Collector()
        job = scheduler.submit(parse_request("completion", {"prompt": "word " * 900,
                                                            "max_tokens": 8}), sink=sink)
        jobs.append(job)
        final = sink.final()
        assert isinstance(final, ErrorEvent) and final.error.code == "cancelled"
        assert scheduler.stats.completion_tokens == 0
        assert scheduler.stats.prompt_tokens < len(job.prepared.prompt_tokens)  # cut short
        after = Collector()
        scheduler.submit(chat("hi", max_tokens=3), sink=after)
        assert isinstance(after.final(), DoneEvent)


def test_scheduler_admission_queue_and_events(engine: Engine) -> None:
    scheduler = Scheduler(engine, queue_depth=2, request_timeout_s=60)
    scheduler.start()
    try:
        with pytest.raises(RequestError) as info:
            scheduler.submit(chat("word " * 1500, max_tokens=100), sink=Collector())
        assert info.value.code == "context_length_exceeded"
        prompt_tokens = int(info.value.message.split("prompt is ")[1].split()[0])
        assert prompt_tokens > 1500 and "max_tokens is 100" in info.value.message
        assert "1024" in info.value.message

        with pytest.raises(RequestError) as info:
            scheduler.submit(chat("x", model="gpt-4"), sink=Collector())
        assert info.value.code == "model_not_found" and "smol" in info.value.message

        gate, blocker, running = hold_worker(scheduler, max_tokens=5)  # the queue is empty
        sinks = [Collector(), Collector()]
        queued = [scheduler.submit(chat(f"q{i}", max_tokens=3), sink=s)
                  for i, s in enumerate(sinks)]
        with pytest.raises(RequestError) as info:
            scheduler.submit(chat("one too many", max_tokens=3), sink=Collector())
        assert info.value.code == "busy" and info.value.retry_after is not None
        queued[0].cancel()
        gate.set()
        done = blocker.final()
        assert isinstance(done, DoneEvent) and "".join(blocker.texts()) == done.text
        cancelled = sinks[0].final()
        assert isinstance(cancelled, ErrorEvent) and cancelled.error.code == "cancelled"
        last = sinks[1].final()
        assert isinstance(last, DoneEvent) and last.usage.completion_tokens >= 1
        assert running.finished and queued[1].finished
        assert scheduler.stats.failed["cancelled"] == 1
        assert scheduler.stats.refused["busy"] == 1
    finally:
        assert scheduler.shutdown(5)


def test_queued_request_past_its_deadline_times_out(engine: Engine) -> None:
    with started(Scheduler(engine, queue_depth=4, request_timeout_s=0.2)) as scheduler:
        gate, blocker, _ = hold_worker(scheduler)
        waiting = Collector()
        scheduler.submit(chat("late", max_tokens=3), sink=waiting)
        threading.Timer(0.5, gate.set).start()
        first = blocker.final()
        late = waiting.final()
        assert isinstance(first, ErrorEvent) and first.error.code == "timeout"
        assert isinstance(late, ErrorEvent) and late.error.code == "timeout"
        assert "in the queue" in late.error.message


def test_explicit_deadline_expires_a_queued_job_with_its_own_message(engine: Engine) -> None:
    with started(Scheduler(engine, queue_depth=4, request_timeout_s=300)) as scheduler:
        gate, blocker, _ = hold_worker(scheduler)
        expiring, patient = Collector(), Collector()
        scheduler.submit(chat("late", max_tokens=3), sink=expiring,
                         deadline=time.monotonic() + 0.2)
        # a deadline after request_timeout_s cannot extend the job
        job = scheduler.submit(chat("ok", max_tokens=3), sink=patient,
                               deadline=time.monotonic() + 10_000)
        assert job.expires is None
        threading.Timer(0.5, gate.set).start()
        assert isinstance(blocker.final(), DoneEvent)
        late = expiring.final()
        assert isinstance(late, ErrorEvent) and late.error.code == "timeout"
        assert "expired before it could run" in late.error.message
        assert "message expiry" in late.error.message
        assert isinstance(patient.final(), DoneEvent)
        assert expiring.texts() == []  # answered, never generated


def test_explicit_deadline_stops_a_running_job(engine: Engine) -> None:
    with started(Scheduler(engine, queue_depth=4, request_timeout_s=300)) as scheduler:
        sink = Collector(on_text=lambda e: time.sleep(0.05))
        scheduler.submit(chat("numbers", max_tokens=400, response_format=LONG, stream=True),
                         sink=sink, deadline=time.monotonic() + 1.0)
        final = sink.final()
        assert isinstance(final, ErrorEvent) and final.error.code == "timeout"
        assert "while generating" in final.error.message
        assert sink.texts(), "it ran before its deadline passed"
        assert scheduler.stats.failed["timeout"] == 1


def test_shutdown_cancels_what_the_drain_did_not_finish(engine: Engine) -> None:
    scheduler = Scheduler(engine, queue_depth=4)
    scheduler.start()
    long_sink, queued_sink = Collector(), Collector()
    scheduler.submit(chat("numbers", max_tokens=400, response_format=LONG), sink=long_sink)
    scheduler.submit(chat("after", max_tokens=3), sink=queued_sink)
    assert scheduler.shutdown(drain_timeout=0.2) is False
    assert isinstance(long_sink.final(), ErrorEvent)
    queued = queued_sink.final()
    assert isinstance(queued, ErrorEvent) and queued.error.code == "cancelled"
    with pytest.raises(RequestError, match="shutting down"):
        scheduler.submit(chat("x"), sink=Collector())


def test_keep_alive_unloads_when_idle_and_reloads_on_demand(default_model: Path) -> None:
    engine = Engine(default_model, PLAN, name="smol")
    engine.load()
    with started(Scheduler(engine, keep_alive_s=0.2)) as scheduler:
        deadline = threading.Event()
        for _ in range(100):
            if not engine.loaded:
                break
            deadline.wait(0.05)
        assert not engine.loaded
        # admission still counts tokens while unloaded, then the worker reloads to answer
        with pytest.raises(RequestError, match="context window"):
            scheduler.submit(chat("word " * 1500, max_tokens=10), sink=Collector())
        sink = Collector()
        scheduler.submit(chat("hi", max_tokens=3), sink=sink)
        assert isinstance(sink.final(), DoneEvent)
        engine.close()


def test_submit_racing_shutdown_is_refused_not_dropped(engine: Engine) -> None:
    # admission runs after submit's first accepting check and before it queues: hold the
    # submit there while shutdown empties the queue, then let it go on
    entered, release = threading.Event(), threading.Event()

    def admission() -> None:
        entered.set()
        assert release.wait(30)

    scheduler = Scheduler(engine, admission=admission)
    scheduler.start()
    outcome: dict[str, Any] = {}
    sink = Collector()

    def submit() -> None:
        try:
            outcome["job"] = scheduler.submit(chat("late", max_tokens=3), sink=sink)
        except RequestError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=submit)
    thread.start()
    assert entered.wait(30)
    assert scheduler.shutdown(0) and scheduler.stopped
    release.set()
    thread.join(30)
    assert "job" not in outcome, "queued after shutdown: it would never get a final event"
    assert outcome["error"].code == "cancelled" and "shutting down" in outcome["error"].message
    assert scheduler.stats.refused["cancelled"] == 1 and sink.seen == []

    # and a plain submit from another thread after shutdown
    late: list[BaseException] = []
    after = threading.Thread(target=lambda: late.extend(
        _raised(lambda: scheduler.submit(chat("later"), sink=Collector()))))
    after.start()
    after.join(30)
    assert isinstance(late[0], RequestError) and late[0].code == "cancelled"


def _raised(call: Any) -> list[BaseException]:
    try:
        call()
    except BaseException as exc:
        return [exc]
    return []


def test_every_job_submitted_around_shutdown_gets_a_final_event(engine: Engine) -> None:
    # round k: shutdown starts once k jobs are in, while the submitter keeps going
    for head in range(8):
        jobs = _race_shutdown(engine, head)
        assert len(jobs) >= head
        for job, sink in jobs:
            assert job.wait(30), f"head start {head}: {job.id} never got a final event"
            assert sum(isinstance(e, (DoneEvent, ErrorEvent)) for e in sink.seen) == 1


def _race_shutdown(engine: Engine, head: int) -> list[tuple[Any, Collector]]:
    scheduler = Scheduler(engine, queue_depth=256)  # more than the 200 it may submit
    scheduler.start()
    jobs: list[tuple[Any, Collector]] = []
    refusals: list[RequestError] = []
    head_start = threading.Event()

    def submitter() -> None:
        for i in range(200):
            if i == head:
                head_start.set()
            sink = Collector()
            try:
                jobs.append((scheduler.submit(chat(f"{head} {i}", max_tokens=1), sink=sink),
                             sink))
            except RequestError as exc:
                refusals.append(exc)
                break
        head_start.set()

    thread = threading.Thread(target=submitter)
    thread.start()
    assert head_start.wait(30)
    scheduler.shutdown(0)
    thread.join(30)
    assert scheduler.stopped
    assert [r.code for r in refusals] == ["cancelled"]
    return jobs


def test_a_worker_that_does_not_stop_is_reported(engine: Engine) -> None:
    scheduler = Scheduler(engine)
    scheduler.start()
    gate, generating = threading.Event(), threading.Event()
    # a sink stuck on the worker thread stands in for a worker stuck inside llama.cpp
    sink = Collector(on_text=lambda e: (generating.set(), gate.wait(60)))
    job = scheduler.submit(chat("n", max_tokens=20, stream=True), sink=sink)
    assert generating.wait(30)
    try:
        scheduler.shutdown(drain_timeout=0, join_timeout=0.2)
        assert not scheduler.stopped  # the engine must not be freed yet
    finally:
        gate.set()
    final = sink.final()
    assert isinstance(final, ErrorEvent) and final.error.code == "cancelled"
    assert job.finished
    for _ in range(600):
        if scheduler.stopped:
            break
        gate.wait(0.05)
    assert scheduler.stopped


class SlowLoadEngine(Engine):
    """An Engine whose weights take until `release` is set to map (a slow SD card)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loading, self.release = threading.Event(), threading.Event()

    def _open_model(self) -> Any:
        self.loading.set()
        assert self.release.wait(60)
        return super()._open_model()


def test_admission_answers_while_the_model_reloads(default_model: Path) -> None:
    engine = SlowLoadEngine(default_model, PLAN, name="smol")  # unloaded, as after keep_alive
    beats: list[float] = []
    scheduler = Scheduler(engine, heartbeat=lambda: beats.append(time.monotonic()))
    scheduler.start()
    try:
        first = Collector()
        scheduler.submit(chat("hi", max_tokens=3), sink=first)
        assert engine.loading.wait(30)  # the worker is inside the reload
        answered: list[Any] = []

        def admit() -> None:
            answered.append(scheduler.submit(chat("second", max_tokens=3), sink=second))
            answered.extend(_raised(lambda: scheduler.submit(chat("word " * 1500), sink=second)))

        second = Collector()
        thread = threading.Thread(target=admit)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "admission waited for the reload"
        assert not engine.release.is_set() and not engine.loaded
        assert isinstance(answered[1], RequestError)
        assert answered[1].code == "context_length_exceeded"
        # the watchdog's heartbeat keeps coming while the worker is inside the load
        during = len(beats)
        for _ in range(3000):
            if len(beats) > during:
                break
            time.sleep(0.01)
        assert len(beats) > during and not engine.loaded
        engine.release.set()
        assert isinstance(first.final(), DoneEvent) and isinstance(second.final(), DoneEvent)
    finally:
        engine.release.set()
        scheduler.shutdown(5)
        engine.close()
