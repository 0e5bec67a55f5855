"""`edgerunner inspect MODEL.gguf`: what the GGUF header says about a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgerunner.cli.output import console, json_option, print_json
from edgerunner.pack.gguf_info import ModelInfo, read_model_info


def model_summary(info: ModelInfo) -> dict[str, Any]:
    """The facts `inspect` shows, as plain data (the tensor list is left out)."""
    kv_heads = sorted(set(info.n_head_kv))
    return {
        "name": info.name,
        "architecture": info.architecture,
        "file_type": info.file_type,
        "file_size": info.file_size,
        "parameters": info.n_params,
        "layers": info.n_layer,
        "embedding_length": info.n_embd,
        "feed_forward_length": info.n_ff,
        "heads": info.n_head,
        "kv_heads": kv_heads[0] if len(kv_heads) == 1 else info.n_head_kv,
        "key_length": info.key_length,
        "value_length": info.value_length,
        "sliding_window": info.sliding_window,
        "swa_layers": sum(info.swa_layers),
        "vocab": info.n_vocab,
        "training_context": info.n_ctx_train,
        "tensor_count": len(info.tensors),
        "tensor_types": dict(sorted(info.tensor_types.items())),
        "chat_template": info.chat_template is not None,
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@json_option
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Show a GGUF model's architecture, shapes, tensor types and chat template.

    MODEL may be a bundle directory: its model.gguf, and the quality pack measured."""
    manifest = None
    if model.is_dir() and (model / "manifest.json").is_file():
        from edgerunner.bundle.manifest import BundleManifest
        from edgerunner.bundle.store import MODEL_FILE

        manifest = BundleManifest.model_validate_json((model / "manifest.json").read_text())
        model = model / MODEL_FILE
    info = read_model_info(model)
    data = model_summary(info)
    if manifest is not None:
        data["quality"] = manifest.quality.model_dump() if manifest.quality else None
        data["imatrix"] = manifest.imatrix.model_dump() if manifest.imatrix else None
        data["prediction"] = manifest.prediction.model_dump()
    if as_json:
        print_json(data)
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    window = (
        f"{info.sliding_window} tokens on {data['swa_layers']} of {info.n_layer} layers"
        if info.sliding_window else "none"
    )
    rows = [
        ("model", info.name),
        ("file", f"{model} ({info.file_size / 2**20:.1f} MiB)"),
        ("architecture", info.architecture),
        ("file type", info.file_type),
        ("parameters", f"{_human(info.n_params)} ({info.n_params:,})"),
        ("layers", str(info.n_layer)),
        ("embedding / ffn", f"{info.n_embd} / {info.n_ff}"),
        ("heads / KV heads", f"{info.n_head} / {data['kv_heads']}"),
        ("key / value length", f"{info.key_length} / {info.value_length}"),
        ("sliding window", window),
        ("vocab", f"{info.n_vocab:,}"),
        ("training context", f"{info.n_ctx_train:,}"),
        ("tensors", ", ".join(f"{k} {v}" for k, v in data["tensor_types"].items())),
        ("chat template", "yes" if data["chat_template"] else "no"),
    ]
    if manifest is not None:
        from edgerunner.cli.pack import quality_line
        from edgerunner.cli.plan import weights_by_cpu_line
        from edgerunner.pack.isa import repack_isa

        prediction = manifest.prediction
        # a manifest from before `cpu` was recorded predicted for its profile's features too
        cpu = prediction.cpu or repack_isa(manifest.profile.cpu.features)
        rows.append(("predicted peak", f"{prediction.memory.total_mb:.0f} MiB on "
                     f"{manifest.profile.name}'s CPU ({cpu}); "
                     "the daemon re-predicts the weights for the CPU that serves"))
        rows.append(("weights by CPU", weights_by_cpu_line(prediction.weights_mb_by_cpu)))
        rows.append(("quality", quality_line(manifest.quality, manifest.imatrix)))
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)
