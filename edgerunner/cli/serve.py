"""`edgerunner serve BUNDLE`: run the daemon (normally under systemd)."""

from __future__ import annotations

from pathlib import Path

import click

from edgerunner.bundle.manifest import MAX_PARALLEL

EPILOG = """\b
Exit codes: 0 clean stop, 1 error, 2 usage, 3 the plan does not fit this
machine's memory, 4 RSS exceeded its ceiling (drained, then exited).
Settings: bundle config.toml < --config FILE < EDGERUNNER_* env < flags."""


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
@click.option("--queue-depth", type=click.IntRange(1, 1024), help="Requests allowed to wait.")
@click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0.001),
              help="Seconds a request may take from arrival to answer.")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(min=0),
              help="Seconds in-flight work gets on SIGTERM before it is cancelled.")
@click.option("--reserve-mb", "memory_reserve_mb", type=click.FloatRange(min=0),
              help="Memory (MiB) that must stay free; below it new work is refused.")
@click.option("--rss-ceiling-mb", type=click.FloatRange(min=1),
              help="Drain and exit 4 if RSS goes over this [default: 1.5 x predicted].")
@click.option("--keep-alive", "keep_alive_s", type=click.FloatRange(min=0),
              help="Unload the model after this many idle seconds (0 = never).")
@click.option("--n-ctx", "n_ctx", type=click.IntRange(256),
              help="Serve a smaller context than the plan (uses less memory).")
@click.option("--threads", "n_threads", type=click.IntRange(1, 256),
              help="Override the plan's thread count.")
@click.option("--parallel", "n_parallel", type=click.IntRange(1, MAX_PARALLEL),
              help="Requests decoded together [default: the plan's n_parallel].")
@click.option("--log-prompts", is_flag=True, default=None, help="Log prompts and outputs.")
@click.option("--no-verify", is_flag=True, help="Skip the bundle's hash check (faster start).")
def serve_cmd(bundle: Path, config_file: Path | None, no_verify: bool, mqtt_url: str | None,
              device_id: str | None, mqtt_protocol: str | None, homeassistant: bool | None,
              forget: bool, **flags: object) -> None:
    """Serve BUNDLE over a unix socket (OpenAI-compatible HTTP) and optionally TCP and MQTT."""
    from edgerunner.bundle.settings import load_config
    from edgerunner.bundle.store import load_bundle
    from edgerunner.errors import PlanError
    from edgerunner.runtime.http.access import raise_nofile_limit
    from edgerunner.runtime.supervise.daemon import EXIT_NO_FIT, serve
    from edgerunner.runtime.supervise.logfmt import install

    install()
    raise_nofile_limit()  # each connection is a descriptor; the HTTP cap stays below the limit
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
    try:
        code = serve(loaded, config)
    except PlanError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_NO_FIT) from exc
    raise SystemExit(code)
