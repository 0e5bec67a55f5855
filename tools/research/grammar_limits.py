"""Where llama.cpp's grammar parser and sampler break, measured one fresh process per probe.

Each probe turns a JSON schema into GBNF with llama-cpp-python's converter (as the daemon
does), or takes raw GBNF, then in a child process: converts it, builds the grammar sampler
(llama_sampler_init_grammar: parse, left-recursion check, initial stacks) on a thread with the
default stack (the daemon builds samplers on threads too), and applies it to the whole
vocabulary for a few tokens (the slowest token's wall and CPU time). The parent records how the
child ended: ok, refused (llama.cpp returned NULL), a converter exception, a signal (SIGSEGV:
the parser's recursion ran off the stack), the memory cap (RLIMIT_AS) or the time cap. The
numbers behind edgerunner.runtime.engine.grammar's limits come from here.

    python tools/research/grammar_limits.py                  # every family
    python tools/research/grammar_limits.py string_max enum  # some families
    python tools/research/grammar_limits.py --json           # rows as JSON lines
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from typing import Any

from edgerunner.pack.default_model import ensure_default_model

PROBE_TIMEOUT_S = 90.0
PROBE_AS_BYTES = 4 << 30  # keep a runaway probe from taking the shared machine down

CHILD = r"""
import ctypes, json, resource, sys, threading, time
spec = json.loads(sys.stdin.read())
resource.setrlimit(resource.RLIMIT_AS, (spec["as_bytes"], spec["as_bytes"]))
import llama_cpp
from llama_cpp import llama_grammar
from llama_cpp._internals import LlamaModel

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0

out = {"base_mb": 0.0}
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = LlamaModel(path_model=spec["model"], params=params, verbose=False)
out["base_mb"] = peak_mb()
started = time.perf_counter()
try:
    if spec["kind"] == "schema":
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(spec["value"]))
    else:
        gbnf = spec["value"]
except BaseException as exc:
    out.update(outcome="converter", detail=f"{type(exc).__name__}: {str(exc)[:120]}",
               convert_s=time.perf_counter() - started, peak_mb=peak_mb())
    print(json.dumps(out)); sys.exit(0)
out["convert_s"] = time.perf_counter() - started
out["gbnf_chars"] = len(gbnf)
out["gbnf_depth"] = max_depth = 0
depth = 0
for ch in gbnf:  # parenthesis nesting (close enough: literals rarely hold parentheses)
    if ch == "(":
        depth += 1; max_depth = max(max_depth, depth)
    elif ch == ")":
        depth -= 1
out["gbnf_depth"] = max_depth
sys.stdout.flush()

def build():
    t0 = time.perf_counter()
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    out["init_s"] = time.perf_counter() - t0
    if not sampler:
        out["outcome"] = "refused"
        return
    n = llama_cpp.llama_vocab_n_tokens(model.vocab)
    steps, cpu = [], []
    for _ in range(spec["steps"]):
        data = (llama_cpp.llama_token_data * n)()
        for i in range(n):
            data[i].id = i
        arr = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        t0, c0 = time.perf_counter(), time.thread_time()
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
        steps.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        allowed = [data[i].id for i in range(arr.size) if data[i].logit != float("-inf")]
        out["allowed"] = len(allowed)
        if not allowed:
            break
        llama_cpp.llama_sampler_accept(sampler, allowed[0])
    out["apply_s"] = max(steps) if steps else 0.0
    out["apply_cpu_s"] = max(cpu) if cpu else 0.0
    llama_cpp.llama_sampler_free(sampler)
    out["outcome"] = "ok"

