"""Continuous batching over llama.cpp's batch API.

Up to `n_parallel` sequences share one llama.cpp context (a unified KV cache of n_ctx cells).
Each `step()` decodes the next token of every sequence that is generating and one n_batch
chunk of a prompt still being evaluated (short prompts in the same llama_decode as the
tokens), so a long prompt goes in by chunks between the others' tokens instead of freezing
their streams. Each
sequence samples with its own `llama_sampler` chain (the chain llama-cpp-python's
`Llama.create_completion` builds, so a sequence decoded alone gives the same tokens), and its
KV cells are freed the moment it ends or is stopped.

The shared-prefix cache (`PrefixCache`) keeps the KV cells of recent prompts under sequence
ids of their own; a new prompt that starts the same way gets those cells by `seq_cp` (cell
metadata only: the data is shared, not copied) and evaluates only the rest.

Only the scheduler's worker thread uses a Batcher.
"""

from __future__ import annotations

import ctypes
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from llama_cpp import llama_grammar
from llama_cpp._internals import LlamaContext, LlamaModel, LlamaSampler

from edgerunner.pack.llama_log import llama_log_hook
from edgerunner.runtime.engine.sampling import SamplingParams
from edgerunner.runtime.engine.tools.grammar import ToolGrammar, add_to_chain
from edgerunner.runtime.protocol import FinishReason, RequestError

logger = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size) default, so penalties agree
MIN_CACHED_PREFIX = 8  # a shorter shared prefix is not worth a cache entry
REEVALUATED = 2  # prompt tokens evaluated again even when the cache holds the whole prompt
# GGML_FA_TILE_Q: from this many query rows in one llama_decode, llama.cpp's CPU flash attention
# takes its tiled path; below it, each row is computed on its own, whatever else is in the batch
MERGE_ROWS = 64
# the warm-up's abort callback (llama.cpp asks it between graph nodes), and none
_STOP_AT_ONCE = llama_cpp.ggml_abort_callback(lambda _data: True)
_NO_ABORT = llama_cpp.ggml_abort_callback()


