"""Continuous batching in one run: raw llama.cpp batched decode (the ceiling) beside the daemon.

Loads the bundle's model in this process with exactly the daemon's settings (`llama_kwargs`,
the thread count bench_serve picks, plus n_seq_max = the number of sequences and kv_unified),
drives it through llama.cpp's low-level API only (llama_batch / llama_decode / a greedy
llama_sampler chain), and starts `edgerunner serve BUNDLE --parallel 8` as a user would (the
bundle's config: SSE tokens after the first gather for stream_flush_s per write; `--flush S`
sets it, 0 sends a chunk per token, which costs decode speed on a 2-core machine). Prompts are
rendered with the daemon's own chat template (Engine.prepare), so raw and daemon evaluate the
same tokens. Raw and daemon measurements alternate (raw, daemon, daemon, raw, ...) so
machine-load drift hits both; every ratio is taken per round, then the median.

- batched: for 1, 2, 4, 8 sequences, raw prefills all of them in one batch and then decodes
  one token per sequence per llama_decode for max_tokens (greedy, EOS ignored, so the count is
  fixed); the daemon gets as many concurrent streaming clients, started together, with prompts
  that ask for long answers (tokens counted from the final usage chunk). Aggregate tok/s = all
  completion tokens / (last token - start); per-request decode tok/s = (tokens - 1) / (last -
  first token); TTFT p50/p95 over every request.
- system prompt: TTFT of a request whose ~1,000-token system prompt the daemon saw in the
  request just before (same system prompt, another question) vs a cold one (a system prompt
  it never saw), with raw prompt evaluation of the same tokens beside them.
- restart: the same system-prompt TTFT cold, seen before, and seen before a restart of the
  daemon (its prefix cache saved on drain into its state directory, restored at start).
- arrival: while 3 streams run, a 4th request with a ~250-token prompt arrives: its TTFT, its
  prompt evaluation measured raw, and the longest gap between tokens of the 3 running streams
  while it waited for its first token.
- burst: 200 concurrent requests against the default queue_depth: each must be answered or
  refused 503 `busy` with Retry-After; anything else is counted as "other" and must be 0.

    python tools/bench/bench_parallel.py BUNDLE [--rounds 4] [--max-tokens 128] [--json]
    python tools/bench/bench_parallel.py --quick   # packs the default model for rpi5 (temp dir)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
from rich.console import Console
from rich.table import Table

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.bundle.store import load_bundle
from edgerunner.client.http import Client
from edgerunner.host.cpu import cpu_budget, decode_threads
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.engine.weights import BatchLlama, llama_kwargs
from edgerunner.runtime.protocol import ChatCompletionRequest

# prompts that keep a small model talking well past max_tokens
PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper and a storm.",
    "Explain in detail how a refrigerator keeps food cold, step by step.",
    "Describe every planet of the solar system, with several facts about each.",
    "Write a long essay on the history of trains and why they matter.",
    "Give detailed advice to someone learning to play the guitar, with exercises.",
    "Explain the water cycle at length, as a teacher would to a curious class.",
    "Write a long letter from a sailor to his family about life at sea.",
    "Describe how to bake bread at home, with every step explained in detail.",
]
QUESTIONS = ["Which sensor reports most often?", "Summarise the rules in one sentence.",
             "What should happen when the door opens at night?"]
SYSTEM_TOKENS = 1000
ARRIVAL_TOKENS = 250
RUNNING = 3  # streams already decoding when the arrival comes
FEW_STEPS = 4  # "a few decode steps" of the arrival goal
BURST = 200
Messages = list[dict[str, str]]


def user(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


def filler(count_tokens: Callable[[str], int], tokens: int, seed: int = 0) -> str:
    """Plain, varied prose of about `tokens` tokens (a device manual nobody will read)."""
    rooms = ["kitchen", "hall", "garage", "attic", "cellar", "porch", "study", "garden"]
    things = ["temperature", "humidity", "motion", "light level", "door state", "power draw"]
    sentences: list[str] = []
    k = seed
    while count_tokens(" ".join(sentences)) < tokens:
        for _ in range(8):
            sentences.append(f"Rule {k}: the {rooms[k % 8]} sensor reports its "
                             f"{things[k % 6]} every {5 + k * 7 % 55} seconds, and an alert "
                             f"is raised above {10 + k * 13 % 90} units.")
            k += 1
    while len(sentences) > 1 and count_tokens(" ".join(sentences[:-1])) >= tokens:
        sentences.pop()
    return " ".join(sentences)


# -- raw llama.cpp, low-level API -------------------------------------------------------------

@dataclass
class RawRun:
    """One raw batched generation: prefill (to the first token of every sequence), then steps."""

    n: int
    prefill_s: float
    decode_s: float
    steps: int

    @property
    def seq_tps(self) -> float:
        return self.steps / self.decode_s if self.steps else math.nan

    @property
    def aggregate_tps(self) -> float:
        return self.n * (self.steps + 1) / (self.prefill_s + self.decode_s)

    @property
    def step_s(self) -> float:
        return self.decode_s / self.steps if self.steps else math.nan


class RawBatch:
    """n sequences on one context, decoded with llama_decode and a greedy sampler chain."""

    def __init__(self, model_path: Path, plan: RuntimePlan, threads: int, n: int) -> None:
        self.n = n
        self.llm = BatchLlama(str(model_path), **llama_kwargs(plan, threads), n_seq_max=n)
        self.n_batch = self.llm.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.sampler = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        llama_cpp.llama_batch_free(self.batch)
        self.llm.close()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, pos, seq, wants logits) entries."""
        b = self.batch
        for j, (token, pos, seq, logits) in enumerate(entries):
            b.token[j] = token
            b.pos[j] = pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq
            b.logits[j] = logits
        b.n_tokens = len(entries)
        code = llama_cpp.llama_decode(self.llm.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} for {len(entries)} tokens")

    def _sample(self, j: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self.sampler, self.llm.ctx, j))

    def run(self, prompts: list[list[int]], max_tokens: int) -> RawRun:
        """Prefill every prompt (one sequence each, n_batch tokens per decode), then
        max_tokens - 1 steps of one token per sequence."""
        assert len(prompts) <= self.n
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        for seq in range(self.n):
            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        entries = [(token, pos, seq, pos == len(p) - 1)
                   for seq, p in enumerate(prompts) for pos, token in enumerate(p)]
        last = [0] * len(prompts)
        started = time.perf_counter()
        for i in range(0, len(entries), self.n_batch):
            chunk = entries[i:i + self.n_batch]
            self._decode(chunk)
            for j, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    last[seq] = self._sample(j)
        prefilled = time.perf_counter()
        pos = [len(p) for p in prompts]
        for _ in range(max_tokens - 1):
            self._decode([(last[s], pos[s], s, True) for s in range(len(prompts))])
            last = [self._sample(s) for s in range(len(prompts))]
            pos = [p + 1 for p in pos]
        done = time.perf_counter()
        return RawRun(len(prompts), prefilled - started, done - prefilled, max_tokens - 1)


