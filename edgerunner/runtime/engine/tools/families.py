"""Tool-calling formats by model family: how each is recognised from the GGUF's
`tokenizer.chat_template`, how the tools reach the prompt, what text starts a call, and the
call syntax the grammar holds the model to (runtime.engine.tools.grammar) and the parser reads
back (runtime.engine.tools.parse).

Templates with tool syntax are rendered with `tools=` through jinja2 as llama-cpp-python's
Jinja2ChatFormatter does (llama-server's --jinja); templates without it get the generic
format: a system block listing the tools and a JSON call shape, as llama-server's generic
handler does, so every model can call tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from edgerunner.runtime.tool_protocol import ParsedCall, Tool

if TYPE_CHECKING:
    from llama_cpp.llama_chat_format import ChatFormatterResponse

WS = "[ \\t\\n]{0,4}"  # GBNF: the whitespace the wrappers allow between their pieces


@dataclass(frozen=True)
class Family:
    """One tool-calling format."""

    name: str
    markers: tuple[str, ...]  # template text that identifies the family (any of them)
    native: bool  # the template renders `tools` itself (else: the generic system block)
    triggers: tuple[str, ...]  # text that starts a call anywhere in the output
    start: str | None  # compact JSON that starts a call only at the output's very start
    args_key: str  # "arguments", or Llama's "parameters"
    syntax: Literal["json", "gemma"]
    open: str  # model-shaped output: before the calls
    call_open: str  # around each call
    call_close: str
    sep: str  # between calls
    close: str  # after the calls
    parallel: bool  # the format carries several calls in one answer
    # GBNF over the rules `call` and `ws`: open, one call, and between calls, close
    # (gbnf_one None: the syntax is not JSON and the grammar does not hold it)
    gbnf_one: str | None
    gbnf_open: str = ""
    gbnf_sep: str = ""
    gbnf_close: str = ""

    def gbnf_calls(self, parallel: bool) -> str:
        """The GBNF of the calls (several when `parallel` and the format carries them)."""
        assert self.gbnf_one is not None
        more = f" ({self.gbnf_sep} {self.gbnf_one})*" if parallel and self.parallel else ""
        return f"{self.gbnf_open} {self.gbnf_one}{more} {self.gbnf_close}".strip()

    def format_calls(self, calls: Sequence[ParsedCall]) -> str:
        """The calls as the model writes them (the shape the grammar allows)."""
        if self.syntax == "gemma":
            return "".join(f"<start_function_call>call:{c.name}{_gemma_args(c.arguments)}"
                           "<end_function_call>" for c in calls)
        body = self.sep.join(
            self.call_open + json.dumps({"name": c.name, self.args_key: c.arguments},
                                        ensure_ascii=False) + self.call_close
            for c in calls)
        return self.open + body + self.close


def _gemma_args(arguments: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, str):
            return f"<escape>{v}<escape>"
        if isinstance(v, dict):
            return _gemma_args(v)
        if isinstance(v, list):
            return "[" + ",".join(value(x) for x in v) + "]"
        return json.dumps(v)
    return "{" + ",".join(f"{k}:{value(v)}" for k, v in arguments.items()) + "}"


HERMES = Family(
    name="hermes", markers=("<tool_call>",), native=True, triggers=("<tool_call>",),
    start=None, args_key="arguments", syntax="json", open="", call_open="<tool_call>\n",
    call_close="\n</tool_call>", sep="\n", close="", parallel=True,
    gbnf_one='"<tool_call>" ws call ws "</tool_call>"', gbnf_sep="ws")
LLAMA3 = Family(
    name="llama3", markers=("<|python_tag|>", '"parameters"'), native=True,
    triggers=("<|python_tag|>",), start='{"name":', args_key="parameters", syntax="json",
    open="", call_open="", call_close="", sep="", close="", parallel=False,
    gbnf_one="call", gbnf_open='("<|python_tag|>" ws)?')
MISTRAL = Family(
    name="mistral", markers=("[TOOL_CALLS]",), native=True, triggers=("[TOOL_CALLS]",),
    start=None, args_key="arguments", syntax="json", open="[TOOL_CALLS][", call_open="",
    call_close="", sep=", ", close="]", parallel=True,
    gbnf_one="call", gbnf_open='"[TOOL_CALLS]" ws "[" ws', gbnf_sep='ws "," ws',
    gbnf_close='ws "]"')
PHI4 = Family(
    name="phi4", markers=("<|tool_call|>", "functools["), native=True,
    triggers=("functools", "<|tool_call|>"), start=None, args_key="arguments",
    syntax="json", open="functools[", call_open="", call_close="", sep=", ", close="]",
    parallel=True, gbnf_one="call", gbnf_open='"functools" ws "[" ws', gbnf_sep='ws "," ws',
    gbnf_close='ws "]"')
FUNCTIONGEMMA = Family(
    name="functiongemma", markers=("<start_function_call>",), native=True,
    triggers=("<start_function_call>",), start=None, args_key="arguments", syntax="gemma",
    open="", call_open="", call_close="", sep="", close="", parallel=True, gbnf_one=None)
GENERIC = Family(
    name="generic", markers=(), native=False, triggers=(), start='{"tool_calls":',
    args_key="arguments", syntax="json", open='{"tool_calls": [', call_open="",
    call_close="", sep=", ", close="]}", parallel=True,
    gbnf_one="call", gbnf_open='"{" ws "\\"tool_calls\\"" ws ":" ws "[" ws', gbnf_sep='ws "," ws',
    gbnf_close='ws "]" ws "}"')

# the order detection tries them in: the more specific markers first
FAMILIES: tuple[Family, ...] = (FUNCTIONGEMMA, MISTRAL, PHI4, HERMES, LLAMA3, GENERIC)


def detect(template: str | None) -> Family:
    """The family whose markers the chat template contains; generic when it has none (or
    when it never reads `tools`, so the markers would be dead text)."""
    if not template or "tools" not in template:
        return GENERIC
    for family in FAMILIES:
        if any(marker in template for marker in family.markers):
            return family
    return GENERIC


def family_named(name: str) -> Family:
    """The family called `name` (KeyError if none)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


