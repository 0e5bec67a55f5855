"""Continuous batching on the real model: requests decoding together give what each gives alone.

"The same" means the same text, token for token. llama.cpp's CPU flash attention gives a
sequence the same numbers whatever else is in the batch as long as its KV cells lie in position
order in the cache, its prompt takes the same kernel path (under 64 rows here), and a lone
decode row does not span 512 cells or more (that takes a split-KV path cut by the cache's
span). A sequence that ends mid-run leaves a hole that llama.cpp fills with the next tokens of
the others, out of their order: from then on their last bits, and so possibly a greedy choice,
can differ. The tests below keep to the conditions under which identity holds (all run to
max_tokens; a cancel lands before the others' cells are laid) and say so.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from edgerunner.runtime.engine.batch import Generation, TextTail, prefill_chunks, sampler_chain
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.engine.sampling import SamplingParams
from edgerunner.runtime.engine.weights import llama_kwargs
from edgerunner.runtime.protocol import DoneEvent, ErrorEvent, RequestError
from edgerunner.runtime.scheduler import Job, Scheduler
from tests.runtime import conftest
from tests.runtime.conftest import Collector, loaded_engine, started

PLAN = conftest.PLAN.model_copy(update={"kv_type": "f16", "n_threads": 2, "n_parallel": 4})
# prompts with long answers: every request runs to max_tokens, so none ends early and leaves
# a hole in the others' cells (see the module docstring)
QUESTIONS = ["Write a story about a dragon.", "Describe the city of Paris in detail.",
             "Explain how a bicycle works.", "Tell me about the history of tea."]
SYSTEM = ("You are the kitchen assistant of a smart home. Answer in one short sentence and "
          "never mention that you are an AI.")
SCHEMA = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "color": {"type": "string"}},
    "required": ["name", "color"]}}}


def chat(content: str, **extra: Any) -> Any:
    """Greedy and 24 tokens unless told otherwise: answers the tests can compare."""
    return conftest.chat(content, **{"temperature": 0, "max_tokens": 24, **extra})


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[Engine]:
    with loaded_engine(default_model, PLAN) as eng:
        yield eng


def run_alone(scheduler: Scheduler, request: Any) -> DoneEvent:
    sink = Collector()
    scheduler.submit(request, sink=sink)
    final = sink.final()
    assert isinstance(final, DoneEvent), final
    return final


def run_together(scheduler: Scheduler, requests: list[Any]) -> tuple[list[Collector], int]:
    """Submit all at once; the sinks and the most jobs seen decoding at the same time."""
    sinks = [Collector() for _ in requests]
    most = 0
    for request, sink in zip(requests, sinks, strict=True):
        scheduler.submit(request, sink=sink)
    while not all(_ended(s) for s in sinks):
        most = max(most, scheduler.running)
        time.sleep(0.002)
    return sinks, most


def _ended(sink: Collector) -> bool:
    return any(isinstance(e, (DoneEvent, ErrorEvent)) for e in list(sink.seen))


def test_the_engine_alone_matches_llama_create_completion(
    engine: Engine, default_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # today's path, for the same tokens: Llama.create_completion with the same sampling
    engine.warm_up()  # as the daemon's worker does first: its stopped decode leaves nothing
    assert "removing memory module" not in capfd.readouterr().err  # nor a line in the log
    raw = llama_cpp.Llama(str(default_model), **llama_kwargs(PLAN, PLAN.n_threads))
    try:
        for question in QUESTIONS[:2]:
            for extra in ({}, {"temperature": 0.8, "seed": 7}):
                prepared = engine.prepare(chat(question, **extra), 24)
                old = raw.create_completion(prompt=prepared.prompt_tokens, max_tokens=24,
                                            stop=prepared.stop,
                                            **prepared.sampling.as_kwargs())
                new = engine.run(prepared, None, lambda: False)
                assert new.text == old["choices"][0]["text"]  # type: ignore[index]
    finally:
        raw.close()


def test_concurrent_greedy_requests_return_what_each_returns_alone(engine: Engine) -> None:
    with started(Scheduler(engine, queue_depth=8)) as scheduler:
        alone = [run_alone(scheduler, chat(q)) for q in QUESTIONS]
        sinks, most = run_together(scheduler, [chat(q, stream=True) for q in QUESTIONS])
    assert all(a.finish_reason == "length" for a in alone)  # the condition, not the result
    assert most == PLAN.n_parallel  # they did decode together
    for sink, single in zip(sinks, alone, strict=True):
        final = sink.final()
        assert isinstance(final, DoneEvent) and final.text == single.text
        assert "".join(sink.texts()) == single.text  # the stream adds up to the answer


def test_cancelling_one_leaves_the_others_unchanged(engine: Engine) -> None:
    with started(Scheduler(engine, queue_depth=8, heartbeat=lambda: _cancel_first(jobs))
                 ) as scheduler:
        jobs: list[Job] = []
        alone = [run_alone(scheduler, chat(q)).text for q in QUESTIONS[1:]]
        # the victim's 700-token prompt goes in first, 256 tokens a step; the others were
        # admitted beside it and wait for their prompt's turn; it is cancelled after one step
        victim = Collector()
        jobs.append(scheduler.submit(chat("word " * 700, max_tokens=8), sink=victim))
        others = [Collector() for _ in alone]
        for q, sink in zip(QUESTIONS[1:], others, strict=True):
            scheduler.submit(chat(q), sink=sink)
        final = victim.final()
        assert isinstance(final, ErrorEvent) and final.error.code == "cancelled"
        for sink, text in zip(others, alone, strict=True):
            done = sink.final()
            assert isinstance(done, DoneEvent) and done.text == text
        assert scheduler.stats.failed == {"cancelled": 1}
        # its cells went back at once: nothing is reserved once all ended
        assert engine.batcher.reserved_cells == 0 and engine.batcher.free_slots == 4


def _cancel_first(jobs: list[Job]) -> None:
    # the worker beats after every step: the victim is cancelled after its first one
    if jobs and jobs[0].started_ns:
        jobs[0].cancel()


def test_a_grammar_bound_request_beside_free_ones(engine: Engine) -> None:
    # the free ones stop at 8 tokens, all in the same step and before the JSON is done, so
    # their cells stay in order (module docstring); the bound one then finishes alone
    with started(Scheduler(engine, queue_depth=8)) as scheduler:
        free_alone = [run_alone(scheduler, chat(q, max_tokens=8)).text for q in QUESTIONS[:3]]
        sinks, most = run_together(scheduler, [
            chat("Describe a fruit.", max_tokens=60, response_format=SCHEMA),
            *(chat(q, max_tokens=8) for q in QUESTIONS[:3])])
    assert most == 4
    finals = [s.final() for s in sinks]
    assert all(isinstance(f, DoneEvent) for f in finals)
    bound = finals[0]
    assert isinstance(bound, DoneEvent) and bound.finish_reason == "stop"
    data = json.loads(bound.text)  # the grammar held with three free sequences beside it
    assert set(data) == {"name", "color"} and bound.usage.completion_tokens > 8
    assert [f.text for f in finals[1:] if isinstance(f, DoneEvent)] == free_alone


def test_a_request_waits_for_kv_cells_and_one_that_can_never_fit_is_refused(
    default_model: Path,
) -> None:
    plan = PLAN.model_copy(update={"n_ctx": 256, "prefix_cache_cells": 0})
    a_done_ns: list[int] = []

    def first_sink(event: Any) -> None:  # stamps when the worker hands over a's answer
        if isinstance(event, DoneEvent):
            a_done_ns.append(time.monotonic_ns())
        first(event)

    with loaded_engine(default_model, plan) as eng, \
            started(Scheduler(eng, queue_depth=8)) as scheduler:
        first_started = threading.Event()
        first = Collector(on_text=lambda e: first_started.set())
        scheduler.submit(chat("Tell me a story.", stream=True, max_tokens=150), sink=first_sink)
        assert first_started.wait(60)
        # a slot is free, but 150 + its prompt and this one's 150 + prompt exceed 256 cells
        second = Collector()
        job_b = scheduler.submit(chat("Tell me another story.", max_tokens=150), sink=second)
        time.sleep(0.3)
        assert scheduler.running == 1 and scheduler.depth == 1 and not job_b.started_ns
        with pytest.raises(RequestError) as refused:  # more than the whole context
            scheduler.submit(chat("Tell me a story.", max_tokens=250), sink=Collector())
        assert refused.value.code == "context_length_exceeded"
        assert isinstance(first.final(), DoneEvent)
        assert isinstance(second.final(), DoneEvent)
        assert job_b.started_ns > a_done_ns[0]  # it started once a's cells were back


def test_a_failed_shared_decode_is_retried_part_by_part(default_model: Path) -> None:
    """Prompt chunks that ride with a generating token in one llama_decode, and that together
    do not fit the free KV cells: each part is decoded again alone, in order, so the token and
    the first prompt go in and only the prompt that still does not fit is refused (busy)."""
    plan = PLAN.model_copy(update={"n_ctx": 256, "prefix_cache_cells": 0})
    with loaded_engine(default_model, plan) as eng:
        words = eng._tokenize(" ".join(f"word{i}" for i in range(300)), add_bos=False,
                              special=False)
        batcher = eng.batcher
        sampling = SamplingParams(temperature=0.0)

        def add(n: int, offset: int) -> Generation:
            return batcher.add(words[offset:offset + n], 8,
                               sampler_chain(eng._llm._model, sampling, None), [], None)

        x = add(200, 0)  # alone: its chunk is over MERGE_ROWS
        batcher.step()
        assert x.pending is not None and x.n_past == 200  # 56 cells left
        b, c = add(30, 200), add(30, 230)  # 1 + 30 + 30 rows ride together, 61 > 56 cells
        ended = batcher.step()
        assert x.n_past == 201 and len(x.completion) == 2 and x.error is None
        assert b.n_past == 30 and b.pending is not None and b.error is None
        assert ended == [c] and c.error is not None and c.error.code == "busy"
        assert c.n_past == 0
        for seq in (x, b, c):
            batcher.remove(seq)


@pytest.fixture(scope="module")
def cached(default_model: Path) -> Iterator[Engine]:
    with loaded_engine(default_model, PLAN, prefix_cache_cells=512) as eng:
        yield eng


def test_the_prefix_cache_serves_a_repeated_system_prompt_with_the_same_output(
    cached: Engine,
) -> None:
    engine = cached
    with started(Scheduler(engine, queue_depth=8)) as scheduler:
        cold = run_alone(scheduler, chat(QUESTIONS[0], system=SYSTEM))
        hits_before = scheduler.stats.prefix_cache_hits
        warm = run_alone(scheduler, chat(QUESTIONS[0], system=SYSTEM))
        other = run_alone(scheduler, chat(QUESTIONS[1], system=SYSTEM))
        stats = scheduler.stats
    assert stats.prefix_cache_hits == hits_before + 2
    assert stats.prefix_cache_tokens >= 2 * 30  # the system prompt's tokens, twice
    assert warm.text == cold.text
    # a different question behind the same system prompt: the same as it gives cold
    engine.batcher.cache.clear()
    with started(Scheduler(engine, queue_depth=8)) as scheduler:
        assert run_alone(scheduler, chat(QUESTIONS[1], system=SYSTEM)).text == other.text
        assert scheduler.stats.prefix_cache_hits == 0


def test_text_tail_holds_back_a_possible_stop_and_whole_utf8() -> None:
    tail = TextTail(["<|im_end|>", "STOP"])
    assert tail.push(b"Hello ") == "Hello "
    assert tail.push(b"<|im") == ""  # could be the start of a stop sequence
    assert tail.push(b"pressed") == "<|impressed"
    assert tail.push("é".encode()[:1]) == ""  # half a character
    assert tail.push("é".encode()[1:] + b" ST") == "é "
    assert tail.push(b"OP and more") == "" and tail.stopped
    assert tail.text == "Hello <|impressed\u00e9 "


def test_prefill_chunks_cut_where_the_whole_prompt_would_be_cut() -> None:
    assert prefill_chunks(0, 600, 256) == [(0, 256), (256, 512), (512, 600)]
    assert prefill_chunks(300, 600, 256) == [(300, 512), (512, 600)]
    assert prefill_chunks(10, 20, 256) == [(10, 20)]


def test_drain_finishes_every_running_request_and_shutdown_cancels_the_rest(
    engine: Engine,
) -> None:
    scheduler = Scheduler(engine, queue_depth=8)
    scheduler.start()
    try:
        sinks: list[Collector] = []
        for q in QUESTIONS:
            sink = Collector()
            scheduler.submit(chat(q, max_tokens=12), sink=sink)
            sinks.append(sink)
        assert scheduler.drain(60)  # all four, decoding together, ran to their end
        assert all(isinstance(s.final(), DoneEvent) for s in sinks)
        with pytest.raises(RequestError):  # draining: nothing new is taken
            scheduler.submit(chat("late"), sink=Collector())
    finally:
        scheduler.shutdown(0)
    scheduler = Scheduler(engine, queue_depth=8)
    with started(scheduler):
        long = [Collector() for _ in range(6)]  # four decode (their cells fit), two wait
        for sink in long:
            scheduler.submit(chat("Write a long story.", max_tokens=200), sink=sink)
        while scheduler.running < 4:
            time.sleep(0.01)
        assert not scheduler.shutdown(0)  # nothing drained in 0 s: all six cancelled
    finals = [s.final() for s in long]
    assert all(isinstance(f, ErrorEvent) and f.error.code == "cancelled" for f in finals)
    assert engine.batcher.reserved_cells == 0
