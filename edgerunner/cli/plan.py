"""`edgerunner plan [MODEL] --profile NAME`: what would be packed, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgerunner.cli.output import console, json_option, print_json
from edgerunner.cli.pack import plan_flags, plan_options
from edgerunner.pack.gguf_info import read_model_info
from edgerunner.pack.planner import PlanResult, make_plan
from edgerunner.profiles import resolve_profile


def _model_path(model: str | None) -> Path:
    if model:
        return Path(model)
    from edgerunner.pack.default_model import ensure_default_model

    return ensure_default_model()


def render_plan(result: PlanResult) -> None:
    """The candidate table, then the choice, why it won, and the warnings."""
    out = console()
    table = Table(
        "quant", "KLD", "KV cache", "n_ctx", "MiB", "weights+KV+compute+other", "tok/s",
        "streams", "verdict",
        title=f"{result.model} on {result.profile}: {result.budget_mb:.0f} MiB budget, "
        f"context {result.min_ctx}–{result.max_ctx}",
    )
    r, p = result.runtime, result.prediction
    for c in result.candidates:
        m = c.memory
        kv = c.kv_type + ("+FA" if c.flash_attn else "") + ("" if c.swa_full else " SWA-trim")
        chosen = c == result.chosen
        # candidates are compared as one stream; the choice is shown as it will serve
        streams = f"{r.n_parallel}×{p.stream_tps:.1f}={p.aggregate_tps:.1f}" if chosen else "1"
        table.add_row(
            c.quant, f"{c.kl_divergence:.4f}", kv, str(c.n_ctx), f"{m.total_mb:.0f}",
            f"{m.weights_mb:.0f}+{m.kv_mb:.0f}+{m.compute_mb:.0f}+"
            f"{m.logits_mb + m.overhead_mb:.0f}",
            f"{c.decode_tps:.1f}", streams,
            "[bold green]chosen[/]" if chosen else (c.rejected or ""),
            style="bold" if chosen else None,
        )
    out.print(table)
    out.print(
        f"chosen: [bold]{r.quant}[/], n_ctx {r.n_ctx}, KV {r.kv_type}"
        f"{', flash attention' if r.flash_attn else ''}"
        f"{'' if r.swa_full else ', sliding-window cache trimmed'}, {r.n_threads} threads, "
        f"mmap {'on' if r.mmap else 'off'}, n_parallel {r.n_parallel}, prefix cache "
        f"{r.prefix_cache_cells} cells; predicted peak {p.memory.total_mb:.0f} MiB, "
        f"{p.decode_tps:.1f} tok/s alone, {p.stream_tps:.1f} per stream and "
        f"{p.aggregate_tps:.1f} in all with {r.n_parallel}, file {p.file_size / 2**20:.0f} MiB"
    )
    for reason in result.reasons:
        out.print(f"  why: {reason}")
    for warning in result.warnings:
        out.print(f"[yellow]warning:[/] {warning}")


@click.command("plan")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--profile", "profile_ref", required=True,
              help="Device profile: name, alias or path to a .toml file.")
@plan_flags
@json_option
def plan_cmd(model: str | None, profile_ref: str, as_json: bool, **flags: Any) -> None:
    """Show every candidate (quant, KV cache, context) for MODEL on a device, and the choice.

    MODEL defaults to SmolLM2-135M-Instruct, fetched and cached on first use.
    """
    profile = resolve_profile(profile_ref)
    info = read_model_info(_model_path(model))
    result = make_plan(info, profile, plan_options(**flags))
    if as_json:
        print_json(result)
    else:
        render_plan(result)
