"""`edgerunner serve BUNDLE`: run the daemon (normally under systemd)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import annotated_types
import click

from edgerunner.bundle.settings import ServeConfig
from edgerunner.errors import ExitCode

EPILOG = "\b\nExit codes:\n" + "".join(
    f"  {code.value}  {code.meaning}\n" for code in ExitCode) + (
    "\b\nSettings: bundle config.toml < --config FILE < EDGERUNNER_* env < flags.")


def bounded(name: str) -> click.ParamType:
    """The click type of a ServeConfig number: int or float within the field's own bounds."""
    field = ServeConfig.model_fields[name]
    kinds = [t for t in typing.get_args(field.annotation) or (field.annotation,)
             if t is not type(None)]
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            bounds["min"] = rule.ge
        elif isinstance(rule, annotated_types.Gt):
            bounds.update(min=rule.gt, min_open=True)
        elif isinstance(rule, annotated_types.Le):
            bounds["max"] = rule.le
        elif isinstance(rule, annotated_types.Lt):
            bounds.update(max=rule.lt, max_open=True)
    if kinds == [int]:
        return click.IntRange(**bounds)
    if kinds == [float]:
        return click.FloatRange(**bounds)
    raise TypeError(f"ServeConfig.{name} is not a number ({field.annotation})")


@click.command("serve", epilog=EPILOG)
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Unix socket path [default: $XDG_RUNTIME_DIR/edgerunner.sock, else "
              "/run/edgerunner/edgerunner.sock].")
@click.option("--http", "http", metavar="HOST:PORT",
              help="Also listen on TCP, e.g. 127.0.0.1:8080; clients then need the API key "
              "if one is set (EDGERUNNER_API_KEY or api_key_file, never a flag).")
@click.option("--mqtt", "mqtt_url", metavar="URL",
              help="MQTT broker, e.g. mqtt://broker:1883 (the password belongs in "
              "mqtt.password_file or EDGERUNNER_MQTT__PASSWORD, not the URL).")
@click.option("--device-id", help="This device's name in MQTT topics [default: hostname].")
@click.option("--mqtt-protocol", type=click.Choice(["5", "3.1.1"]),
              help="MQTT version [default: 5, falling back to 3.1.1 if the broker lacks v5]; "
              "3.1.1 skips the v5 attempt.")
@click.option("--mqtt-homeassistant", "homeassistant", is_flag=True, default=None,
              help="Announce this device to Home Assistant (MQTT discovery).")
@click.option("--mqtt-homeassistant-forget", "forget", is_flag=True,
              help="Remove this device from Home Assistant (clear its retained discovery "
              "configs on the broker) and exit; run it before uninstalling.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True,
                                                         dir_okay=False),
              help="A config.toml overriding the bundle's.")
@click.option("--strict", is_flag=True, default=None,
              help="Refuse to start (exit 3) instead of shrinking n_ctx to fit memory.")
@click.option("--queue-depth", type=bounded("queue_depth"),
              help="Requests allowed to wait.")
@click.option("--request-timeout", "request_timeout_s", type=bounded("request_timeout_s"),
              help="Seconds a request may take from arrival to answer.")
@click.option("--drain-timeout", "drain_timeout_s", type=bounded("drain_timeout_s"),
              help="Seconds in-flight work gets on SIGTERM before it is cancelled.")
@click.option("--reserve-mb", "memory_reserve_mb", type=bounded("memory_reserve_mb"),
              help="Memory (MiB) that must stay free; below it new work is refused.")
@click.option("--rss-ceiling-mb", type=bounded("rss_ceiling_mb"),
              help="Drain and exit 4 if RSS goes over this [default: 1.5 x predicted].")
@click.option("--keep-alive", "keep_alive_s", type=bounded("keep_alive_s"),
              help="Unload the model after this many idle seconds (0 = never).")
@click.option("--n-ctx", "n_ctx", type=bounded("n_ctx"),
              help="Serve a smaller context than the plan (uses less memory).")
@click.option("--threads", "n_threads", type=bounded("n_threads"),
              help="Override the plan's thread count.")
@click.option("--parallel", "n_parallel", type=bounded("n_parallel"),
              help="Requests decoded together [default: the plan's n_parallel].")
@click.option("--log-prompts", is_flag=True, default=None, help="Log prompts and outputs.")
@click.option("--no-verify", is_flag=True, help="Skip the bundle's hash check (faster start).")
def serve_cmd(bundle: Path, config_file: Path | None, no_verify: bool, mqtt_url: str | None,
              device_id: str | None, mqtt_protocol: str | None, homeassistant: bool | None,
              forget: bool, **flags: object) -> None:
    """Serve BUNDLE over a unix socket (OpenAI-compatible HTTP) and optionally TCP and MQTT."""
    from edgerunner.bundle.settings import load_config
    from edgerunner.bundle.store import load_bundle
    from edgerunner.runtime.supervise.daemon import serve
    from edgerunner.runtime.supervise.logfmt import install

    install()
    loaded = load_bundle(bundle, verify=not no_verify)
    overrides: dict[str, object] = {k.removesuffix("_path"): v for k, v in flags.items()}
    mqtt = {k: v for k, v in {"url": mqtt_url, "device_id": device_id,
                              "protocol": mqtt_protocol,
                              "homeassistant": homeassistant}.items() if v is not None}
    if mqtt:
        overrides["mqtt"] = mqtt
    config = load_config(loaded.config_path, config_file, overrides=overrides)
    if forget:
        from edgerunner.runtime.mqtt.homeassistant import forget_device
        from edgerunner.runtime.mqtt.transport import default_device_id

        device = config.mqtt.device_id or default_device_id()
        cleared = forget_device(config.mqtt, device)
        click.echo(f"removed {device} from Home Assistant ({len(cleared)} retained topics "
                   "cleared)")
        return
    # a plan that does not fit raises NoFitError: the CLI exits with its code (3)
    raise SystemExit(serve(loaded, config))