# -- the prompt ------------------------------------------------------------------------------

GENERIC_INTRO = (
    "You can call these tools. To call one or more, answer with only a JSON object, "
    'no other text: {"tool_calls": [{"name": "<tool name>", "arguments": {<arguments as '
    'the tool\'s parameters schema says>}}]}. Otherwise answer the user normally.\n\nTools:')


def generic_system_block(tools: Sequence[Tool]) -> str:
    """The system text that offers tools to a model whose template has no tool syntax."""
    lines = [GENERIC_INTRO]
    for tool in tools:
        fn = tool.function
        entry: dict[str, Any] = {"name": fn.name}
        if fn.description:
            entry["description"] = fn.description
        entry["parameters"] = fn.parameters_schema()
        lines.append(json.dumps(entry, ensure_ascii=False))
    return "\n".join(lines)


def template_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """`tools` as chat templates read them (OpenAI's shape, parameters always present)."""
    out = []
    for tool in tools:
        fn: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            fn["description"] = tool.function.description
        fn["parameters"] = tool.function.parameters_schema()
        out.append({"type": "function", "function": fn})
    return out


def generic_messages(family: Family, messages: Sequence[dict[str, Any]],
                     tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Messages for a template without tool syntax: the tool block joins the system message,
    assistant calls become their JSON text and tool results user turns (templates that know
    only system/user/assistant accept them)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = [ParsedCall(c["function"]["name"], c["function"]["arguments"],
                                c.get("id") or "") for c in message["tool_calls"]]
            text = (message.get("content") or "")
            text = (text + "\n" if text else "") + family.format_calls(calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            result = {"tool_response": {"name": message.get("name") or "",
                                        "content": message.get("content") or ""}}
            if message.get("tool_call_id"):
                result["tool_response"]["id"] = message["tool_call_id"]
            out.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        else:
            out.append({"role": role, "content": message.get("content") or ""})
    if tools:
        block = generic_system_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def render(template: str, messages: Sequence[dict[str, Any]], tools: Sequence[Tool], *,
           bos_token: str = "", eos_token: str = "", family: Family | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt: the model's own template rendered with `tools=` (native families) or with
    the generic block in the system message; the template's exceptions propagate."""
    return render_response(template, messages, tools, bos_token=bos_token,
                           eos_token=eos_token, family=family,
                           add_generation_prompt=add_generation_prompt).prompt


def render_response(template: str, messages: Sequence[dict[str, Any]], tools: Sequence[Tool], *,
                    bos_token: str = "", eos_token: str = "", family: Family | None = None,
                    add_generation_prompt: bool = True) -> ChatFormatterResponse:
    """`render`, with the formatter's stops and whether the template added BOS."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    family = family or detect(template)
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token,
                                    bos_token=bos_token,
                                    add_generation_prompt=add_generation_prompt)
    if family.native:
        return formatter(messages=list(messages),  # type: ignore[arg-type]
                         tools=template_tools(tools) if tools else None)  # type: ignore[arg-type]
    plain = generic_messages(family, messages, tools)
    try:
        return formatter(messages=plain)  # type: ignore[arg-type]
    except Exception:  # jinja templates raise whatever they like
        if len(plain) < 2 or plain[0]["role"] != "system" or plain[1]["role"] != "user":
            raise
    # templates without a system role (Gemma): the block opens the first user turn
    merged = {"role": "user", "content": plain[0]["content"] + "\n\n" + plain[1]["content"]}
    rest: list[Any] = [merged, *plain[2:]]
    return formatter(messages=rest)
