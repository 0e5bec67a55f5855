"""Tool-calling shapes shared by every transport: OpenAI `tools`, `tool_choice`,
`parallel_tool_calls`, the `tool_calls` an assistant turn carries, the calls a model made, and
the 400s a tools request gets before it reaches the engine. The chat message that carries calls
and results (`role: "tool"`, `tool_call_id`, Ollama's `tool_name`) is protocol.ChatMessage.

Validated here so HTTP and MQTT refuse the same requests with the same words; the engine
(runtime.engine.tools) renders the tools into the prompt, holds the output to their schemas
and parses the calls back.

protocol.py builds its request model from these types, so this module imports RequestError
where it raises it, not at the top (the two modules would import each other).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FUNCTION_NAME = r"^[a-zA-Z0-9_.\-]{1,64}$"  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's own ceiling on `tools`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDef(_Strict):
    name: str = Field(..., pattern=FUNCTION_NAME, description="What the model calls it")
    description: str | None = Field(None, max_length=100_000, description="When to call it")
    parameters: dict[str, Any] | None = Field(
        None, description="JSON Schema of the arguments object; absent means no arguments")
    strict: bool | None = Field(None, description="Accepted for compatibility; always enforced")

    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' schema; a function without one takes an empty object."""
        if self.parameters is None:
            return {"type": "object", "properties": {}}
        return self.parameters


class Tool(_Strict):
    type: Literal["function"] = Field("function", description="Only functions are supported")
    function: FunctionDef = Field(..., description="The function the model may call")


class NamedFunction(_Strict):
    name: str = Field(..., pattern=FUNCTION_NAME, description="A function from `tools`")


class NamedToolChoice(_Strict):
    type: Literal["function"] = Field("function", description="Only functions are supported")
    function: NamedFunction = Field(..., description="The function the model must call")


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ToolCallFunction(_Strict):
    name: str = Field(..., max_length=256, description="The function called")
    # OpenAI sends a JSON string, Ollama an object: both are taken
    arguments: str | dict[str, Any] = Field("{}", description="The arguments (JSON)")
    index: int | None = Field(None, ge=0, description="Ollama: the call's place in the turn")

    def arguments_dict(self) -> dict[str, Any]:
        """The arguments as an object; RequestError if the JSON is not one."""
        from edgerunner.runtime.protocol import RequestError

        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            value = json.loads(self.arguments) if self.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise RequestError("invalid_request",
                               f"tool call {self.name!r}: arguments are not valid JSON "
                               f"({exc.msg}); send them as a JSON object string") from exc
        if not isinstance(value, dict):
            raise RequestError("invalid_request",
                               f"tool call {self.name!r}: arguments must be a JSON object")
        return value


class ToolCall(_Strict):
    model_config = ConfigDict(extra="ignore")  # Ollama adds fields (index) across versions

    id: str | None = Field(None, max_length=256, description="Call id; Ollama leaves it out")
    type: Literal["function"] = Field("function", description="Only functions are supported")
    function: ToolCallFunction = Field(..., description="The call")


class ToolsOptions(_Strict):
    """The tool fields of a chat request, as a transport hands them to the engine."""

    tools: list[Tool] = Field(default_factory=list, max_length=MAX_TOOLS,
                              description="Functions the model may call")
    tool_choice: ToolChoice = Field("auto", description="auto, none, required or one function")
    parallel_tool_calls: bool = Field(True, description="Several calls in one answer")

    def check(self, *, response_format: bool = False) -> None:
        """RequestError (400) for a combination edgerunner will not serve, saying what to
        change: a duplicate or unknown function name, tools beside response_format."""
        from edgerunner.runtime.protocol import RequestError

        seen: set[str] = set()
        for i, tool in enumerate(self.tools):
            if tool.function.name in seen:
                raise RequestError("invalid_request",
                                   f"tools[{i}].function.name {tool.function.name!r} is declared "
                                   "twice; give each function a distinct name")
            seen.add(tool.function.name)
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in seen:
                known = ", ".join(sorted(seen)) or "none"
                raise RequestError("invalid_request",
                                   f"tool_choice names function {name!r}, which is not in tools "
                                   f"(declared: {known}); name a declared function or add it "
                                   "to tools")
        elif self.tool_choice == "required" and not self.tools:
            raise RequestError("invalid_request",
                               'tool_choice "required" needs at least one entry in tools')
        if response_format and self.active:
            raise RequestError("invalid_request",
                               "tools and response_format cannot be combined: the answer is "
                               "either a tool call or text in the response format; drop one, "
                               'or set tool_choice "none"')

    @property
    def active(self) -> bool:
        """Whether the model may call a tool in this answer."""
        return bool(self.tools) and self.tool_choice != "none"

    def offered(self) -> list[Tool]:
        """The tools the model may call now (only the named one under a named tool_choice)."""
        if not self.active:
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)

    @property
    def forced(self) -> bool:
        """A call is required from the first token (required, or a named function)."""
        return self.active and self.tool_choice != "auto"


def new_call_id() -> str:
    """An OpenAI-style call id (`call_` and 24 alphanumerics; Mistral templates need >= 9)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass
class ParsedCall:
    """One call the model made: a declared name and its arguments object."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict[str, Any]:
        """As OpenAI's `message.tool_calls[]` (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def ollama(self, index: int) -> dict[str, Any]:
        """As Ollama's `message.tool_calls[]`: arguments as an object, the call's place in the
        answer as `function.index` (Ollama's own parser numbers them so)."""
        return {"id": self.id, "function": {"index": index, "name": self.name,
                                            "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A streamed piece of call `index`: the first carries id and name, the rest argument
    text, as OpenAI's `delta.tool_calls[]` (the openai client concatenates `arguments`)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        """As one entry of OpenAI's `delta.tool_calls`."""
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out: dict[str, Any] = {"index": self.index, "function": function}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        return out
