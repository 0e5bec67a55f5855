"""`edgerunner pack [MODEL] --profile NAME`: plan, quantize and write a bundle."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgerunner.bundle.manifest import MAX_PARALLEL
from edgerunner.cli.output import console, json_option, print_json
from edgerunner.pack.quantize import Progress as ProgressCallback
from edgerunner.profiles import resolve_profile


def plan_options(**values: Any) -> Any:
    """PlanOptions from the flags the user gave (unset flags keep the planner's defaults)."""
    from edgerunner.pack.planner import PlanOptions

    return PlanOptions(**{k: v for k, v in values.items() if v is not None})


def plan_flags(func: Any) -> Any:
    """The planner's flags, shared with `plan`."""
    flags = [
        click.option("--min-ctx", type=click.IntRange(min=16), help="Smallest acceptable context."),
        click.option("--max-ctx", type=click.IntRange(min=16), help="Largest context to plan."),
        click.option("--min-tps", type=click.FloatRange(min=0), help="Slowest acceptable decode."),
        click.option("--quant", help="Force this quantization preset, e.g. Q4_K_M."),
        click.option("--reserve-mb", type=click.IntRange(min=0),
                     help="Extra memory to leave free on the device, MiB."),
        click.option("--parallel", type=click.IntRange(1, MAX_PARALLEL),
                     help="Streams decoded together (default: what the device allows)."),
    ]
    for flag in reversed(flags):
        func = flag(func)
    return func


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[ProgressCallback | None]:
    err = Console(stderr=True)
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("tensors"), TimeElapsedColumn(), console=err, transient=True,
    ) as bar:
        # Until llama.cpp reports its first tensor, pack is reading the header and planning.
        task = bar.add_task("reading and planning", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description="quantizing")

        yield update


@click.command("pack")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--profile", "profile_ref", required=True,
              help="Device profile: name, alias (rpi5) or path to a .toml file.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="Directory the bundle is written into.")
@click.option("--archive", is_flag=True, help="Write <bundle>.tar instead of a directory.")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the bundle with this Ed25519 key (`edgerunner keygen`).")
@click.option("--mender", "mender_type", metavar="DEVICE_TYPE",
              help="Also write <bundle>.mender, a Mender module-image artifact for DEVICE_TYPE.")
@click.option("--mender-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the .mender artifact with this key (`edgerunner keygen --mender`).")
@plan_flags
@json_option
def pack_cmd(
    model: Path | None, profile_ref: str, output: Path, archive: bool, sign_key: Path | None,
    mender_type: str | None, mender_key: Path | None, as_json: bool, **plan_values: Any,
) -> None:
    """Plan, quantize and write a verified bundle for a device (MODEL defaults to SmolLM2-135M)."""
    from edgerunner.pack.packer import pack

    if mender_key is not None and mender_type is None:
        raise click.UsageError("--mender-key signs the artifact --mender DEVICE_TYPE writes")
    if sign_key is not None:
        from edgerunner.device.sign import load_private_key

        load_private_key(sign_key)  # a bad key fails before minutes of quantizing
    profile = resolve_profile(profile_ref)
    options = plan_options(**plan_values)
    release = None
    finishing = sign_key is not None or mender_type is not None
    scratch = None
    if finishing and archive:
        from edgerunner.device.release import staging_dir

        scratch = staging_dir(output)
    try:
        with _progress_bar(not as_json) as progress:
            result = pack(model, profile, scratch or output, options,
                          archive=archive and not finishing, progress=progress)
        if finishing:
            from edgerunner.device.release import finish

            release = finish(result.path, result.manifest, output, sign=sign_key,
                             archive=archive, mender_device_type=mender_type,
                             mender_key=mender_key)
            result.path, result.archive = release.path, archive
    finally:
        if scratch is not None:
            from edgerunner.device.release import discard

            discard(scratch)
    if as_json:
        print_json({
            "path": str(result.path),
            "archive": result.archive,
            "plan": result.manifest.plan,
            "prediction": result.manifest.prediction,
            "model_size": result.actual_size,
            "predicted_size": result.predicted_size,
            "warnings": result.warnings,
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "manifest": result.manifest,
            "signed_by": release.key_id if release else None,
            "mender_artifact": str(release.mender) if release and release.mender else None,
        })
        return
    out = console()
    plan, pred = result.manifest.plan, result.manifest.prediction
    for warning in result.warnings:
        out.print(f"[yellow]warning:[/] {warning}")
    out.print(
        f"plan for {profile.name}: {plan.quant}, context {plan.n_ctx}, KV {plan.kv_type}"
        f"{', flash attention' if plan.flash_attn else ''}, {plan.n_threads} threads, "
        f"{plan.n_parallel} parallel stream{'s' if plan.n_parallel > 1 else ''}, "
        f"prefix cache {plan.prefix_cache_cells} cells"
    )
    out.print(
        f"predicted peak memory {pred.memory.total_mb:.0f} MiB of {profile.usable_mb} MiB usable "
        f"(weights {pred.memory.weights_mb:.0f}, KV {pred.memory.kv_mb:.0f}, "
        f"compute {pred.memory.compute_mb:.0f}, logits {pred.memory.logits_mb:.0f}, "
        f"overhead {pred.memory.overhead_mb:.0f}); decode ≈ {pred.decode_tps:.1f} tok/s, "
        f"{pred.stream_tps:.1f} per stream and {pred.aggregate_tps:.1f} in all with "
        f"{plan.n_parallel}"
    )
    error = f" ({100 * result.size_error:+.2f}%)" if result.predicted_size else ""
    out.print(
        f"model.gguf {result.actual_size / 2**20:.1f} MiB, predicted "
        f"{result.predicted_size / 2**20:.1f} MiB{error}"
    )
    out.print(f"wrote {result.path}  ({result.timings['total']:.1f} s)")
    if release is not None and release.key_id:
        out.print(f"signed with key {release.key_id} (manifest.sig in {release.path})")
    if release is not None and release.mender is not None:
        out.print(f"wrote {release.mender} (Mender artifact for {mender_type}"
                  f"{', signed' if mender_key else ', UNSIGNED: pass --mender-key'})")
