"""json_schema grammars, bounded before llama.cpp sees them and built once per schema in a child
process under a time and memory budget, so no schema can crash, stall or bloat the daemon.

Where llama.cpp 0.3.36's grammar code breaks (tools/research/grammar_limits.py, x86_64,
8 MiB stacks):

* optional repetitions (maxLength, maxItems, a{0,n}, (ab){0,n}): llama-cpp-python's converter
  nests one group per optional item; llama.cpp's parser recurses per group and then refuses
  more than 1,000 of them (MAX_REPETITION_THRESHOLD), but only after the recursion — 18,000
  parsed and were refused, 19,000-20,000 overflowed the stack (SIGSEGV).
* nested groups in raw GBNF: 18,000 ok, 19,000 SIGSEGV; rules each starting with the next
  (left-recursion check): 40,000 ok, 70,000 SIGSEGV.
* flat repetitions (minLength, minItems, a{n}) and long literals cost memory linearly:
  minItems 1,000,000 is an 18 MB grammar and 215 MB peak, 5,000,000 a 90 MB grammar, 591 MB.
* alternatives live at once (enum, anyOf, a|b|...) cost every token ~0.15-0.2 ms each over the
  49k-token vocabulary: 1,000 → 0.13-0.22 s per token, 10,000 → 1.3-1.7 s per token (and
  0.1-0.2 s to build, quadratic: 50,000 took 4.2 s) — the "41 s enum".

The limits below sit at or under llama.cpp's own refusal points, 17x or more below the crashes.
A build's child costs ~0.6-1 s (Python, llama_cpp and the vocabulary) and ~70 MB while it runs;
the largest legal schemas tried (a 900 kB const, minItems 10,000 of 20-property objects, 50
strings of maxLength 1,000, 500 properties) built within a 64 MiB RLIMIT_AS budget.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgerunner.runtime.protocol import BusyError, RequestError

logger = logging.getLogger(__name__)

WHERE = "response_format.json_schema.schema"
MAX_BUILDS = 2  # grammar children at once, daemon-wide: each is a Python with llama.cpp (~70 MB)
_builds = threading.BoundedSemaphore(MAX_BUILDS)


@dataclass(frozen=True)
class GrammarLimits:
    """What a json_schema may ask of llama.cpp's grammar code (see the module docstring)."""

    max_repeat: int = 1000  # maxLength, maxItems, {m,n}'s n: llama.cpp's own ceiling
    max_min_repeat: int = 10_000  # minLength, minItems, {n}: flat copies, linear memory
    max_alternatives: int = 1000  # enum, anyOf/oneOf, pattern branches: a cost on every token
    max_properties: int = 500  # per object; the converter's optional-property rules are O(n^2)
    max_depth: int = 64  # JSON nesting of the schema document (the converter recurses)
    max_nodes: int = 20_000  # JSON values in the schema document
    max_pattern_chars: int = 4096
    max_pattern_depth: int = 32  # nested groups in a pattern (the converter recurses)
    max_gbnf_chars: int = 1 << 20  # the generated grammar; 5 MB built in 0.05 s, +35 MB
    max_gbnf_depth: int = 1100  # nested groups in one rule; the parser crashed at 19,000
    max_gbnf_rules: int = 4096  # rule chains crashed the left-recursion check at 70,000
    # CPU seconds to apply the grammar to the vocabulary for one token, measured in the child on
    # this device (CPU, not wall: a busy machine must not turn a schema away); what every token
    # of that request will cost the worker. A backstop for alternatives that multiply (anyOf of
    # enums); 1,000 alternatives cost 0.13-0.22 s here.
    max_token_s: float = 1.0
    timeout_s: float = 20.0  # a whole build: start, convert, parse, first tokens
    memory_mb: int = 256  # address space a build may add (RLIMIT_AS); legal ones fit in 64


@dataclass
class BuildStats:
    """Counters: `builds` ran a child, `hits` were answered from the cache."""

    builds: int = 0
    hits: int = 0
    refused: int = 0
    crashed: int = 0
    timeouts: int = 0


@dataclass(frozen=True)
class _Verdict:
    gbnf: str | None = None
    error: str | None = None
    cacheable: bool = True  # a timeout may be the machine's load, not the schema


