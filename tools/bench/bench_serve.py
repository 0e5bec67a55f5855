"""The daemon's cost over raw llama-cpp-python, on one bundle, in one run.

Loads the bundle's model in this process with exactly the daemon's Llama() settings, starts
`edgerunner serve BUNDLE` as a subprocess, and sends the same greedy prompts to both,
interleaved (raw, daemon, raw, daemon, ...) so machine load drifts hit both alike:

- streaming: time to first token and decode tok/s (content chunks after the first, over the
  time from the first to the last), raw `create_chat_completion(stream=True)` vs SSE over the
  unix socket;
- whole: end-to-end tok/s of a non-streamed request, raw vs daemon;
- start: raw Llama() construction with the plan's use_mmap in a fresh process, as a raw
  llama-cpp-python server loads once at its start (timed from before Llama() to after it, the
  import not counted), vs the daemon process from exec to /health "ready"; beside them raw
  Llama() in this process (a second or later load of one process, which runs faster here: the
  memory it faults in was just freed by the previous one) and with mmap on, so that what the
  plan's mmap choice itself costs shows apart. Alternating, the model file in the page cache
  for all (read once first); medians of `--starts`. The daemon finds the bundle's
  verification stamp that this script's own load_bundle left (a restart, not a first start
  after install). The daemon's own breakdown (the `event=startup` line of its log: exec to
  start, preflight, fit, load with its prefix restore and the serving imports, warm-up, serve)
  is shown beneath, medians too.

    python tools/bench/bench_serve.py BUNDLE [--prompts 6] [--max-tokens 128] [--threads N]
    python tools/bench/bench_serve.py            # packs the default model for rpi5 into a temp dir
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
from rich.console import Console
from rich.table import Table

from edgerunner.bundle.store import Bundle, load_bundle
from edgerunner.client.http import Client
from edgerunner.host.cpu import cpu_budget, decode_threads
from edgerunner.runtime.engine.weights import llama_kwargs

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "List the planets of the solar system with one fact each.",
    "Describe how to make a cup of tea, step by step.",
    "What are the benefits of regular exercise?",
    "Summarise the water cycle for a ten-year-old.",
    "Give advice to someone learning to play the guitar.",
    "Compare trains and planes for a 500 km trip.",
]


def raw_stream(llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """(start, arrival time of each content chunk) for raw streaming."""
    start = time.perf_counter()
    times: list[float] = []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.0, stream=True,
    ):
        if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index]
            times.append(time.perf_counter())
    return start, times


def daemon_stream(http: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """(start, arrival time of each content chunk) over SSE."""
    start = time.perf_counter()
    times: list[float] = []
    with http.stream("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, "stream": True,
    }) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    return start, times


def raw_whole(llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    out: Any = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - start, out["usage"]["completion_tokens"]


def daemon_whole(http: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def decode_rate(times: list[float]) -> float | None:
    if len(times) < 3:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def start_daemon(bundle: Path, sock: Path, threads: int | None, log: Path
                 ) -> tuple[subprocess.Popen[bytes], float]:
    """Exec `edgerunner serve` (its own thread choice unless given) and time it to ready;
    its log goes to `log` (overwritten)."""
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(bundle), "--socket", str(sock),
             *(("--threads", str(threads)) if threads else ())],
            stdout=subprocess.DEVNULL, stderr=out)
    with Client(sock, timeout=5) as client:
        client.wait_ready(process=proc, poll_s=0.005)
    return proc, time.perf_counter() - started


def startup_phases(log: Path) -> dict[str, float]:
    """The daemon's own start-up breakdown: the `event=startup` line it logs at ready."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "event=startup" in line:
            pairs = (f.split("=", 1) for f in line.split() if "=" in f)
            return {k: float(v) for k, v in pairs if k.endswith("_s")}
    return {}


# raw Llama() in a process of its own: argv[1] the model, argv[2] Llama()'s keyword arguments
RAW_CHILD = """
import json, sys, time
import llama_cpp
kwargs = json.loads(sys.argv[2])
started = time.perf_counter()
llama_cpp.Llama(sys.argv[1], **kwargs)
print(time.perf_counter() - started)
"""


def start_times(bundle: Bundle, threads: int, sock: Path, args: argparse.Namespace
                ) -> dict[str, float]:
    """Medians of raw Llama() load (a fresh process; this one; mmap on) and daemon exec →
    ready."""
    with bundle.model_path.open("rb") as handle:  # into the page cache, for everyone
        while handle.read(1 << 24):
            pass
    kwargs = llama_kwargs(bundle.manifest.plan, threads)
    times: dict[str, list[float]] = collections.defaultdict(list)
    log = sock.with_suffix(".log")
    for _ in range(args.starts):
        child = subprocess.run([sys.executable, "-c", RAW_CHILD, str(bundle.model_path),
                                json.dumps(kwargs)], capture_output=True, text=True, check=True)
        times["raw_fresh"].append(float(child.stdout.split()[-1]))
        for name, extra in (("raw", {}), ("raw_mmap", {"use_mmap": True})):
            started = time.perf_counter()
            llm = llama_cpp.Llama(str(bundle.model_path), **{**kwargs, **extra})
            times[name].append(time.perf_counter() - started)
            llm.close()
        proc, ready = start_daemon(bundle.dir, sock, args.threads, log)
        times["daemon"].append(ready)
        for phase, seconds in startup_phases(log).items():
            times[f"daemon {phase}"].append(seconds)
        proc.terminate()
        proc.wait(timeout=60)
    return {k: statistics.median(v) for k, v in times.items()}


