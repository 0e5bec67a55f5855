"""The schema-held grammar for tool calls: only a call the family's syntax wraps, naming a
declared tool, with arguments that satisfy that tool's `parameters` schema (types, required,
enum, bounds), converted by the same bounded, child-built JSON-schema path json_schema uses
(runtime.engine.grammar) — so a call can never name an undeclared tool or break its schema.

Under tool_choice "auto" the grammar is lazy (llama.cpp's
llama_sampler_init_grammar_lazy_patterns): free text until the family's trigger, then only a
call; under "required" or a named function it holds from the first token.
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


def call_schema(tools: Sequence[Tool], args_key: str) -> dict[str, Any]:
    """One JSON schema for a call to any of `tools`: {"name": const, args_key: parameters}."""
    alternatives = []
    for i, tool in enumerate(tools):
        base = (f"#/anyOf/{i}" if len(tools) > 1 else "#") + f"/properties/{args_key}"
        params = _rebase_refs(copy.deepcopy(tool.function.parameters_schema()), base)
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
                       trigger_patterns=tuple(family.lazy_patterns()),
                       trigger_words=family.triggers)


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