thread = threading.Thread(target=build)
thread.start()
thread.join()
out["peak_mb"] = peak_mb()
print(json.dumps(out))
"""


def _schema(value: Any) -> dict[str, Any]:
    return {"kind": "schema", "value": value}


def _gbnf(value: str) -> dict[str, Any]:
    return {"kind": "gbnf", "value": value}


def _nested_objects(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


FAMILIES: dict[str, tuple[str, list[int], Any]] = {
    # name: (what the value is, values, value -> probe)
    "string_max": ("maxLength", [500, 1000, 1001, 2000, 8000, 16000, 17000, 18000, 20000],
                   lambda n: _schema({"type": "string", "maxLength": n})),
    "string_min": ("minLength", [1000, 10_000, 100_000, 1_000_000],
                   lambda n: _schema({"type": "string", "minLength": n})),
    "pattern_rep": ("a{0,N}", [1000, 1001, 16000, 20000],
                    lambda n: _schema({"type": "string", "pattern": f"^a{{0,{n}}}$"})),
    "pattern_group_rep": ("(ab){0,N}", [500, 1000, 1001, 30000],
                          lambda n: _schema({"type": "string", "pattern": f"^(ab){{0,{n}}}$"})),
    "pattern_min_rep": ("a{N}", [1000, 100_000, 1_000_000],
                        lambda n: _schema({"type": "string", "pattern": f"^[ab]{{{n}}}$"})),
    "array_max": ("maxItems", [100, 500, 1000, 1001, 16000, 20000],
                  lambda n: _schema({"type": "array", "items": {"type": "integer"},
                                     "maxItems": n})),
    "array_min": ("minItems", [1000, 10_000, 100_000, 1_000_000, 5_000_000],
                  lambda n: _schema({"type": "array", "items": {"type": "integer"},
                                     "minItems": n})),
    "enum": ("enum items", [100, 500, 1000, 2000, 5000, 10_000],
             lambda n: _schema({"enum": [f"value-{i}" for i in range(n)]})),
    "anyof": ("anyOf branches", [100, 1000, 5000],
              lambda n: _schema({"anyOf": [{"const": i} for i in range(n)]})),
    "pattern_alt": ("a|b|... branches", [100, 1000, 5000],
                    lambda n: _schema({"type": "string",
                                       "pattern": "^(" + "|".join(f"w{i}" for i in range(n))
                                       + ")$"})),
    "optional_props": ("optional properties", [50, 100, 200, 400],
                       lambda n: _schema({"type": "object", "properties": {
                           f"p{i}": {"type": "integer"} for i in range(n)}})),
    "required_props": ("required properties", [100, 1000, 5000],
                       lambda n: _schema({"type": "object", "properties": {
                           f"p{i}": {"type": "integer"} for i in range(n)},
                           "required": [f"p{i}" for i in range(n)]})),
    "object_nesting": ("nested objects", [32, 64, 128, 300, 450],
                       lambda n: _schema(_nested_objects(n))),
    "const_size": ("const string bytes", [10_000, 100_000, 1_000_000, 10_000_000],
                   lambda n: _schema({"const": "x" * n})),
    "gbnf_groups": ("nested ( ) in GBNF", [1000, 5000, 10_000, 15_000, 17_000, 20_000],
                    lambda n: _gbnf("root ::= " + "(" * n + '"a"' + ")" * n)),
    "gbnf_rule_chain": ("rules, each starting with the next", [1000, 10_000, 100_000],
                        lambda n: _gbnf("\n".join([f"r{i} ::= r{i + 1}" for i in range(n)]
                                                  + [f'r{n} ::= "a"', "root ::= r0"]))),
    "gbnf_alternatives": ("alternatives of root", [1000, 10_000, 50_000],
                          lambda n: _gbnf("root ::= " + " | ".join(f'"v{i}"'
                                                                   for i in range(n)))),
}


def probe(spec: dict[str, Any], model: str, steps: int = 3) -> dict[str, Any]:
    """Run one probe in a child process; how it ended, with its timings."""
    args = json.dumps({**spec, "model": model, "steps": steps, "as_bytes": PROBE_AS_BYTES})
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD], input=args, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"outcome": "timeout", "wall_s": time.perf_counter() - started}
    wall = time.perf_counter() - started
    if proc.returncode < 0:
        return {"outcome": signal.Signals(-proc.returncode).name, "wall_s": wall}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        memory = "MemoryError" in proc.stderr or "bad_alloc" in proc.stderr
        return {"outcome": "memory" if memory else f"exit {proc.returncode}",
                "detail": tail[0][:120], "wall_s": wall}
    result: dict[str, Any] = json.loads(lines[-1])
    result["wall_s"] = wall
    if result.get("outcome") == "refused":
        reason = [line for line in proc.stderr.splitlines() if "error parsing grammar" in line]
        result["detail"] = reason[0].split("error parsing grammar: ")[-1][:120] if reason else ""
    return result


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"some of: {' '.join(FAMILIES)}")
    parser.add_argument("--json", action="store_true", help="one JSON object per probe")
    args = parser.parse_args()
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {' '.join(FAMILIES)}")
    model = str(ensure_default_model())
    if not args.json:
        print(f"{'family':<18} {'value':>9} {'outcome':<10} {'conv s':>7} {'init s':>7} "
              f"{'apply s':>7} {'cpu s':>7} {'gbnf kB':>8} {'depth':>6} {'peak MB':>8}  detail")
    for family in args.families or FAMILIES:
        what, values, make = FAMILIES[family]
        for value in values:
            row = {"family": family, "what": what, "value": value,
                   **probe(make(value), model)}
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            kb = row["gbnf_chars"] / 1000 if "gbnf_chars" in row else None
            print(f"{family:<18} {value:>9} {row['outcome']:<10} "
                  f"{_fmt(row.get('convert_s'), '7.3f'):>7} {_fmt(row.get('init_s'), '7.3f'):>7} "
                  f"{_fmt(row.get('apply_s'), '7.3f'):>7} "
                  f"{_fmt(row.get('apply_cpu_s'), '7.3f'):>7} {_fmt(kb, '8.1f'):>8} "
                  f"{_fmt(row.get('gbnf_depth'), '6d'):>6} {_fmt(row.get('peak_mb'), '8.0f'):>8}  "
                  f"{row.get('detail', '')}", flush=True)


if __name__ == "__main__":
    main()
