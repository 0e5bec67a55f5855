"""Shared printing helpers for commands: JSON for machines, rich tables for people."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console


def console() -> Console:
    """A rich console on stdout; piped output gets a wide fixed width so tables don't wrap."""
    width = None if sys.stdout.isatty() else 200
    return Console(highlight=False, soft_wrap=True, width=width)


def print_json(data: Any) -> None:
    """Print pydantic models, lists of them, or plain data as indented JSON."""
    click.echo(json.dumps(_plain(data), indent=2, sort_keys=False))


def _plain(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