# -- the daemon over its socket -----------------------------------------------------------------

@dataclass
class Stream:
    """One streamed request as the client saw it."""

    start: float = math.nan
    chunks: list[float] = field(default_factory=list)  # arrival of each content chunk
    tokens: int = 0  # completion tokens from the usage chunk
    done: bool = False

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.start if self.chunks else math.nan

    @property
    def end(self) -> float:
        return self.chunks[-1] if self.chunks else self.start

    @property
    def decode_tps(self) -> float:
        if self.tokens < 3 or len(self.chunks) < 2 or self.chunks[-1] <= self.chunks[0]:
            return math.nan
        return (self.tokens - 1) / (self.chunks[-1] - self.chunks[0])


def stream_chat(http: httpx.Client, messages: Messages, max_tokens: int,
                barrier: threading.Barrier | None = None, into: Stream | None = None) -> Stream:
    """POST a streaming chat request; record when each content chunk arrives."""
    s = into or Stream()
    if barrier is not None:
        barrier.wait(timeout=60)
    s.start = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
    }) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"daemon answered {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"daemon stream failed: {chunk['error']}")
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                s.chunks.append(time.perf_counter())
    s.done = True
    return s


def concurrent_streams(http: httpx.Client, prompts: list[Messages], max_tokens: int
                       ) -> list[Stream]:
    """All prompts as streaming clients released together."""
    barrier = threading.Barrier(len(prompts))
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream_chat, http, p, max_tokens, barrier) for p in prompts]
        return [f.result() for f in futures]