def default_bundle(tmp: Path) -> Path:
    from edgerunner.pack.default_model import ensure_default_model
    from edgerunner.pack.packer import pack
    from edgerunner.profiles import resolve_profile

    return Path(pack(ensure_default_model(), resolve_profile("rpi5"), tmp).path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--starts", type=int, default=3, help="start-up measurements")
    parser.add_argument("--threads", type=int, default=None,
                        help="default: raw gets the plan's, capped at the CPUs this process "
                        "may use; the daemon gets no --threads and chooses the same itself")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other work on the cores skews absolute numbers
    with tempfile.TemporaryDirectory(prefix="er-bench-", dir="/tmp") as tmp:
        path = args.bundle or default_bundle(Path(tmp))
        bundle = load_bundle(path)
        plan = bundle.manifest.plan
        threads = args.threads or decode_threads(plan.n_threads, cpu_budget())
        prompts = (PROMPTS * 4)[: args.prompts]

        sock = Path(tmp) / "b.sock"
        starts = start_times(bundle, threads, sock, args)
        llm = llama_cpp.Llama(str(bundle.model_path), **llama_kwargs(plan, threads))
        proc, _ = start_daemon(bundle.dir, sock, args.threads, Path(tmp) / "serve.log")
        with Client(sock) as client:
            daemon_threads = client.health()["cpu"]["threads"]
        rows: dict[str, list[float]] = {k: [] for k in (
            "raw_ttft", "d_ttft", "raw_tps", "d_tps", "raw_whole", "d_whole")}
        try:
            transport = httpx.HTTPTransport(uds=str(sock))
            with httpx.Client(transport=transport, base_url="http://edgerunner",
                              timeout=600) as http:
                raw_stream(llm, "Hello", 4)  # warm both: first-use allocations
                daemon_stream(http, "Hello", 4)
                for i, prompt in enumerate(prompts):
                    # alternate who goes first, so drift and cache order favour neither
                    order = ("raw", "d") if i % 2 == 0 else ("d", "raw")
                    for who in order:
                        start, times = (raw_stream(llm, prompt, args.max_tokens) if who == "raw"
                                        else daemon_stream(http, prompt, args.max_tokens))
                        rows[f"{who}_ttft"].append(times[0] - start if times else float("nan"))
                        rate = decode_rate(times)
                        rows[f"{who}_tps"].append(rate if rate is not None else float("nan"))
                    for who in order:
                        seconds, tokens = (raw_whole(llm, prompt, args.max_tokens)
                                           if who == "raw"
                                           else daemon_whole(http, prompt, args.max_tokens))
                        rows[f"{who}_whole"].append(tokens / seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            llm.close()

    def paired(a: str, b: str, op: Any) -> float:
        # per-prompt pairs, then the median: machine-load drift cancels within a pair
        pairs = [op(x, y) for x, y in zip(rows[a], rows[b], strict=True) if x == x and y == y]
        return statistics.median(pairs)

    med = {k: statistics.median([x for x in v if x == x]) for k, v in rows.items()}
    table = Table(title=f"{bundle.manifest.name}: raw llama-cpp-python vs daemon "
                        f"({len(prompts)} prompts, greedy, max_tokens {args.max_tokens}, "
                        f"raw {threads} threads, daemon {daemon_threads} (plan "
                        f"{plan.n_threads}); medians, ratios per prompt pair; load average "
                        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    for col in ("measure", "raw", "daemon", "daemon vs raw", "goal"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    table.add_row("decode tok/s (stream)", f"{med['raw_tps']:.1f}", f"{med['d_tps']:.1f}",
                  f"{paired('d_tps', 'raw_tps', lambda d, r: d / r):.3f}x", ">= 0.97x")
    table.add_row("time to first token", f"{med['raw_ttft'] * 1e3:.1f} ms",
                  f"{med['d_ttft'] * 1e3:.1f} ms",
                  f"{paired('d_ttft', 'raw_ttft', lambda d, r: d - r) * 1e3:+.1f} ms",
                  "<= +5 ms")
    table.add_row("whole request tok/s", f"{med['raw_whole']:.1f}", f"{med['d_whole']:.1f}",
                  f"{paired('d_whole', 'raw_whole', lambda d, r: d / r):.3f}x", "")
    raw_load, ready = starts["raw_fresh"], starts["daemon"]
    table.add_row(f"start (raw: Llama(), use_mmap={plan.mmap}, in a fresh process; daemon: "
                  "exec → ready)", f"{raw_load * 1e3:.0f} ms", f"{ready * 1e3:.0f} ms",
                  f"{ready / raw_load:.2f}x", "<= 1.5x")
    table.add_row("  raw Llama(), a later load of this process",
                  f"{starts['raw'] * 1e3:.0f} ms", "", f"{ready / starts['raw']:.2f}x", "")
    table.add_row("  raw Llama() with mmap on (what the plan's mmap choice costs)",
                  f"{starts['raw_mmap'] * 1e3:.0f} ms", "", "", "")
    for key in sorted(k for k in starts if k.startswith("daemon ")):
        # the daemon's log: load_total_s holds load_s, restore_s and imports_s
        table.add_row(f"  daemon start-up: {key.removeprefix('daemon ')}", "",
                      f"{starts[key] * 1e3:.0f} ms", "", "")
    Console().print(table)


if __name__ == "__main__":
    main()
