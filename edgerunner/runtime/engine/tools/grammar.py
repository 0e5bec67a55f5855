"""The schema-held grammar for tool calls: only a call the family's syntax wraps, naming a
declared tool, with arguments that satisfy that tool's `parameters` schema (types, required,
enum, bounds), converted by the same bounded, child-built JSON-schema path json_schema uses
(runtime.engine.grammar) — so a call can never name an undeclared tool or break its schema.

Under tool_choice "auto" the grammar is lazy (llama.cpp's
llama_sampler_init_grammar_lazy_patterns): free text until the family's trigger, then only a
call; under "required" or a named function it holds from the first token.

When a trigger pattern matches, llama.cpp replays the generated text from the match into the
grammar, and text the grammar refuses there is a C++ exception that aborts the process
(tools/research: "Unexpected empty grammar stack after accepting piece", SIGABRT) — llama-server
catches it, a ctypes caller cannot. So every pattern here ends at the end of the text so far
(`...$`) and matches only text the grammar accepts: the trigger and any prefix of what the
grammar allows next, up to the opening quote of the function name. A token that runs past that
simply does not trigger (the call is then parsed, not held).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgerunner.runtime.engine.grammar import WHERE, GrammarBuilder, GrammarLimits, check_schema
from edgerunner.runtime.engine.tools.families import WS, Family
from edgerunner.runtime.protocol import RequestError
from edgerunner.runtime.tool_protocol import Tool, ToolsOptions

CALL_RULE = "edgerunner-call"

# what the grammar allows between the pieces: the families' `ws` rule and the JSON-schema
# converter's `space` rule (llama_cpp.llama_grammar.SPACE_RULE: " "?)
_WS = "[ \\t\\n]{0,4}"
_SPACE = " ?"
# a call's opening as the converter writes it, up to the name's opening quote
_CALL = ("{", _SPACE, '"name"', _SPACE, ":", _SPACE, '"')
# per family: (only at the output's start?, how many pieces must be whole, the pieces the
# grammar begins with); at the start a bare "{" is not yet a call: the key must follow
_LAZY: dict[str, list[tuple[bool, int, tuple[str, ...]]]] = {
    "hermes": [(False, 1, ("<tool_call>", _WS, *_CALL))],
    "llama3": [(False, 1, ("<|python_tag|>", _WS, *_CALL)), (True, 3, _CALL)],
    "mistral": [(False, 1, ("[TOOL_CALLS]", _WS, "[", _WS, *_CALL))],
    "phi4": [(False, 1, ("functools", _WS, "[", _WS, *_CALL))],
    "generic": [(True, 3, ("{", _WS, '"tool_calls"', _WS, ":", _WS, "[", _WS, *_CALL))],
}


@dataclass(frozen=True)
class ToolGrammar:
    """What the sampler needs: the GBNF (root `root`) and, when lazy, its triggers."""

    gbnf: str
    lazy: bool
    trigger_patterns: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()  # may be one control token in the model's vocabulary

    def trigger_tokens(self, tokenize: Callable[[str], list[int]]) -> list[int]:
        """The trigger words that are one token (a control token such as Qwen's <tool_call>
        or Llama's <|python_tag|>, whose text a pattern may never see)."""
        tokens = []
        for word in self.trigger_words:
            ids = tokenize(word)
            if len(ids) == 1:
                tokens.append(ids[0])
        return tokens


def _piece(piece: str) -> tuple[str, str]:
    """(the regex for the piece, for any non-empty prefix of it)."""
    if piece in (_WS, _SPACE):
        return piece, piece
    escaped = [re.escape(ch) for ch in piece]
    prefix = escaped[-1]
    for ch in reversed(escaped[:-1]):
        prefix = f"{ch}(?:{prefix})?"
    return "".join(escaped), prefix


def prefix_pattern(pieces: Sequence[str], need: int = 1) -> str:
    """A regex for the first `need` pieces whole, then any prefix of the rest."""
    rest = ""
    for piece in reversed(pieces[need:]):
        whole, part = _piece(piece)
        rest = f"(?:{whole}{rest}|{part})" if rest else f"(?:{part})"
    return "".join(_piece(p)[0] for p in pieces[:need]) + (f"{rest}?" if rest else "")


def lazy_patterns(family: Family) -> list[str]:
    """llama.cpp trigger patterns (std::regex ECMAScript) that only match where the replayed
    text fits the family's grammar (see the module docstring)."""
    out = []
    for at_start, need, pieces in _LAZY.get(family.name, []):
        body = prefix_pattern(pieces, need)
        # ^...$ makes llama.cpp match the whole text so far; without ^ it searches, and $
        # still pins the match to the end of the text
        out.append(f"^\\s*({body})$" if at_start else f"({body})$")
    return out


def _where(i: int) -> str:
    return f"tools[{i}].function.parameters"


def check_tools(tools: Sequence[Tool], limits: GrammarLimits) -> None:
    """RequestError naming the tool and the first grammar limit its parameters go past."""
    for i, tool in enumerate(tools):
        schema = tool.function.parameters_schema()
        if schema.get("type", "object") != "object":
            raise RequestError("invalid_request",
                               f"{_where(i)}: a function's parameters must be an object schema "
                               f'("type": "object"), not {schema.get("type")!r}')
        try:
            check_schema(schema, limits)
        except RequestError as exc:
            raise RequestError(exc.code, exc.message.replace(WHERE, _where(i), 1)) from exc


def _rebase_refs(node: Any, base: str) -> Any:
    """The schema with its local $refs pointing into the combined document."""
    if isinstance(node, list):
        return [_rebase_refs(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rebase_refs(v, base) for k, v in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = base + ref[1:]
    return out


# integer ranges up to this many values become an enum (llama-cpp-python's converter ignores
# minimum/maximum); each value is an alternative the grammar weighs while the number is written
MAX_RANGE_ENUM = 256


def _bounds(node: dict[str, Any]) -> tuple[int, int] | None:
    """An integer schema's inclusive (low, high), when both are set as integers."""
    low, high = node.get("minimum"), node.get("maximum")
    if isinstance(node.get("exclusiveMinimum"), int) and not isinstance(
            node["exclusiveMinimum"], bool):
        low = node["exclusiveMinimum"] + 1
    if isinstance(node.get("exclusiveMaximum"), int) and not isinstance(
            node["exclusiveMaximum"], bool):
        high = node["exclusiveMaximum"] - 1
    if isinstance(low, float) and low.is_integer():
        low = int(low)
    if isinstance(high, float) and high.is_integer():
        high = int(high)
    if not isinstance(low, int) or not isinstance(high, int) or isinstance(low, bool) \
            or isinstance(high, bool):
        return None
    return low, high


# keywords that only annotate: a schema with nothing else allows any value (HA's GetLiveContext
# `domain` is {"description": ...}), which llama-cpp-python's converter refuses as it stands
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment",
                          "deprecated", "readOnly", "writeOnly"})
_ANY_TYPE = ["string", "number", "boolean", "array", "object", "null"]


def _any_if_bare(schema: Any) -> Any:
    if isinstance(schema, dict) and set(schema) <= _ANNOTATIONS:
        return {**schema, "type": list(_ANY_TYPE)}
    return schema


def hold_schema(node: Any) -> Any:
    """The parameters' schema rewritten so the grammar holds what the converter would let
    pass: every array of enum items at most as long as there are values (Home Assistant's
    `domain` has no maxItems: a small model repeated "fan" until max_tokens; a larger
    minItems or a smaller maxItems is kept), an integer between minimum and maximum (up to
    MAX_RANGE_ENUM values) as the enum of those values (HA's brightness 0-100), and a
    property or item schema that only annotates as any JSON value."""
    if isinstance(node, list):
        return [hold_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: hold_schema(v) for k, v in node.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _any_if_bare(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _any_if_bare(out["items"])
    bounds = _bounds(out) if out.get("type") == "integer" and "enum" not in out else None
    if bounds is not None and 0 < bounds[1] - bounds[0] + 1 <= MAX_RANGE_ENUM:
        out = {k: v for k, v in out.items() if k not in (
            "type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
        out["enum"] = list(range(bounds[0], bounds[1] + 1))
    items = out.get("items")
    if isinstance(items, dict) and isinstance(items.get("enum"), list) and items["enum"]:
        least = out.get("minItems")
        cap = max(len(items["enum"]), least if isinstance(least, int) else 0)
        if not isinstance(out.get("maxItems"), int) or out["maxItems"] > cap:
            out["maxItems"] = cap
    return out


def call_schema(tools: Sequence[Tool], args_key: str) -> dict[str, Any]:
    """One JSON schema for a call to any of `tools`: {"name": const, args_key: parameters}."""
    alternatives = []
    for i, tool in enumerate(tools):
        base = (f"#/anyOf/{i}" if len(tools) > 1 else "#") + f"/properties/{args_key}"
        params = hold_schema(_rebase_refs(copy.deepcopy(tool.function.parameters_schema()),
                                          base))
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": False,
        })
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def wrap(call_gbnf: str, family: Family, parallel: bool) -> str:
    """The converter's grammar for one call (root `root`) inside the family's syntax."""
    if re.search(rf"^{CALL_RULE}\b", call_gbnf, re.MULTILINE) or re.search(
            r"^ws ::=", call_gbnf, re.MULTILINE):
        raise RequestError("invalid_request", "tools: a property name collides with "
                                              "edgerunner's grammar rules; rename it")
    body = re.sub(r"^root ::=", f"{CALL_RULE} ::=", call_gbnf, count=1, flags=re.MULTILINE)
    calls = re.sub(r"\bcall\b", CALL_RULE, family.gbnf_calls(parallel))
    return f"root ::= {calls}\nws ::= {WS}\n{body}"


def build(options: ToolsOptions, family: Family, builder: GrammarBuilder) -> ToolGrammar | None:
    """The grammar for this request's tools (None: no tools offered, or a family whose call
    syntax is not JSON); RequestError for tools past the grammar bounds."""
    tools = options.offered()
    if not tools or family.gbnf_one is None:
        return None
    check_tools(tools, builder.limits)
    try:
        call_gbnf = builder.build(call_schema(tools, family.args_key))
    except RequestError as exc:
        raise RequestError(exc.code, exc.message.replace(
            WHERE, "tools (the grammar of all their parameters together)", 1)) from exc
    gbnf = wrap(call_gbnf, family, options.parallel_tool_calls)
    if options.forced:
        return ToolGrammar(gbnf=gbnf, lazy=False)
    return ToolGrammar(gbnf=gbnf, lazy=True,
                       trigger_patterns=tuple(lazy_patterns(family)),
                       trigger_words=tuple(pieces[0] for at_start, _, pieces in
                                           _LAZY.get(family.name, []) if not at_start))


def add_to_chain(chain: Any, model: Any, grammar: ToolGrammar) -> None:
    """Add the tool grammar to a llama_cpp LlamaSampler chain (where sampler_chain adds a
    json_schema grammar): lazy with its triggers, or from the first token."""
    from llama_cpp import llama_grammar

    g = llama_grammar.LlamaGrammar.from_string(grammar.gbnf, verbose=False)
    if not grammar.lazy:
        chain.add_grammar(model, g)
        return

    def tokenize(text: str) -> list[int]:
        return list(model.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    chain.add_grammar_lazy_patterns(model, g, list(grammar.trigger_patterns),
                                    grammar.trigger_tokens(tokenize))
