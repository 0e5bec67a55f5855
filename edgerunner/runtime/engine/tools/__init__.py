"""Tool calling in the engine room: per-family prompt rendering and call syntax (families),
the incremental parser back to content and calls (parse), and the schema-held grammar
(grammar)."""

from edgerunner.runtime.engine.tools.families import FAMILIES, Family, detect, render
from edgerunner.runtime.engine.tools.grammar import ToolGrammar, add_to_chain, build
from edgerunner.runtime.engine.tools.parse import ParseResult, StreamParser, parse

__all__ = ["FAMILIES", "Family", "ParseResult", "StreamParser", "ToolGrammar", "add_to_chain",
           "build", "detect", "parse", "render"]
