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
        click.option("--min-ctx", type=click.IntRange(min=16),
                     help="Smallest acceptable context (Home Assistant's Assist with tools: "
                     "--min-ctx 8192, see the README)."),
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
def progress_bar(enabled: bool) -> Iterator[tuple[ProgressCallback | None, Any]]:
    """(tensor progress for quantizing, step progress for the imatrix and quality chunks)."""
    err = Console(stderr=True)
    if not enabled or not err.is_terminal:
        yield None, None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=err, transient=True,
    ) as bar:
        # Until llama.cpp reports its first tensor, pack is reading the header and planning.
        task = bar.add_task("reading and planning", total=None, unit="")

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description="quantizing",
                       unit="tensors")

        def step(what: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=what, unit="chunks")

        yield update, step


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
@click.option("--imatrix", "imatrix_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Quantize with this importance matrix (llama.cpp's .gguf imatrix format).")
@click.option("--no-imatrix", is_flag=True,
              help="Never compute an importance matrix (default: for presets below Q4_K).")
@click.option("--quality-chunks", type=click.IntRange(min=0), default=None,
              help="512-token calibration chunks to measure quality on (0: do not measure; "
              "default 8).")
@plan_flags
@json_option
def pack_cmd(
    model: Path | None, profile_ref: str, output: Path, archive: bool, sign_key: Path | None,
    mender_type: str | None, mender_key: Path | None, as_json: bool,
    imatrix_file: Path | None, no_imatrix: bool, quality_chunks: int | None,
    **plan_values: Any,
) -> None:
    """Plan, quantize and write a verified bundle for a device (MODEL defaults to SmolLM2-135M).

    From an F16/BF16/F32 source the packed model is measured against it on a shipped
    calibration text (KL divergence, top-1 agreement, perplexity ratio); presets below Q4_K
    are quantized with an importance matrix computed on the same text."""
    from edgerunner.pack.packer import pack
    from edgerunner.pack.quality import DEFAULT_CHUNKS

    if imatrix_file is not None and no_imatrix:
        raise click.UsageError("--imatrix and --no-imatrix exclude each other")
    if mender_key is not None and mender_type is None:
        raise click.UsageError("--mender-key signs the artifact --mender DEVICE_TYPE writes")
    if sign_key is not None:
        from edgerunner.device.sign import load_private_key

        load_private_key(sign_key)  # a bad key fails before minutes of quantizing
    profile = resolve_profile(profile_ref)
    options = plan_options(**plan_values)
    imatrix: Path | bool | None = imatrix_file if imatrix_file is not None else (
        False if no_imatrix else None)
    chunks = DEFAULT_CHUNKS if quality_chunks is None else quality_chunks
    release = None
    finishing = sign_key is not None or mender_type is not None
    scratch = None
    if finishing and archive:
        from edgerunner.device.release import staging_dir

        scratch = staging_dir(output)
    try:
        with progress_bar(not as_json) as (progress, step):
            result = pack(model, profile, scratch or output, options,
                          archive=archive and not finishing, progress=progress,
                          quality_chunks=chunks, imatrix=imatrix, step_progress=step)
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
            "quality": result.manifest.quality,
            "imatrix": result.manifest.imatrix,
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
    out.print(quality_line(result.manifest.quality, result.manifest.imatrix))
    out.print(f"wrote {result.path}  ({result.timings['total']:.1f} s)")
    if release is not None and release.key_id:
        out.print(f"signed with key {release.key_id} (manifest.sig in {release.path})")
    if release is not None and release.mender is not None:
        out.print(f"wrote {release.mender} (Mender artifact for {mender_type}"
                  f"{', signed' if mender_key else ', UNSIGNED: pass --mender-key'})")


def quality_line(quality: Any, imatrix: Any) -> str:
    """One line on the measured quality and the imatrix (shared with inspect and verify)."""
    if imatrix is None or imatrix.used == "none":
        im = "no imatrix" + (f" ({imatrix.reason})" if imatrix is not None and imatrix.reason
                             else "")
    elif imatrix.used == "file":
        im = f"imatrix from {imatrix.path} ({imatrix.entries} matrices)"
    else:
        im = (f"imatrix computed on the calibration text ({imatrix.entries} matrices, "
              f"{imatrix.n_chunks} chunks, {imatrix.seconds:.1f} s)")
    if quality is None:
        return f"quality: not recorded (packed before edgerunner measured it); {im}"
    if not quality.measured:
        return f"quality: not measured: {quality.reason}; {im}"
    return (f"quality vs source: mean KLD {quality.mean_kld:.5f}, top-1 agreement "
            f"{100 * quality.top1_agreement:.1f}%, perplexity ratio {quality.ppl_ratio:.4f} "
            f"({quality.ppl:.2f} vs {quality.ppl_source:.2f}), {quality.n_chunks} chunks × "
            f"{quality.chunk_tokens} tokens of {quality.text} in {quality.seconds:.1f} s; {im}")