def longest_gap(stream: Stream, start: float, end: float) -> float:
    """The longest time around [start, end] that a finished stream went without a token while
    it was running (one still waiting for its first token counts as silent from `start`)."""
    if stream.chunks and stream.chunks[-1] <= start:
        return 0.0  # finished before the window: not running
    before = [t for t in stream.chunks if t <= start]
    points = [before[-1] if before else start]
    points += [t for t in stream.chunks if start < t < end]
    points.append(min(end, stream.end) if stream.chunks else end)
    return max(b - a for a, b in itertools.pairwise(points))


def burst(http: httpx.Client, messages: Messages, count: int) -> dict[str, Any]:
    """`count` concurrent non-streamed requests: answered, refused busy + Retry-After, other."""
    barrier = threading.Barrier(count)

    def one() -> str:
        barrier.wait(timeout=60)
        try:
            r = http.post("/v1/chat/completions", json={
                "messages": messages, "max_tokens": 4, "temperature": 0.0})
        except httpx.HTTPError as exc:
            return f"transport: {type(exc).__name__}"
        if r.status_code == 200 and r.json().get("choices"):
            return "answered"
        try:
            code = r.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        if r.status_code == 503 and code == "busy":
            return "refused" if r.headers.get("Retry-After") else "busy without Retry-After"
        return f"HTTP {r.status_code} {code}"

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(lambda _: one(), range(count)))
    seconds = time.perf_counter() - started
    answered, refused = outcomes.count("answered"), outcomes.count("refused")
    other = sorted({o for o in outcomes if o not in ("answered", "refused")})
    return {"sent": count, "answered": answered, "refused": refused,
            "other": count - answered - refused, "other_kinds": other, "seconds": seconds}


def start_daemon(bundle: Path, sock: Path, config: Path, parallel: int, threads: int | None,
                 log: Path) -> subprocess.Popen[bytes]:
    """Exec `edgerunner serve` (its own thread choice unless given) and wait until ready."""
    # its own state directory (stamp, saved prefix cache), kept for a restart in this run
    env = {**os.environ, "STATE_DIRECTORY": str(sock.parent / "state")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(bundle), "--socket", str(sock),
             "--config", str(config), "--parallel", str(parallel),
             *(("--threads", str(threads)) if threads else ())],
            stdout=subprocess.DEVNULL, stderr=out, env=env)
    try:
        with Client(sock, timeout=5) as client:
            client.wait_ready(process=proc)
    except Exception:
        proc.kill()
        sys.stderr.write(log.read_text(errors="replace")[-3000:])
        raise
    return proc


def default_bundle(tmp: Path) -> Path:
    from edgerunner.pack.default_model import ensure_default_model
    from edgerunner.pack.packer import pack
    from edgerunner.profiles import resolve_profile

    return Path(pack(ensure_default_model(), resolve_profile("rpi5"), tmp).path)


# -- the run ------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of the finite values (nan if none)."""
    finite = sorted(v for v in values if v == v)
    return finite[max(0, math.ceil(q * len(finite)) - 1)] if finite else math.nan


