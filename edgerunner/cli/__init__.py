"""The `edgerunner` command. Each command lives in its own module and is imported on use,
so `edgerunner profiles list` does not pay for importing llama.cpp."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import click

from edgerunner import __version__
from edgerunner.errors import EdgerunnerError

COMMANDS = {
    "profiles": "edgerunner.cli.profiles:profiles",
    "inspect": "edgerunner.cli.inspect:inspect_cmd",
    "plan": "edgerunner.cli.plan:plan_cmd",
    "pack": "edgerunner.cli.pack:pack_cmd",
    "verify": "edgerunner.cli.verify:verify_cmd",
    "serve": "edgerunner.cli.serve:serve_cmd",
    "ask": "edgerunner.cli.ask:ask_cmd",
    "bench": "edgerunner.cli.bench:bench_cmd",
    "install": "edgerunner.cli.install:install_cmd",
    "keygen": "edgerunner.cli.keygen:keygen_cmd",
}


class LazyGroup(click.Group):
    """Resolves subcommands from COMMANDS on demand and turns an EdgerunnerError into its
    message and its `exit_code`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgerunnerError as exc:
            if os.environ.get("EDGERUNNER_TRACEBACK"):
                raise
            # what click.ClickException shows, with the error's own exit code
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgerunner")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Pack a local LLM for a small device, and serve it there."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
