"""Tool calling at Home Assistant's size, on one bundle: the Assist request of tests/ha_assist.py
(its system prompt, its intent tools, N exposed entities).

- prompt size, with the tools as HA's Ollama integration sends them: tokens of the system
  prompt, of the tools as the model reads them, of the whole rendered first turn
  (runtime.engine.tools.families.render: the model's own template with `tools`, or the generic
  block), and of a turn after two tool round trips (GetLiveContext with every entity's state,
  then HassTurnOn) plus the answer: the n_ctx the plan must leave;
- against `edgerunner serve BUNDLE` (started as bench_serve.py starts it), streamed over the
  unix socket: time to first token with a cold prefix (a different first line in the system
  prompt each time) vs a prefix-cache hit (the same system prompt and tools, a new user turn),
  paired per request; decode tok/s of the call under tool_choice "required";
- share of schema-valid calls (every call parses, names a declared tool and its arguments
  validate against that tool's schema with jsonschema) over seeded requests under "required":
  through the daemon (with the tool grammar, the only way it serves tools), and in this process
  on the same engine with and without the tool grammar (the daemon offers no way to turn it
  off; "without" samples the same prompt with no grammar in the chain).

If the daemon refuses `tools` (an older build), the daemon rows are measured on plain chat with
the same system prompt and say so.

    python tools/bench/bench_tools.py [BUNDLE] [--entities 25] [--requests 6] [--seeds 10]
    python tools/bench/bench_tools.py --prompt-only    # the token table, no daemon
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import llama_cpp
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: tests, tools

from edgerunner.bundle.store import Bundle, load_bundle
from edgerunner.runtime.engine.tools import families as F
from edgerunner.runtime.tool_protocol import Tool, ToolsOptions
from tests import ha_assist as HA
from tools.bench.bench_serve import decode_rate, default_bundle, start_daemon

SIZES = (10, 25, 50)
ANSWER_TOKENS = 256  # room left for the spoken answer after the round trips
USERS = ["Turn on the kitchen ceiling light", "Set the thermostat to 21 degrees",
         "Pause the living room TV", "Is the front door locked?", "Dim the sofa lamp to 30%",
         "Close the bedroom blinds", "Turn off the coffee maker", "Set the ceiling fan to 40%"]


# -- prompt size ------------------------------------------------------------------------------

class Renderer:
    """The bundle's tokenizer and chat template, rendered with tools as the engine does."""

    def __init__(self, model: Path) -> None:
        self.llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
        self.template = self.llm.metadata.get("tokenizer.chat_template") or ""
        self.family = F.detect(self.template)
        vocab = self.llm._model
        self.bos = vocab.token_get_text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        self.eos = vocab.token_get_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""

    def tokens(self, text: str, special: bool = False) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=special))

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        return F.render(self.template, as_objects(messages), typed_tools(tools),
                        bos_token=self.bos, eos_token=self.eos, family=self.family)

    def close(self) -> None:
        self.llm.close()


def typed_tools(tools: list[dict[str, Any]]) -> list[Tool]:
    return ToolsOptions.model_validate({"tools": tools}).tools