def med(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else math.nan


def measure(args: argparse.Namespace, bundle_path: Path, tmp: Path, say: Console
            ) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    plan = bundle.manifest.plan
    threads = args.threads or decode_threads(plan.n_threads, cpu_budget())
    engine = Engine(bundle.model_path, plan, name=bundle.manifest.name)

    def tokens(messages: Messages) -> list[int]:
        request = ChatCompletionRequest.model_validate({"messages": messages, "max_tokens": 1})
        return engine.prepare(request, 1).prompt_tokens

    seqs = sorted(set(args.seqs))
    raws: dict[int, RawBatch] = {}

    def raw(n: int) -> RawBatch:
        if n not in raws:
            raws[n] = RawBatch(bundle.model_path, plan, threads, n)
        return raws[n]

    config = tmp / "bench.toml"
    # the daemon as configured, or with --flush's stream_flush_s (token counts come from usage)
    config.write_text("" if args.flush is None else f"stream_flush_s = {args.flush}\n")
    sock = tmp / "p.sock"
    say.print(f"starting the daemon (--parallel {max(seqs)}) and raw contexts for {seqs} ...")
    proc = start_daemon(bundle.dir, sock, config, max(seqs), args.threads, tmp / "daemon.log")
    out: dict[str, Any] = {"bundle": bundle.manifest.name, "max_tokens": args.max_tokens,
                           "load_before": os.getloadavg()[0],
                           "rounds": args.rounds, "raw_threads": threads, "plan": {
                               "n_ctx": plan.n_ctx, "n_batch": plan.n_batch,
                               "n_ubatch": plan.n_ubatch, "n_threads": plan.n_threads,
                               "kv_type": plan.kv_type}}
    try:
        with Client(sock) as client:
            health = client.health()
        out["daemon_threads"] = health.get("cpu", {}).get("threads")
        limits = httpx.Limits(max_connections=BURST + 16, max_keepalive_connections=16)
        transport = httpx.HTTPTransport(uds=str(sock), limits=limits)
        with httpx.Client(transport=transport, base_url="http://edgerunner", timeout=600) as http:
            for n in seqs:
                raw(n).run([tokens(user("Hello"))] * n, 4)  # warm: first-use allocations
            stream_chat(http, user("Hello"), 4)
            out["batched"] = batched(args, seqs, raw, http, tokens, say)
            out["system_prompt"] = system_prompt(args, raw(1), http, tokens, engine, say)
            out["arrival"] = arrival(args, raw, http, tokens, engine, say)
            say.print(f"burst: {BURST} concurrent requests ...")
            out["burst"] = burst(http, user("Say hi."), BURST)
        def restart_daemon() -> None:
            nonlocal proc
            proc.terminate()
            proc.wait(timeout=120)
            proc = start_daemon(bundle.dir, sock, config, max(seqs), args.threads,
                                tmp / "daemon.log")

        out["restart"] = after_restart(args, sock, restart_daemon, engine, say)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        for r in raws.values():
            r.close()
        engine.close()
    out["load_after"] = os.getloadavg()[0]  # other work on the cores skews absolute numbers
    out["goals"] = goals(out)
    return out


def batched(args: argparse.Namespace, seqs: list[int], raw: Callable[[int], RawBatch],
            http: httpx.Client, tokens: Callable[[Messages], list[int]], say: Console
            ) -> list[dict[str, Any]]:
    runs: dict[int, list[RawRun]] = {n: [] for n in seqs}
    streams: dict[int, list[list[Stream]]] = {n: [] for n in seqs}
    for r in range(args.rounds):
        say.print(f"batched: round {r + 1}/{args.rounds} ...")
        for i, n in enumerate(seqs):
            prompts = [user(PROMPTS[(r + k) % len(PROMPTS)]) for k in range(n)]
            # alternate who goes first, so drift and cache order favour neither
            for who in (("raw", "d") if (r + i) % 2 == 0 else ("d", "raw")):
                if who == "raw":
                    runs[n].append(raw(n).run([tokens(p) for p in prompts], args.max_tokens))
                else:
                    streams[n].append(concurrent_streams(http, prompts, args.max_tokens))
    rows = []
    for n in seqs:
        agg = [sum(s.tokens for s in group) / (max(s.end for s in group)
                                               - min(s.start for s in group))
               for group in streams[n]]
        per_req = [[s.decode_tps for s in group] for group in streams[n]]
        ttfts = [s.ttft for group in streams[n] for s in group]
        rows.append({
            "n": n,
            "raw_aggregate_tps": med([x.aggregate_tps for x in runs[n]]),
            "raw_seq_tps": med([x.seq_tps for x in runs[n]]),
            "raw_step_ms": med([x.step_s for x in runs[n]]) * 1e3,
            "raw_ttft_ms": med([x.prefill_s for x in runs[n]]) * 1e3,
            "daemon_aggregate_tps": med(agg),
            "daemon_request_tps": med([t for g in per_req for t in g]),
            "daemon_ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
            "daemon_ttft_p95_ms": pct(ttfts, 0.95) * 1e3,
            "daemon_tokens_mean": statistics.mean(s.tokens for g in streams[n] for s in g),
            # per round: machine-load drift cancels within a round
            "aggregate_ratio": med([a / x.aggregate_tps for a, x in zip(agg, runs[n],
                                                                        strict=True)]),
            "request_tps_ratio": med([med(g) / x.seq_tps for g, x in zip(per_req, runs[n],
                                                                         strict=True)]),
        })
    return rows


def system_prompt(args: argparse.Namespace, raw1: RawBatch, http: httpx.Client,
                  tokens: Callable[[Messages], list[int]], engine: Engine, say: Console
                  ) -> dict[str, Any]:
    body = filler(engine.count_tokens, SYSTEM_TOKENS)
    cold, warm, raw_eval, ratios = [], [], [], []
    sys_tokens = 0
    for r in range(args.sys_rounds):
        say.print(f"system prompt: round {r + 1}/{args.sys_rounds} ...")
        # a fresh site code at the start: nothing of this system prompt was seen before
        system = f"Site {secrets.token_hex(4)}. {body}"
        sys_tokens = engine.count_tokens(system)
        first = [{"role": "system", "content": system}, *user(QUESTIONS[r % 3])]
        again = [{"role": "system", "content": system}, *user(QUESTIONS[(r + 1) % 3])]
        if r % 2:
            raw_eval.append(raw1.run([tokens(first)], 1).prefill_s)
        c = stream_chat(http, first, 4).ttft
        w = stream_chat(http, again, 4).ttft
        if not r % 2:
            raw_eval.append(raw1.run([tokens(first)], 1).prefill_s)
        cold.append(c)
        warm.append(w)
        ratios.append(w / c)
    return {"system_tokens": sys_tokens, "cold_ttft_ms": med(cold) * 1e3,
            "warm_ttft_ms": med(warm) * 1e3, "raw_prompt_eval_ms": med(raw_eval) * 1e3,
            "warm_over_cold": med(ratios)}


def uds_http(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                        base_url="http://edgerunner", timeout=600)


def after_restart(args: argparse.Namespace, sock: Path, restart: Callable[[], None],
                  engine: Engine, say: Console) -> dict[str, Any]:
    """TTFT of a ~1,000-token system prompt: cold, seen before (warm), and seen before a
    restart of the daemon (the prefix cache saved on drain and restored at start)."""
    body = filler(engine.count_tokens, SYSTEM_TOKENS, seed=900)
    cold, warm, restarted, restart_s = [], [], [], []
    for r in range(args.restart_rounds):
        say.print(f"restart: round {r + 1}/{args.restart_rounds} ...")
        system = f"Site {secrets.token_hex(4)}. {body}"
        asks = [[{"role": "system", "content": system}, *user(q)] for q in QUESTIONS]
        with uds_http(sock) as http:  # one connection pool per daemon process
            cold.append(stream_chat(http, asks[0], 4).ttft)
            warm.append(stream_chat(http, asks[1], 4).ttft)
        started = time.perf_counter()
        restart()
        restart_s.append(time.perf_counter() - started)
        with uds_http(sock) as http:
            restarted.append(stream_chat(http, asks[2], 4).ttft)
    return {"cold_ttft_ms": med(cold) * 1e3, "warm_ttft_ms": med(warm) * 1e3,
            "restarted_ttft_ms": med(restarted) * 1e3, "restart_s": med(restart_s),
            "restarted_over_warm": med([a / b for a, b in zip(restarted, warm, strict=True)])}


def arrival(args: argparse.Namespace, raw: Callable[[int], RawBatch], http: httpx.Client,
            tokens: Callable[[Messages], list[int]], engine: Engine, say: Console
            ) -> dict[str, Any]:
    late = user("Summarise these rules in two sentences: "
                + filler(engine.count_tokens, ARRIVAL_TOKENS, seed=500))
    late_tokens = tokens(late)
    running = [user(PROMPTS[k]) for k in range(RUNNING)]
    rounds: list[dict[str, float]] = []
    for r in range(args.arrival_rounds):
        say.print(f"arrival: round {r + 1}/{args.arrival_rounds} ...")
        prompt_eval = raw(1).run([late_tokens], 1).prefill_s
        step = raw(RUNNING + 1).run([tokens(p) for p in [*running, late]], 17).step_s
        streams = [Stream() for _ in running]
        with ThreadPoolExecutor(RUNNING) as pool:
            futures = [pool.submit(stream_chat, http, p, 2 * args.max_tokens, None, s)
                       for p, s in zip(running, streams, strict=True)]
            # arrive once all are streaming; a daemon that runs one at a time never gets
            # there, so give up waiting after 16 decode steps of the first
            deadline = None
            while not all(s.chunks for s in streams):
                if deadline is None and any(s.chunks for s in streams):
                    deadline = time.perf_counter() + max(0.2, 16 * step)
                if deadline is not None and time.perf_counter() > deadline:
                    break
                time.sleep(0.002)
            streaming = sum(1 for s in streams if s.chunks and not s.done)
            new = stream_chat(http, late, 8)
            for f in futures:
                f.result()
        first = new.chunks[0] if new.chunks else new.end
        rounds.append({
            "ttft_ms": new.ttft * 1e3, "raw_prompt_eval_ms": prompt_eval * 1e3,
            "raw_step_ms": step * 1e3, "streaming_at_arrival": streaming,
            "longest_gap_ms": max(longest_gap(s, new.start, first) for s in streams) * 1e3})
    return {"prompt_tokens": len(late_tokens),
            **{k: med([x[k] for x in rounds]) for k in rounds[0]},
            "streaming_at_arrival": min(x["streaming_at_arrival"] for x in rounds),
            "ttft_over_bound": med([x["ttft_ms"] / (x["raw_prompt_eval_ms"]
                                                    + FEW_STEPS * x["raw_step_ms"])
                                    for x in rounds]),
            "gap_over_bound": med([x["longest_gap_ms"] / (x["raw_prompt_eval_ms"]
                                                         + 2 * x["raw_step_ms"])
                                   for x in rounds])}


def goals(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {row["n"]: row for row in out["batched"]}
    found: list[dict[str, Any]] = []

    def goal(name: str, value: float, target: str, ok: bool) -> None:
        found.append({"goal": name, "measured": value, "target": target, "pass": bool(ok)})

    if 4 in rows:
        v = rows[4]["aggregate_ratio"]
        goal("daemon aggregate tok/s, 4 clients / raw 4 sequences", v, ">= 0.80x", v >= 0.8)
    if 1 in rows:
        v = rows[1]["request_tps_ratio"]
        goal("daemon decode tok/s, 1 client / raw 1 sequence", v, ">= 0.97x", v >= 0.97)
    v = out["system_prompt"]["warm_over_cold"]
    goal(f"TTFT, {out['system_prompt']['system_tokens']}-token system prompt seen before / "
         "cold", v, "<= 0.20x", v <= 0.2)
    v = out["restart"]["restarted_over_warm"]
    goal("TTFT of that system prompt after a daemon restart / seen before", v, "<= 1.20x",
         v <= 1.2)
    v = out["arrival"]["ttft_over_bound"]
    goal(f"arrival TTFT / (raw prompt eval + {FEW_STEPS} raw decode steps)", v, "<= 1.00x",
         v <= 1.0)
    v = out["arrival"]["gap_over_bound"]
    goal(f"longest gap of the {RUNNING} running streams / (raw prompt eval + 2 steps)", v,
         "<= 1.00x", v <= 1.0)
    b = out["burst"]
    goal(f"{b['sent']} concurrent: neither answered nor refused busy + Retry-After",
         b["other"], "0", b["other"] == 0)
    return found


def print_tables(out: dict[str, Any], console: Console) -> None:
    t = Table(title=f"{out['bundle']}: raw llama.cpp, N sequences batched, vs daemon, N "
                    f"streaming clients (greedy, max_tokens {out['max_tokens']}, "
                    f"{out['rounds']} rounds, "
                    f"raw {out['raw_threads']} threads, daemon {out['daemon_threads']}; "
                    "medians, ratios per round; 1-min load average "
                    f"{out['load_before']:.1f} before, {out['load_after']:.1f} after)")
    # tok/s and ms in the headers, not the cells: the table fits 80 columns
    for col in ("N", "agg raw", "agg dmn", "÷", "dec raw", "dec dmn", "÷", "TTFT raw",
                "dmn p50", "p95", "tok"):
        t.add_column(col, justify="right")
    for row in out["batched"]:
        t.add_row(str(row["n"]), f"{row['raw_aggregate_tps']:.1f}",
                  f"{row['daemon_aggregate_tps']:.1f}", f"{row['aggregate_ratio']:.2f}",
                  f"{row['raw_seq_tps']:.1f}", f"{row['daemon_request_tps']:.1f}",
                  f"{row['request_tps_ratio']:.2f}", f"{row['raw_ttft_ms']:.0f}",
                  f"{row['daemon_ttft_p50_ms']:.0f}", f"{row['daemon_ttft_p95_ms']:.0f}",
                  f"{row['daemon_tokens_mean']:.0f}")
    console.print(t)
    console.print("agg: tok/s of all N together; dec: decode tok/s of each sequence / "
                  "request; ÷: daemon / raw per round; TTFT in ms; tok: daemon completion "
                  "tokens per request (raw: max_tokens, EOS ignored)")

    sp, ar, b = out["system_prompt"], out["arrival"], out["burst"]
    t = Table(title="prefix cache, arrival while streaming, burst (medians)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row(f"TTFT, {sp['system_tokens']}-token system prompt: cold / seen before",
              f"{sp['cold_ttft_ms']:.0f} ms / {sp['warm_ttft_ms']:.0f} ms")
    t.add_row("  raw prompt eval of the same tokens", f"{sp['raw_prompt_eval_ms']:.0f} ms")
    rs = out["restart"]
    t.add_row("  cold / seen before / seen before a daemon restart",
              f"{rs['cold_ttft_ms']:.0f} / {rs['warm_ttft_ms']:.0f} / "
              f"{rs['restarted_ttft_ms']:.0f} ms")
    t.add_row("  the restart (stop, start, ready)", f"{rs['restart_s']:.2f} s")
    t.add_row(f"arrival ({ar['prompt_tokens']} prompt tokens) TTFT, "
              f"{ar['streaming_at_arrival']}/{RUNNING} streaming when it came",
              f"{ar['ttft_ms']:.0f} ms")
    t.add_row("  raw prompt eval / raw decode step (4 sequences)",
              f"{ar['raw_prompt_eval_ms']:.0f} ms / {ar['raw_step_ms']:.1f} ms")
    t.add_row("  longest gap between tokens of the running streams meanwhile",
              f"{ar['longest_gap_ms']:.0f} ms")
    t.add_row(f"{b['sent']} concurrent: answered / refused busy + Retry-After / other",
              f"{b['answered']} / {b['refused']} / {b['other']}"
              + (f" ({', '.join(b['other_kinds'])})" if b["other_kinds"] else ""))
    console.print(t)

    t = Table(title="goals")
    for col in ("goal", "measured", "target", ""):
        t.add_column(col, justify="left" if col == "goal" else "right")
    for g in out["goals"]:
        value = g["measured"]
        t.add_row(g["goal"], f"{value:.2f}x" if isinstance(value, float) else str(value),
                  g["target"], "[green]PASS[/]" if g["pass"] else "[red]FAIL[/]")
    console.print(t)


def _no_nan(value: Any) -> Any:
    """NaN (a measure that could not be taken) as null: strict JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="sequences (raw) and concurrent clients (daemon) to compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--flush", type=float, default=None,
                        help="the daemon's stream_flush_s [default: the bundle's config]")
    parser.add_argument("--sys-rounds", type=int, default=5,
                        help="cold/seen-before pairs for the system prompt TTFT")
    parser.add_argument("--arrival-rounds", type=int, default=2)
    parser.add_argument("--restart-rounds", type=int, default=1,
                        help="cold/warm/after-a-restart triples for the system prompt TTFT")
    parser.add_argument("--threads", type=int, default=None,
                        help="default: raw gets the plan's, capped at the CPUs this process "
                        "may use; the daemon gets no --threads and chooses the same itself")
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of 48 tokens, 2 system-prompt pairs, 1 arrival")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    for name in ("rounds", "sys_rounds", "arrival_rounds", "restart_rounds"):
        if getattr(args, name) < 1:  # every table row needs at least one measurement
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.quick:
        args.rounds, args.max_tokens, args.sys_rounds, args.arrival_rounds = 2, 48, 2, 1
    if args.max_tokens < 2 or min(args.seqs) < 1 or max(args.seqs) > 16:
        parser.error("--max-tokens must be >= 2 and --seqs between 1 and 16")

    progress = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="er-bench-", dir="/tmp") as tmp:
        if args.bundle is None:
            progress.print("packing the default model for rpi5 ...")
        path = args.bundle or default_bundle(Path(tmp))
        out = measure(args, path, Path(tmp), progress)
    if args.json:
        print(json.dumps(_no_nan(out), indent=2))
    else:
        print_tables(out, Console())


if __name__ == "__main__":
    main()