def chunk_end(start: int, end: int, n_batch: int) -> int:
    """Where the llama_decode batch of prompt positions from `start` stops: at the next
    multiple of n_batch (where evaluating the whole prompt from 0 cuts it, as Llama.eval
    does), or at the prompt's `end`."""
    return min(end, (start // n_batch + 1) * n_batch)


def prefill_chunks(start: int, end: int, n_batch: int) -> list[tuple[int, int]]:
    """Prompt positions [start, end) as the llama_decode batches `chunk_end` cuts them into."""
    chunks = []
    while start < end:
        chunks.append((start, chunk_end(start, end, n_batch)))
        start = chunks[-1][1]
    return chunks


def sampler_chain(model: LlamaModel, sampling: SamplingParams,
                  grammar: llama_grammar.LlamaGrammar | None,
                  tool_grammar: ToolGrammar | None = None) -> LlamaSampler:
    """The sampler chain Llama.create_completion builds for these parameters (llama.py's
    `_init_sampler`), so that one sequence samples here exactly as it would there; a tool
    grammar sits where a json_schema grammar would (lazy under tool_choice auto)."""
    chain = LlamaSampler()
    chain.add_penalties(
        n_vocab=model.n_vocab(),
        penalty_last_n=PENALTY_LAST_N,
        penalty_repeat=sampling.repeat_penalty,
        penalty_freq=sampling.frequency_penalty,
        penalty_present=sampling.presence_penalty,
    )
    if grammar is not None:
        chain.add_grammar(model, grammar)
    if tool_grammar is not None:
        add_to_chain(chain, model, tool_grammar)
    temp = sampling.temperature
    seed = sampling.seed
    if seed is None:
        seed = random.randrange(2**32)
    if temp < 0.0:
        chain.add_dist(seed)
    elif temp == 0.0:
        chain.add_greedy()
    else:
        chain.add_top_k(sampling.top_k)
        chain.add_typical(1.0, 1)
        chain.add_top_p(sampling.top_p, 1)
        chain.add_min_p(sampling.min_p, 1)
        chain.add_temp(temp)
        chain.add_dist(seed)
    return chain


class TextTail:
    """A completion's bytes as they arrive: releases text that is whole UTF-8 and cannot be the
    start of a stop sequence, and notices a stop sequence (`stopped`), as create_completion
    does: the first of `stops` (in their order) found in the text ends it, text before it stays."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s.encode("utf-8") for s in stops if s]
        self._data = b""
        self._released = 0  # bytes of _data already handed out
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that can be released now ('' if none)."""
        self._data += piece
        found = [s for s in self._stops if s in self._data]
        if found:
            self._data = self._data[:self._data.index(found[0])]
            self.stopped = True
            return self._release(len(self._data))
        hold = 0
        for stop in self._stops:  # the longest tail of the text that begins a stop sequence
            for i in range(min(len(stop), len(self._data) - self._released), 0, -1):
                if self._data.endswith(stop[:i]):
                    hold = max(hold, i)
                    break
        end = len(self._data) - hold
        return self._release(_whole_utf8(self._data, self._released, end))

    def finish(self) -> str:
        """Everything not yet released (the generation ended)."""
        return self._release(len(self._data))

    @property
    def text(self) -> str:
        return self._data.decode("utf-8", errors="ignore")

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        out = self._data[self._released:end].decode("utf-8", errors="ignore")
        self._released = end
        return out


def _whole_utf8(data: bytes, start: int, end: int) -> int:
    """`end`, moved back so data[start:end] does not stop inside a UTF-8 character."""
    k = end
    while k > start and k > end - 4 and data[k - 1] & 0xC0 == 0x80:
        k -= 1  # continuation bytes: find the lead byte
    if k > start:
        lead = data[k - 1]
        need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else \
            4 if lead & 0xF8 == 0xF0 else 1
        if end - (k - 1) < need:
            return k - 1
    return end


@dataclass(eq=False)
class Generation:
    """One request in the batch: its prompt, its place in the KV cache and its sampler."""

    seq_id: int
    prompt: list[int]
    max_tokens: int
    sampler: LlamaSampler
    tail: TextTail
    on_text: Callable[[str], None] | None
    n_past: int = 0  # tokens of this sequence in the KV cache
    cached: int = 0  # prompt tokens the prefix cache supplied
    completion: list[int] = field(default_factory=list)  # sampled tokens, EOG excluded
    pending: int | None = None  # the last sampled token, decoded in the next step
    finish_reason: FinishReason | None = None
    error: RequestError | None = None

    @property
    def prefilling(self) -> bool:
        return self.pending is None and not self.done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def prompt_evaluated(self) -> int:
        return min(self.n_past, len(self.prompt))

    @property
    def cells(self) -> int:
        """KV cells this sequence may come to hold: prompt plus every token it may sample."""
        return len(self.prompt) + self.max_tokens


@dataclass
class _Entry:
    seq_id: int
    tokens: list[int]
    used: float


class PrefixCache:
    """Recent prompts' KV cells, kept under sequence ids of their own, at most `budget` cells
    over at most `len(seq_ids)` prompts; least recently used goes first."""

    def __init__(self, memory: Any, seq_ids: list[int], budget: int) -> None:
        self._memory = memory
        self._free = list(seq_ids)
        self.budget = budget if seq_ids else 0
        self._entries: list[_Entry] = []

    @property
    def cells(self) -> int:
        return sum(len(e.tokens) for e in self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[_Entry, int] | None:
        """The entry sharing the longest prefix with `prompt`, and how much of it to reuse:
        all but the prompt's last REEVALUATED tokens at most. Its last token's logits give
        the first sample; and evaluated as a batch of one row, llama.cpp's flash attention
        takes its split-KV path, which rounds differently from the batch that evaluated it
        cold: a repeated request would not sample its first token from the same numbers."""
        best: tuple[_Entry, int] | None = None
        for entry in self._entries:
            n = _common_prefix(entry.tokens, prompt)
            if best is None or n > best[1]:
                best = (entry, n)
        n = 0 if best is None else min(best[1], len(prompt) - REEVALUATED)
        if best is None or n < MIN_CACHED_PREFIX:
            return None
        entry = best[0]
        entry.used = time.monotonic()
        return entry, n

    def store(self, seq_id: int, prompt: list[int]) -> None:
        """Keep the cells of `seq_id`'s whole prompt (evaluated just now) for later prompts."""
        if len(prompt) < MIN_CACHED_PREFIX or len(prompt) > self.budget:
            return
        for entry in self._entries:
            if entry.tokens[:len(prompt)] == prompt:
                entry.used = time.monotonic()  # already held (this prompt, or one it begins)
                return
        # a cached prompt that this one extends is superseded by it
        for entry in [e for e in self._entries if prompt[:len(e.tokens)] == e.tokens]:
            self._drop(entry)
        while self._entries and (not self._free or self.cells + len(prompt) > self.budget):
            self._drop(min(self._entries, key=lambda e: e.used))
        if not self._free:
            return
        cache_id = self._free.pop()
        llama_cpp.llama_memory_seq_cp(self._memory, seq_id, cache_id, 0, len(prompt))
        self._entries.append(_Entry(cache_id, list(prompt), time.monotonic()))

    def held(self) -> list[tuple[int, list[int]]]:
        """(sequence id, tokens) of every cached prompt, most recently used first."""
        return [(e.seq_id, list(e.tokens))
                for e in sorted(self._entries, key=lambda e: e.used, reverse=True)]

    def adopt(self, n_tokens: int, load: Callable[[int], list[int] | None]) -> bool:
        """Take in a saved prompt: `load(seq_id)` puts its cells under seq_id and returns its
        tokens (None: it could not). False when it does not fit or did not load."""
        if n_tokens < MIN_CACHED_PREFIX or not self._free or self.cells + n_tokens > self.budget:
            return False
        seq_id = self._free.pop()
        tokens = load(seq_id)
        if tokens is None or len(tokens) != n_tokens:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._free.append(seq_id)
            return False
        self._entries.append(_Entry(seq_id, tokens, time.monotonic()))
        return True

    def evict(self, cells: int) -> None:
        """Drop least recently used prompts until at least `cells` are given back (or none
        is left)."""
        freed = 0
        while self._entries and freed < cells:
            entry = min(self._entries, key=lambda e: e.used)
            freed += len(entry.tokens)
            self._drop(entry)

    def clear(self) -> None:
        for entry in list(self._entries):
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, entry.seq_id, -1, -1)
        self._entries.remove(entry)
        self._free.append(entry.seq_id)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Batcher:
    """The sequences of one llama.cpp context and the step that decodes them together."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, *, n_ctx: int, n_batch: int,
                 n_parallel: int, cache_seq_ids: list[int], cache_cells: int) -> None:
        self._ctx = ctx
        self._vocab = model.vocab
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._closed = False
        self._free = list(range(n_parallel - 1, -1, -1))  # pop() hands out 0 first
        self.active: list[Generation] = []
        self.cache = PrefixCache(self._memory, cache_seq_ids, cache_cells)
        self._piece = ctypes.create_string_buffer(64)
        self._outbox: list[tuple[Callable[[str], None], str]] = []  # this step's text
        llama_cpp.llama_memory_clear(self._memory, True)

    def warm_up(self) -> None:
        """Start llama.cpp's threads on the calling thread, the one that will decode (call it
        with no sequence running; the prefix cache's cells stay): its first llama_decode on a
        thread starts the thread team there, which would otherwise fall on the first request's
        TTFT. The decode is stopped at the graph's first node (llama.cpp's abort callback, the
        memory rolled back): a whole forward pass would stream every weight once for nothing,
        0.1 s for a 1B model on two cores."""
        assert not self.active, "warm_up needs the batch to itself"
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        token = bos if bos >= 0 else 0
        seq_id = self._free[-1]
        for row in range(2):
            self._put(self._batch, row, token, row, seq_id, row == 1)
        self._batch.n_tokens = 2
        llama_cpp.llama_set_abort_callback(self._ctx.ctx, _STOP_AT_ONCE, None)
        # llama.cpp reports the abort it was asked for as an error ("removing memory module
        # entries"): not one for the daemon's log
        try:
            with llama_log_hook(lambda _level, _text: None):
                llama_cpp.llama_decode(self._ctx.ctx, self._batch)  # 2: aborted, as asked
        finally:
            llama_cpp.llama_set_abort_callback(self._ctx.ctx, _NO_ABORT, None)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def close(self) -> None:
        if not self._closed:
            llama_cpp.llama_batch_free(self._batch)
            self._closed = True

    # -- admission ---------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def reserved_cells(self) -> int:
        """Cells the running sequences may come to hold."""
        return sum(seq.cells for seq in self.active)

    def room_for(self, cells: int) -> bool:
        """True if a sequence needing `cells` fits beside the running ones now (prefix cache
        entries are dropped to make room; running sequences are never touched)."""
        if not self._free:
            return False
        spare = self.n_ctx - self.reserved_cells
        if cells > spare:
            return False
        if self.cache.cells > spare - cells:
            self.cache.evict(self.cache.cells - (spare - cells))
        return True

    def add(self, prompt: list[int], max_tokens: int, sampler: LlamaSampler, stops: list[str],
            on_text: Callable[[str], None] | None) -> Generation:
        """Start a sequence (call `room_for` first); its prompt goes in over the next steps."""
        seq = Generation(seq_id=self._free.pop(), prompt=prompt, max_tokens=max_tokens,
                       sampler=sampler, tail=TextTail(stops), on_text=on_text)
        llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        hit = self.cache.lookup(prompt)
        if hit is not None:
            entry, n = hit
            llama_cpp.llama_memory_seq_cp(self._memory, entry.seq_id, seq.seq_id, 0, n)
            seq.n_past = seq.cached = n
        self.active.append(seq)
        return seq

    def remove(self, seq: Generation) -> None:
        """End a sequence now (finished, cancelled, or failed): its KV cells are freed."""
        if seq in self.active:
            self.active.remove(seq)
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
            self._free.append(seq.seq_id)
        seq.sampler.close()

    def clear(self) -> None:
        for seq in list(self.active):
            self.remove(seq)
        self.cache.clear()

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> list[Generation]:
        """One token for every generating sequence, and the next chunk of a prompt (or of
        several short ones); returns the sequences that ended (still in `active`: the caller
        reports them, then `remove`s).

        llama.cpp's CPU kernels choose by batch shape: flash attention evaluates MERGE_ROWS
        query rows or more on a tiled path that rounds differently, so a prompt is cut into
        batches where it would be cut alone (prefill_chunks), and prompt chunks join the
        generating tokens in one llama_decode only while the whole batch stays under
        MERGE_ROWS, where every row is computed on its own and gets the numbers it would get
        alone. A longer chunk goes in a llama_decode of its own after the tokens. One call
        instead of two reads the weights once: on a memory-bound CPU that is most of a step.

        The text sampled in a step reaches the callers' `on_text` at its end, all at once: a
        transport woken mid-step would take the GIL at each ctypes call of the sampling that
        follows and keep the next llama_decode waiting; woken at the end, its work overlaps
        the decode, which runs without the GIL."""
        try:
            return self._step()
        finally:
            outbox, self._outbox = self._outbox, []
            for on_text, text in outbox:
                on_text(text)

    def _step(self) -> list[Generation]:
        generating = [seq for seq in self.active if seq.pending is not None]
        waiting = [seq for seq in self.active if seq.prefilling]
        rows = len(generating)
        riders: list[tuple[Generation, int]] = []  # prompt chunks that join the tokens' batch
        for seq in waiting:
            take = self._chunk(seq)
            if rows + take >= min(MERGE_ROWS, self.n_batch + 1):
                break  # in arrival order: a later prompt does not overtake this one
            riders.append((seq, take))
            rows += take
        if riders:
            return self._decode_rows(generating, riders)
        # the head prompt's chunk is too long to ride: it goes in a llama_decode of its own
        ended = self._decode_rows(generating, []) if generating else []
        if waiting:
            ended += self._decode_rows([], [(waiting[0], self._chunk(waiting[0]))])
        return ended

    def _chunk(self, seq: Generation) -> int:
        """Rows of the next llama_decode batch of `seq`'s prompt."""
        return chunk_end(seq.n_past, len(seq.prompt), self.n_batch) - seq.n_past

    def _decode_rows(self, generating: list[Generation],
                     riders: list[tuple[Generation, int]]) -> list[Generation]:
        """One llama_decode: the next token of every sequence in `generating`, then `take`
        prompt positions of each rider; then the samples, in that order. The sequences that
        ended are returned."""
        batch = self._batch
        for row, seq in enumerate(generating):
            assert seq.pending is not None
            self._put(batch, row, seq.pending, seq.n_past, seq.seq_id, True)
        row = len(generating)
        last_rows: list[tuple[Generation, int]] = []  # prompts that end here: their last row
        for seq, take in riders:
            last = seq.n_past + take == len(seq.prompt)
            for k in range(take):
                pos = seq.n_past + k
                self._put(batch, row, seq.prompt[pos], pos, seq.seq_id, last and k == take - 1)
                row += 1
            if last:
                last_rows.append((seq, row - 1))
        batch.n_tokens = row
        rc = self._decode(batch)
        if rc != 0:
            parts: list[tuple[list[Generation], list[tuple[Generation, int]]]] = (
                [(generating, [])] if generating else [])
            parts += [([], [rider]) for rider in riders]
            if len(parts) > 1:
                # llama.cpp left the cache as it was: go again one part at a time, so that a
                # failure lands on the sequences it belongs to
                return [seq for gen, ride in parts for seq in self._decode_rows(gen, ride)]
            return self._failed(rc, generating or [seq for seq, _ in riders],
                                prompt=not generating)
        ended = []
        for row, seq in enumerate(generating):
            seq.n_past += 1
            self._sample(seq, row)
            if seq.done:
                ended.append(seq)
        for seq, take in riders:
            seq.n_past += take
        for seq, row in last_rows:
            self.cache.store(seq.seq_id, seq.prompt)
            self._sample(seq, row)
            if seq.done:
                ended.append(seq)
        return ended

    @staticmethod
    def _put(batch: llama_cpp.llama_batch, n: int, token: int, pos: int, seq_id: int,
             logits: bool) -> None:
        batch.token[n] = token
        batch.pos[n] = pos  # type: ignore[call-overload]  # its stub says pos**, it is pos*
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits

    def _decode(self, batch: llama_cpp.llama_batch) -> int:
        rc = int(llama_cpp.llama_decode(self._ctx.ctx, batch))
        if rc == 1 and self.cache.entries:
            # no KV slot for the batch (cells fragmented): give back the cached prompts
            self.cache.clear()
            rc = int(llama_cpp.llama_decode(self._ctx.ctx, batch))
        return rc  # on failure llama.cpp has restored the KV cache as it was

    def _failed(self, rc: int, seqs: list[Generation], *, prompt: bool = False
                ) -> list[Generation]:
        """A decode that failed: these sequences end, with an error that says why."""
        for seq in seqs:
            if rc == 1 and prompt:
                seq.error = RequestError(
                    "busy", "the KV cache had no room for this prompt beside the running "
                    "requests; retry shortly")
            else:
                seq.error = RequestError(
                    "internal_error", f"llama.cpp failed to decode (llama_decode returned {rc})")
        if not prompt or rc != 1:
            logger.error("llama_decode returned %d for %d sequences", rc, len(seqs))
        return seqs

    def _sample(self, seq: Generation, row: int) -> None:
        token = llama_cpp.llama_sampler_sample(seq.sampler.sampler, self._ctx.ctx, row)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            seq.pending = None
            seq.finish_reason = "stop"
            self._emit(seq, seq.tail.finish())
            return
        seq.completion.append(token)
        text = seq.tail.push(self._token_bytes(token))
        self._emit(seq, text)
        if seq.tail.stopped:
            seq.finish_reason = "stop"
        elif len(seq.completion) >= seq.max_tokens:
            seq.finish_reason = "length"
            self._emit(seq, seq.tail.finish())
        seq.pending = None if seq.done else token

    def _emit(self, seq: Generation, text: str) -> None:
        if text and seq.on_text is not None:
            self._outbox.append((seq.on_text, text))  # handed over at the end of the step

    def _token_bytes(self, token: int) -> bytes:
        buf = self._piece
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]
