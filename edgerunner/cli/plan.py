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
            c.quant, f"{c.kl_divergence:.4f}" + (" (measured)" if c.kld_measured else ""), kv,
            str(c.n_ctx), f"{m.total_mb:.0f}",
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
        f"{r.prefix_cache_cells} cells; predicted peak {p.memory.total_mb:.0f} MiB "
        f"on {result.profile}'s CPU ({p.cpu}), "
        f"{p.decode_tps:.1f} tok/s alone, {p.stream_tps:.1f} per stream and "
        f"{p.aggregate_tps:.1f} in all with {r.n_parallel}, file {p.file_size / 2**20:.0f} MiB"
    )
    out.print(f"  weights by CPU: {weights_by_cpu_line(p.weights_mb_by_cpu)}")
    for reason in result.reasons:
        out.print(f"  why: {reason}")
    for warning in result.warnings:
        out.print(f"[yellow]warning:[/] {warning}")


def weights_by_cpu_line(by_cpu: dict[str, float]) -> str:
    """"avx2 120 MiB, neon+dotprod 140 MiB, ...": another CPU repacks other weights."""
    return ", ".join(f"{isa} {mb:.0f} MiB" for isa, mb in by_cpu.items()) or "not recorded"


@click.command("plan")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--profile", "profile_ref", required=True,
              help="Device profile: name, alias or path to a .toml file.")
@click.option("--measure", is_flag=True,
              help="Quantize the chosen preset and its neighbours and measure their quality "
              "against the source (F16/BF16/F32) instead of trusting llama.cpp's table.")
@click.option("--quality-chunks", type=click.IntRange(min=1), default=None,
              help="512-token calibration chunks --measure evaluates (default 8).")
@plan_flags
@json_option
def plan_cmd(model: str | None, profile_ref: str, as_json: bool, measure: bool,
             quality_chunks: int | None, **flags: Any) -> None:
    """Show every candidate (quant, KV cache, context) for MODEL on a device, and the choice.

    MODEL defaults to SmolLM2-135M-Instruct, fetched and cached on first use.
    """
    profile = resolve_profile(profile_ref)
    path = _model_path(model)
    info = read_model_info(path)
    if not measure:
        result = make_plan(info, profile, plan_options(**flags))
        print_json(result) if as_json else render_plan(result)
        return
    from edgerunner.cli.pack import progress_bar
    from edgerunner.pack.quality import DEFAULT_CHUNKS, measured_plan

    with progress_bar(not as_json) as (_, step):
        result, reports = measured_plan(path, info, profile, plan_options(**flags),
                                        n_chunks=quality_chunks or DEFAULT_CHUNKS, progress=step)
    if as_json:
        print_json({"plan": result, "measured": reports})
        return
    render_plan(result)
    from edgerunner.cli.pack import quality_line

    for quant, report in reports.items():
        console().print(f"  {quant}: {quality_line(report, None).split('; ')[0]}")