def schema_key(schema: Any) -> str:
    """The cache key: sha256 of the schema as sent (property order shapes the grammar)."""
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- static checks (the daemon's own thread, before any child) ------------------------------

def _above(where: str, what: str, value: int, limit: int, hint: str) -> RequestError:
    return RequestError("invalid_request",
                        f"{where}: {what} {value} is above edgerunner's grammar limit of "
                        f"{limit}; {hint}")


def _where(path: tuple[str | int, ...]) -> str:
    return WHERE + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


_REPEAT_HINTS = {
    "maxLength": ("max_repeat", "llama.cpp nests one grammar group per optional character; "
                                "lower maxLength or leave it out"),
    "maxItems": ("max_repeat", "llama.cpp nests one grammar group per optional item; "
                               "lower maxItems or leave it out"),
    "minLength": ("max_min_repeat", "each required character is spelled out in the grammar; "
                                    "lower minLength"),
    "minItems": ("max_min_repeat", "each required item is spelled out in the grammar; "
                                   "lower minItems"),
}
_LISTS = {"enum": "enum values", "anyOf": "anyOf branches", "oneOf": "oneOf branches"}
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d*)\s*(,\s*(\d*)\s*)?\}")


def check_schema(schema: Any, limits: GrammarLimits) -> None:
    """RequestError(invalid_request) naming the first limit the schema goes past, or a $ref
    that leaves the document (edgerunner never fetches schemas)."""
    nodes = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise _above(WHERE, "the number of JSON values", nodes, limits.max_nodes,
                         "send a smaller schema")
        if len(path) > limits.max_depth:
            raise _above(_where(path[:limits.max_depth]), "nesting depth", len(path),
                         limits.max_depth, "flatten the schema")
        if isinstance(node, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        _check_keywords(node, path, limits)
        stack.extend((child, (*path, key)) for key, child in node.items())


def _check_keywords(node: dict[str, Any], path: tuple[str | int, ...],
                    limits: GrammarLimits) -> None:
    where = _where(path)
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise RequestError(
                "invalid_request",
                f"{where}: $ref {json.dumps(ref)[:200]} leaves the schema document; edgerunner "
                "never fetches schemas: put the definition under $defs and refer to it as "
                "\"#/$defs/NAME\"")
    for key, (limit_name, hint) in _REPEAT_HINTS.items():
        value = node.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if value < 0:
            raise RequestError("invalid_request",
                               f"{where}: {key} {value} must be a non-negative integer")
        limit = getattr(limits, limit_name)
        if value > limit:
            raise _above(where, key, value, limit, hint)
    for key, what in _LISTS.items():
        value = node.get(key)
        if isinstance(value, list) and len(value) > limits.max_alternatives:
            raise _above(where, what, len(value), limits.max_alternatives,
                         "every alternative is checked against the vocabulary on every token; "
                         "use fewer, or a pattern")
    props = node.get("properties")
    if isinstance(props, dict) and len(props) > limits.max_properties:
        raise _above(where, "properties", len(props), limits.max_properties,
                     "split the object")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        _check_pattern(pattern, where, limits)


def _check_pattern(pattern: str, where: str, limits: GrammarLimits) -> None:
    if len(pattern) > limits.max_pattern_chars:
        raise _above(where, "pattern length", len(pattern), limits.max_pattern_chars,
                     "use a shorter pattern")
    for match in _QUANTIFIER.finditer(pattern):
        low = int(match.group(1) or 0)
        if low > limits.max_min_repeat:
            raise _above(where, f"the pattern's repetition {match.group(0)}", low,
                         limits.max_min_repeat, "each required repeat is spelled out in the "
                         "grammar; use a smaller count")
        high = match.group(3)
        if match.group(2) and high and int(high) > limits.max_repeat:
            raise _above(where, f"the pattern's repetition {match.group(0)}", int(high),
                         limits.max_repeat, "llama.cpp nests one grammar group per optional "
                         "repeat; use a smaller bound or an open one ({m,})")
    depth = deepest = branches = 0
    escaped = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        elif ch == "|":
            branches += 1
    if deepest > limits.max_pattern_depth:
        raise _above(where, "the pattern's group nesting", deepest, limits.max_pattern_depth,
                     "flatten the pattern")
    if branches + 1 > limits.max_alternatives:
        raise _above(where, "the pattern's alternatives", branches + 1,
                     limits.max_alternatives, "every alternative is checked against the "
                     "vocabulary on every token; use fewer")


def check_gbnf(gbnf: str, limits: GrammarLimits) -> str | None:
    """Why a generated grammar is too big for llama.cpp (size, rules, group nesting), or None."""
    if len(gbnf) > limits.max_gbnf_chars:
        return (f"the grammar it generates is {len(gbnf)} characters, above edgerunner's "
                f"grammar limit of {limits.max_gbnf_chars}; use fewer or shorter literals, "
                "enum values and required repeats")
    rules = gbnf.count("::=")
    if rules > limits.max_gbnf_rules:
        return (f"the grammar it generates has {rules} rules, above edgerunner's grammar limit "
                f"of {limits.max_gbnf_rules}; simplify the schema")
    deepest = _gbnf_depth(gbnf)
    if deepest > limits.max_gbnf_depth:
        return (f"the grammar it generates nests groups {deepest} deep, above edgerunner's "
                f"grammar limit of {limits.max_gbnf_depth}; lower maxLength/maxItems")
    dead = _dead_terminal(gbnf)
    if dead is not None:
        # llama.cpp masks every token there, samples one anyway and aborts the process
        # (GGML_ABORT in llama_grammar_accept_impl): {"const": "\u0000"} killed the daemon
        return (f"its grammar asks for {dead}, which no token can produce (llama.cpp would "
                "abort mid-generation); remove NUL characters and empty character classes")
    return None


_GBNF_ESCAPES = {"n": 10, "r": 13, "t": 9, "\\": 92, '"': 34, "[": 91, "]": 93}
_GBNF_HEX = {"x": 2, "u": 4, "U": 8}
_MAX_CODE_POINT = 0x10FFFF


def _gbnf_char(text: str, i: int) -> tuple[int, int]:
    """The code point of the (possibly escaped) character at text[i], and the index after it;
    -1 for an escape llama.cpp refuses by itself."""
    if text[i] != "\\" or i + 1 >= len(text):
        return ord(text[i]), i + 1
    kind = text[i + 1]
    if kind in _GBNF_HEX:
        end = i + 2 + _GBNF_HEX[kind]
        try:
            return int(text[i + 2:end], 16), end
        except ValueError:
            return -1, i + 2
    return _GBNF_ESCAPES.get(kind, -1), i + 2


def _dead_terminal(gbnf: str) -> str | None:
    """A terminal no token can match: a NUL (llama.cpp drops tokens whose text starts with
    one, and a raw NUL cuts the grammar string short) or an empty character class."""
    if "\0" in gbnf:
        return "a raw NUL character"
    i, n = 0, len(gbnf)
    while i < n:
        ch = gbnf[i]
        if ch == '"':
            i += 1
            while i < n and gbnf[i] != '"':
                code, i = _gbnf_char(gbnf, i)
                if code == 0:
                    return "a NUL character"
            i += 1
        elif ch == "[":
            start, i = i, i + 1
            negated = i < n and gbnf[i] == "^"
            i += negated
            ranges: list[tuple[int, int]] = []
            while i < n and gbnf[i] != "]":
                low, i = _gbnf_char(gbnf, i)
                high = low
                if i + 1 < n and gbnf[i] == "-" and gbnf[i + 1] != "]":
                    high, i = _gbnf_char(gbnf, i + 1)
                ranges.append((low, high))
            i += 1
            if _class_is_empty(ranges, negated):
                return f"the character class {gbnf[start:i][:60]}"
        else:
            i += 1
    return None


def _class_is_empty(ranges: list[tuple[int, int]], negated: bool) -> bool:
    # what a token can start with: code points 1..U+10FFFF
    spans = sorted((max(low, 1), high) for low, high in ranges if high >= max(low, 1))
    if not negated:
        return not spans
    reach = 1
    for low, high in spans:
        if low > reach:
            return False
        reach = max(reach, high + 1)
    return reach > _MAX_CODE_POINT


def _gbnf_depth(gbnf: str) -> int:
    """Deepest ( ) nesting outside "literals" and [classes]."""
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for ch in gbnf:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch == '"':
            quote = '"'
        elif ch == "[":
            quote = "]"
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        elif ch == "\n":
            depth = 0
    return deepest


# -- the builder (admission threads; the work happens in a child) ----------------------------

class GrammarBuilder:
    """Turns json_schema into GBNF that llama.cpp was seen to build and apply, in a child
    process per new schema (a crash, a timeout or the memory cap refuses that request only);
    verdicts are cached by schema hash (LRU), so a repeated schema costs nothing."""

    def __init__(self, model_path: Path, limits: GrammarLimits | None = None, *,
                 cache_size: int = 64, cache_chars: int = 8 << 20) -> None:
        self.model_path = Path(model_path)
        self.limits = limits or GrammarLimits()
        self.cache_size = cache_size
        self.cache_chars = cache_chars
        self.stats = BuildStats()
        self._cache: collections.OrderedDict[str, _Verdict] = collections.OrderedDict()
        self._cached_chars = 0
        self._pending: dict[str, Future[_Verdict]] = {}
        self._lock = threading.Lock()

    def build(self, schema: Any) -> str:
        """GBNF for a json_schema; RequestError naming the limit, the crash or the timeout."""
        check_schema(schema, self.limits)
        key = schema_key(schema)
        with self._lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
                return self._answer(verdict)
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:  # the same schema is being built for another request: share its verdict
            return self._answer(pending.result())
        try:
            verdict = self._build(schema)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:  # cached before it stops being pending: no second build sneaks in
            del self._pending[key]
            if verdict.cacheable:
                self._remember(key, verdict)
        pending.set_result(verdict)
        return self._answer(verdict)

    def _answer(self, verdict: _Verdict) -> str:
        if verdict.error is not None:
            raise RequestError("invalid_request", f"{WHERE}: {verdict.error}")
        assert verdict.gbnf is not None
        return verdict.gbnf

    def _remember(self, key: str, verdict: _Verdict) -> None:
        self._cache[key] = verdict
        self._cached_chars += len(verdict.gbnf or "")
        while len(self._cache) > self.cache_size or self._cached_chars > self.cache_chars:
            _, old = self._cache.popitem(last=False)
            self._cached_chars -= len(old.gbnf or "")

    def _build(self, schema: Any) -> _Verdict:
        if not _builds.acquire(timeout=self.limits.timeout_s):
            raise BusyError(f"{MAX_BUILDS} grammars are being built for other requests; "
                            "retry shortly (a schema already seen is served from the cache)",
                            retry_after=self.limits.timeout_s)
        try:
            self.stats.builds += 1
            verdict = self._run_child(json.dumps(schema))
        finally:
            _builds.release()
        if verdict.error is not None:
            self.stats.refused += 1
        return verdict

    def _run_child(self, schema_json: str) -> _Verdict:
        """Convert, check, parse and apply the grammar in a fresh process; how it ended."""
        job = json.dumps({"model": str(self.model_path), "schema": schema_json,
                          "limits": asdict(self.limits)})
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "edgerunner.runtime.engine.grammar",
                                 str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(job.encode("utf-8"), timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.stats.timeouts += 1
            logger.warning("grammar build timed out", extra={"event": "grammar_timeout"})
            return _Verdict(error=f"building its grammar took longer than edgerunner's budget "
                                  f"of {self.limits.timeout_s:g} s; simplify the schema",
                            cacheable=False)
        seconds = time.monotonic() - started
        if proc.returncode < 0:
            self.stats.crashed += 1
            name = signal.Signals(-proc.returncode).name
            logger.warning("grammar build died by %s", name,
                           extra={"event": "grammar_crashed", "signal": name})
            cause = (f"most likely it went past the build's {self.limits.memory_mb} MiB memory "
                     "budget" if name == "SIGABRT" else "the daemon is unaffected")
            return _Verdict(error=f"llama.cpp crashed ({name}) building its grammar ({cause}); "
                                  "simplify the schema")
        lines = out.decode("utf-8", "replace").splitlines()
        if proc.returncode != 0 or not lines:
            # the exception's type only: its message might quote the schema
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            logger.warning("grammar build failed (exit %s, %s)", proc.returncode,
                           tail[0].split(":", 1)[0][:80], extra={"event": "grammar_failed"})
            return _Verdict(error=f"building its grammar failed (exit {proc.returncode}); "
                                  "simplify the schema", cacheable=False)
        result = json.loads(lines[-1])
        if result.get("refused"):
            result["error"] = ("it produced a grammar llama.cpp rejects"
                               f"{_llama_reason(err)}; simplify the schema")
        logger.info("grammar built", extra={"event": "grammar_built", "seconds": seconds,
                                            "ok": result.get("error") is None,
                                            "gbnf_chars": len(result.get("gbnf") or "")})
        return _Verdict(gbnf=result.get("gbnf"), error=result.get("error"))


def _llama_reason(stderr: bytes) -> str:
    # llama.cpp prints the whole grammar after its reason: only the reason goes back
    for line in stderr.decode("utf-8", "replace").splitlines():
        for marker in ("error parsing grammar: ", "invalid grammar: ", "unsupported grammar, "):
            if marker in line:
                return f" ({line.split(marker, 1)[1].strip()[:200]})"
    return ""


# -- the child: `python -m edgerunner.runtime.engine.grammar PARENT_PID`, a job as JSON on stdin --

def _child_main() -> None:
    _die_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
    job = json.loads(sys.stdin.buffer.read())
    limits = GrammarLimits(**job["limits"])
    _forbid_network()
    import llama_cpp
    from llama_cpp import llama_grammar
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=job["model"], params=params, verbose=False)
    _limit_memory(limits.memory_mb)
    result: dict[str, Any] = {}
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(job["schema"])
    except MemoryError:
        result["error"] = (f"converting it to a grammar went past the build's "
                           f"{limits.memory_mb} MiB memory budget; simplify the schema")
    except Exception as exc:  # the converter raises assorted types for bad schemas
        result["error"] = (f"it cannot be turned into a grammar: {type(exc).__name__}: "
                           f"{str(exc)[:300]}")
    else:
        result["error"] = check_gbnf(gbnf, limits)
        if result["error"] is None:
            try:
                result.update(_try_grammar(llama_cpp, model.vocab, gbnf, limits))
            except UnicodeEncodeError:
                result["error"] = "it contains a lone UTF-16 surrogate; send valid Unicode"
            if result.get("error") is None and not result.get("refused"):
                result["gbnf"] = gbnf
    print(json.dumps(result))


def _try_grammar(llama_cpp: Any, vocab: Any, gbnf: str, limits: GrammarLimits) -> dict[str, Any]:
    """Build the sampler and apply it for a few tokens, as generation will."""
    import numpy as np

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        return {"refused": True}
    try:
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        data = np.zeros(n_vocab, dtype=np.dtype(
            [("id", np.intc), ("logit", np.single), ("p", np.single)], align=True))
        slowest = 0.0
        for _ in range(3):
            data["id"] = np.arange(n_vocab, dtype=np.intc)
            data["logit"] = 0.0
            candidates = llama_cpp.llama_token_data_array(
                data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab,
                selected=-1, sorted=False)
            started = time.process_time()
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            slowest = max(slowest, time.process_time() - started)
            allowed = data["id"][: candidates.size][
                np.isfinite(data["logit"][: candidates.size])]
            if len(allowed) == 0:
                break
            llama_cpp.llama_sampler_accept(sampler, int(allowed[0]))
    finally:
        llama_cpp.llama_sampler_free(sampler)
    if slowest > limits.max_token_s:
        return {"error": f"applying its grammar takes {slowest:.2f} CPU s per token, above "
                         f"edgerunner's grammar limit of {limits.max_token_s:g} s; use fewer "
                         "alternatives (enum, anyOf, pattern branches)"}
    return {}


def _die_with_parent(parent: int) -> None:
    # a daemon that exits mid-build (SIGKILL included) takes its build along, not leaves it
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _forbid_network() -> None:
    # llama-cpp-python's converter fetches https $refs with requests when asserts are off
    # (PYTHONOPTIMIZE); the parent refuses such refs, and here nothing could connect anyway
    import socket

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError("edgerunner's grammar builder never opens network connections")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse
    sys.modules["requests"] = None  # type: ignore[assignment]


def _limit_memory(budget_mb: int) -> None:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                cap = int(line.split()[1]) * 1024 + (budget_mb << 20)
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


if __name__ == "__main__":
    _child_main()