def as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call arguments as objects (templates and the generic block read them so)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [
                {**c, "function": {**c["function"],
                                   "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]]}
        out.append(message)
    return out


def prompt_sizes(renderer: Renderer, sizes: list[int]) -> list[dict[str, int]]:
    rows = []
    for n in sizes:
        body = HA.request(n)
        # the tools as HA's Ollama integration puts them on the wire (its client drops bounds)
        tools = HA.ollama_request(n)["tools"]
        first = renderer.render(body["messages"], tools)
        later = renderer.render(HA.request(n, history=HA.round_trips(n))["messages"], tools)
        block = (F.generic_system_block(typed_tools(tools)) if not renderer.family.native
                 else json.dumps(F.template_tools(typed_tools(tools))))
        after = renderer.tokens(later, special=True)
        rows.append({"entities": n, "tools": len(tools),
                     "system": renderer.tokens(HA.system_prompt(n)),
                     "tools_tokens": renderer.tokens(block),
                     "first": renderer.tokens(first, special=True),
                     "after": after, "n_ctx": after + ANSWER_TOKENS})
    return rows


def size_table(rows: list[dict[str, int]], model: str, family: str) -> Table:
    table = Table(title=f"Home Assistant's Assist prompt on {model} ({family} tool format): "
                        f"tokens; needed = 2 trips later + {ANSWER_TOKENS} for the answer")
    for col in ("entities", "tools", "system", "tools block", "1st turn", "2 trips later",
                "n_ctx needed"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["entities"]), str(r["tools"]), str(r["system"]),
                      str(r["tools_tokens"]), str(r["first"]), str(r["after"]),
                      str(r["n_ctx"]))
    return table


# -- against the daemon -----------------------------------------------------------------------

def stream(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat: TTFT (first content or tool-call delta), decode rate, the calls
    assembled as the openai client assembles them, usage."""
    start = time.perf_counter()
    times: list[float] = []
    calls: dict[int, dict[str, str]] = {}
    usage: dict[str, Any] = {}
    finish = None
    content = []
    with http.stream("POST", "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status_code >= 400:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    times.append(time.perf_counter())
                content.append(delta.get("content") or "")
                for d in delta.get("tool_calls") or []:
                    call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
                    fn = d.get("function") or {}
                    call["name"] += fn.get("name") or ""
                    call["arguments"] += fn.get("arguments") or ""
    return {"ttft": times[0] - start if times else float("nan"), "times": times,
            "calls": [calls[i] for i in sorted(calls)], "content": "".join(content),
            "usage": usage, "finish_reason": finish}


def valid(calls: list[dict[str, Any]], schemas: dict[str, dict[str, Any]]) -> bool:
    """Every call names a declared tool and its arguments satisfy that tool's schema."""
    if not calls:
        return False
    for call in calls:
        if call["name"] not in schemas:
            return False
        try:
            arguments = (json.loads(call["arguments"]) if isinstance(call["arguments"], str)
                         else call["arguments"])
            jsonschema.validate(arguments, schemas[call["name"]])
        except (ValueError, jsonschema.ValidationError):
            return False
    return True


def daemon_runs(http: httpx.Client, n: int, generic: bool, args: argparse.Namespace
                ) -> dict[str, Any]:
    base = HA.request(n)
    with_tools = True
    try:
        stream(http, {**base, "max_tokens": 1})
    except RuntimeError as exc:
        if "HTTP 400" not in str(exc):
            raise
        with_tools = False  # the daemon does not take tools yet: plain chat, same prompt
    tools = {"tools": base["tools"]} if with_tools else {}
    block = ""
    if not with_tools and generic:
        # the generic format puts the tools in the system turn: the same prompt tokens
        block = "\n\n" + F.generic_system_block(typed_tools(base["tools"]))
    before = http.get("/health").json()["prefix_cache"]
    cold: list[float] = []
    hit: list[float] = []
    rates: list[float] = []
    prompt_tokens: list[int] = []
    cached: list[int] = []
    for i in range(args.requests):
        # a new first line: nothing cached
        system = f"Request {i}.\n" + HA.system_prompt(n) + block
        for j, user in enumerate((USERS[i % len(USERS)], USERS[(i + 3) % len(USERS)])):
            body = {"messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": user}], **tools,
                    "max_tokens": args.max_tokens, "temperature": 0.0,
                    **({"tool_choice": "required"} if with_tools else {})}
            got = stream(http, body)
            (cold if j == 0 else hit).append(got["ttft"])
            if j == 1:
                rate = decode_rate(got["times"])
                if rate is not None and got["usage"].get("completion_tokens"):
                    # chunks carry argument fragments, not one token each: use the token count
                    span = got["times"][-1] - got["times"][0]
                    rate = (got["usage"]["completion_tokens"] - 1) / span if span > 0 else rate
                if rate is not None:
                    rates.append(rate)
            prompt_tokens.append(got["usage"].get("prompt_tokens", 0))
            details = got["usage"].get("prompt_tokens_details") or {}
            if j == 1 and "cached_tokens" in details:
                cached.append(details["cached_tokens"])
    after = http.get("/health").json()["prefix_cache"]
    result: dict[str, Any] = {"with_tools": with_tools, "block": bool(block), "cold": cold,
                              "hit": hit, "rates": rates, "prompt_tokens": prompt_tokens,
                              "cached": cached,
                              "cache_cells": after["cells"],
                              "hits": after["hits"] - before["hits"],
                              "reused": after["tokens_reused"] - before["tokens_reused"]}
    if with_tools:
        schemas = HA.schemas(base["tools"])
        ok = cut = 0
        for seed in range(args.seeds):
            got = stream(http, {**base, "messages": [
                base["messages"][0], {"role": "user", "content": USERS[seed % len(USERS)]}],
                "tool_choice": "required", "max_tokens": args.call_tokens,
                "temperature": 0.8, "top_p": 0.95, "seed": seed})
            good = valid(got["calls"], schemas)
            ok += good
            cut += not good and got["finish_reason"] == "length"
        result["valid"], result["valid_cut"] = ok, cut
    return result


# -- in this process: the same engine with and without the tool grammar -----------------------

def in_process_validity(bundle: Bundle, n: int, args: argparse.Namespace
                        ) -> dict[str, int]:
    from llama_cpp._internals import LlamaSampler

    from edgerunner.runtime.engine.core import Engine
    from edgerunner.runtime.engine.tools.grammar import add_to_chain, build
    from edgerunner.runtime.engine.tools.parse import StreamParser

    base = HA.request(n)
    options = ToolsOptions.model_validate({"tools": base["tools"], "tool_choice": "required"})
    schemas = HA.schemas(base["tools"])
    renderer = Renderer(bundle.model_path)
    # room for the whole prompt in the prefix cache: the second row reuses the first's cells
    # (the cache re-evaluates the last tokens, so the samples are the same as cold)
    engine = Engine(bundle.model_path, bundle.manifest.plan, name="bench",
                    prefix_cache_cells=bundle.manifest.plan.n_ctx // 2)
    engine.load()
    counts = {"grammar": 0, "none": 0, "grammar_cut": 0, "none_cut": 0}
    try:
        model = engine._llm._model  # type: ignore[union-attr]
        grammar = build(options, renderer.family, engine.grammars)
        for seed in range(args.seeds):
            messages = [base["messages"][0], {"role": "user", "content": USERS[seed % len(USERS)]}]
            prompt = renderer.render(messages, base["tools"])
            tokens = list(renderer.llm.tokenize(prompt.encode(), add_bos=False, special=True))
            for kind in ("grammar", "none"):
                chain = LlamaSampler()
                if kind == "grammar" and grammar is not None:
                    add_to_chain(chain, model, grammar)
                chain.add_top_k(40)
                chain.add_top_p(0.95, 1)
                chain.add_temp(0.8)
                chain.add_dist(seed)
                pieces: list[str] = []
                generation = engine.batcher.add(tokens, args.call_tokens, chain, [],
                                                pieces.append)
                try:
                    while not generation.done:
                        engine.step()
                finally:
                    outcome = engine.end(generation)
                parser = StreamParser(renderer.family)
                parser.feed("".join(pieces))
                parser.finish()
                calls = [{"name": c.name, "arguments": c.arguments}
                         for c in parser.result().calls]
                ok = valid(calls, schemas)
                counts[kind] += ok
                if not ok and outcome.finish_reason == "length":
                    counts[f"{kind}_cut"] += 1
                if not ok and args.show_invalid:
                    print(f"-- invalid ({kind}, seed {seed}, {outcome.finish_reason}): "
                          f"{''.join(pieces)[:400]!r}")
    finally:
        engine.close()
        renderer.close()
    return counts


# -- main -------------------------------------------------------------------------------------

def med(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--entities", type=int, default=HA.DEFAULT_ENTITIES,
                        help=f"exposed entities in the request (0..{len(HA.HOME)})")
    parser.add_argument("--requests", type=int, default=6, help="cold/hit TTFT pairs")
    parser.add_argument("--seeds", type=int, default=10,
                        help="seeded calls per validity row (0: no validity rows)")
    parser.add_argument("--max-tokens", type=int, default=64, help="per TTFT request")
    parser.add_argument("--call-tokens", type=int, default=160, help="per validity request")
    parser.add_argument("--prompt-only", action="store_true", help="only the token table")
    parser.add_argument("--show-invalid", action="store_true",
                        help="print the in-process outputs that were not a valid call")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 110))
    with tempfile.TemporaryDirectory(prefix="er-bench-tools-", dir="/tmp") as tmp:
        path = args.bundle or default_bundle(Path(tmp))
        bundle = load_bundle(path)
        renderer = Renderer(bundle.model_path)
        sizes = sorted({*SIZES, args.entities})
        rows = prompt_sizes(renderer, sizes)
        renderer.close()
        console.print(size_table(rows, bundle.manifest.name, renderer.family.name))
        n_ctx = bundle.manifest.plan.n_ctx
        need = next(r["n_ctx"] for r in rows if r["entities"] == args.entities)
        console.print(f"bundle n_ctx {n_ctx}: {'enough' if n_ctx >= need else 'TOO SMALL'} "
                      f"for {args.entities} entities (needs {need})")
        if args.prompt_only:
            return

        # the daemon keeps no saved prefixes from an earlier run
        os.environ["XDG_STATE_HOME"] = str(Path(tmp) / "state")
        sock = Path(tmp) / "t.sock"
        proc, _ = start_daemon(bundle.dir, sock, None)
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                              base_url="http://edgerunner", timeout=900) as http:
                d = daemon_runs(http, args.entities, renderer.family is F.GENERIC, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        inproc = in_process_validity(bundle, args.entities, args) if args.seeds else None

    ratios = [h / c for c, h in zip(d["cold"], d["hit"], strict=True) if c == c and h == h]
    what = ("tools, tool_choice required" if d["with_tools"] else
            "the daemon refused tools: plain chat with the generic tools block in the system "
            "prompt, the same tokens" if d["block"] else
            "PLAIN CHAT without the tools: the daemon refused them")
    table = Table(title=f"{bundle.manifest.name}, {args.entities} entities, "
                        f"{len(HA.request(args.entities)['tools'])} tools ({what}); "
                        f"medians of {args.requests} pairs")
    for col in ("measure", "value", "goal"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row("prompt tokens (daemon usage)", f"{med(d['prompt_tokens']):.0f}", "")
    if d["cached"]:
        table.add_row("  of them from the prefix cache on a hit", f"{med(d['cached']):.0f}", "")
    table.add_row(f"prefix cache ({d['cache_cells']} cells): hits, tokens reused",
                  f"{d['hits']}, {d['reused']}", f"{args.requests} hits")
    table.add_row("TTFT cold prefix", f"{med(d['cold']) * 1e3:.0f} ms", "")
    table.add_row("TTFT prefix-cache hit", f"{med(d['hit']) * 1e3:.0f} ms", "")
    table.add_row("hit / cold (per pair)", f"{med(ratios):.3f}x", "<= 0.2x")
    table.add_row("decode tok/s of the call (hit requests)", f"{med(d['rates']):.1f}", "")
    if "valid" in d and args.seeds:
        table.add_row("schema-valid calls, daemon (tool grammar)",
                      f"{d['valid']}/{args.seeds}" + (
                          f" ({d['valid_cut']} of the rest cut at --call-tokens)"
                          if d["valid_cut"] else ""), f"{args.seeds}/{args.seeds}")
    if inproc is not None:
        every = f"{args.seeds}/{args.seeds}"
        for kind, label, goal in (("grammar", "with the tool grammar", every),
                                  ("none", "without a grammar", "counted")):
            cut = inproc[f"{kind}_cut"]
            table.add_row(f"schema-valid calls, in-process {label}",
                          f"{inproc[kind]}/{args.seeds}"
                          + (f" ({cut} of the rest cut at --call-tokens)" if cut else ""), goal)
    console.print(table)


if __name__ == "__main__":
    main()
