"""`edgerunner profiles [list | show NAME | detect]`."""

from __future__ import annotations

import click
import tomli_w
from rich.table import Table

from edgerunner.cli.output import console, json_option, print_json
from edgerunner.profiles import list_profiles, resolve_profile


@click.group(invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """Device profiles: list them, show one, or detect this machine."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@profiles.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List the shipped device profiles."""
    found = list_profiles()
    if as_json:
        print_json(found)
        return
    table = Table("name", "aliases", "device", "RAM", "usable", "cores", "GB/s", "gpu")
    for p in found:
        cores = f"{p.cpu.big_cores}" + (f"+{p.cpu.little_cores}" if p.cpu.little_cores else "")
        table.add_row(
            p.name, ", ".join(p.aliases), p.display_name, f"{p.memory.total_mb} MiB",
            f"{p.usable_mb} MiB", cores, f"{p.memory.bandwidth_gbs:g}", p.gpu.kind,
        )
    console().print(table)


@profiles.command("show")
@click.argument("name")
@json_option
def show_cmd(name: str, as_json: bool) -> None:
    """Show one profile (name, alias or path to a .toml file)."""
    profile = resolve_profile(name)
    if as_json:
        print_json(profile)
    else:
        click.echo(tomli_w.dumps(profile.model_dump(mode="json")), nl=False)


@profiles.command("detect")
@json_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the profile here.")
def detect_cmd(as_json: bool, output: str | None) -> None:
    """Build a profile for the machine this runs on."""
    from edgerunner.device.detect import detect_profile

    profile = detect_profile()
    text = tomli_w.dumps(profile.model_dump(mode="json"))
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
        click.echo(f"wrote {output}", err=True)
    if as_json:
        print_json(profile)
    elif not output:
        click.echo(text, nl=False)
