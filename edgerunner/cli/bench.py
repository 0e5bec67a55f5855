"""`edgerunner bench BUNDLE [--json] [--calibrate]`: measured speed and memory next to the plan."""

from __future__ import annotations

import platform
from pathlib import Path

import click
from rich.table import Table

from edgerunner.cli.output import console, json_option, print_json


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Prompt length to time.")
@click.option("--decode-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Generated tokens to time.")
@click.option("--threads", type=click.IntRange(1, 256), help="Override the plan's threads.")
@click.option("--calibrate", is_flag=True,
              help="Save measured/predicted decode speed into your copy of the profile.")
@json_option
def bench_cmd(bundle: Path, prompt_tokens: int, decode_tokens: int, threads: int | None,
              calibrate: bool, as_json: bool) -> None:
    """Run the bundle here: load time, TTFT, prompt and decode tok/s, peak RSS vs the prediction."""
    from edgerunner.bundle.store import load_bundle
    from edgerunner.device.bench import calibrated_profile, run_bench, write_calibration

    loaded = load_bundle(bundle)
    result = run_bench(loaded, prompt_tokens, decode_tokens, threads)
    written = None
    if calibrate:
        profile = calibrated_profile(loaded.manifest.profile, result)
        written = write_calibration(profile)
        if platform.machine() != loaded.manifest.profile.arch:
            click.echo(f"warning: calibrating {profile.name} ({loaded.manifest.profile.arch}) on "
                       f"a {platform.machine()} machine; run bench on the device itself",
                       err=True)
    if as_json:
        data = result.summary()
        if written is not None:
            data["calibrated_profile"] = str(written)
        print_json(data)
        return
    table = Table("", "measured", "predicted", "ratio", title=f"{result.bundle} on this machine")
    ratio_rss, ratio_tps = result.rss_over_predicted, result.decode_over_predicted
    table.add_row(f"peak RSS ({result.peak_rss_source}), {result.filled_tokens} tokens in context",
                  f"{result.peak_rss_mb:.0f} MiB", f"{result.predicted_for_this_run_mb:.0f} MiB",
                  f"{ratio_rss:.2f}" if ratio_rss else "-")
    table.add_row(f"peak RSS, full context ({result.n_ctx} tokens)", "",
                  f"{result.predicted_full_context_mb:.0f} MiB", "")
    table.add_row("decode", f"{result.decode_tps:.1f} tok/s",
                  f"{result.predicted_decode_tps:.1f} tok/s",
                  f"{ratio_tps:.2f}" if ratio_tps else "-")
    table.add_row("prompt", f"{result.prompt_tps:.1f} tok/s", "", "")
    table.add_row("time to first token", f"{result.ttft_s * 1000:.0f} ms "
                  f"({result.prompt_tokens} tokens)", "", "")
    table.add_row("load", f"{result.load_s:.2f} s", "", "")
    out = console()
    out.print(table)
    if written is not None:
        out.print(f"wrote {written}: later plans for {loaded.manifest.profile.name} use it")
