"""The daemon's settings: one pydantic model fed, in order, by defaults, the bundle's config.toml,
`--config FILE`, EDGERUNNER_* environment variables and command-line flags."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from edgerunner.bundle.manifest import MAX_PARALLEL
from edgerunner.errors import ConfigError
from edgerunner.paths import default_socket_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from edgerunner.bundle.manifest import BundleManifest

logger = logging.getLogger(__name__)

ENV_PREFIX = "EDGERUNNER_"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MqttConfig(_Settings):
    """The MQTT transport (off unless `url` is set)."""

    url: str | None = Field(
        None,
        description="Broker URL: mqtt://host:1883, mqtts://host:8883 or unix:///path; "
        "unset = no MQTT",
    )
    device_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="This device's name in topics edgerunner/<device>/...; default: hostname",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT protocol version; with 5, a broker that answers CONNECT with "
        "'unsupported protocol version' (3.1.1-only) is reconnected to once with 3.1.1",
    )
    username: str | None = Field(None, description="Broker user name")
    password: SecretStr | None = Field(
        None,
        description="Broker password; prefer password_file or EDGERUNNER_MQTT__PASSWORD (a "
        "password in the URL or on the command line is visible in the process list)",
    )
    password_file: Path | None = Field(
        None, description="File holding the broker password (one line); wins over password"
    )
    ca_file: Path | None = Field(None, description="CA certificate for mqtts:// (default: system)")
    client_id: str | None = Field(
        None, max_length=128, description="MQTT client id; default: edgerunner-<device_id>"
    )
    allowed_reply_prefixes: list[str] = Field(
        default_factory=lambda: ["edgerunner/reply/"],
        description="Reply topics (v5 ResponseTopic or reply_to) must start with one of these",
    )
    max_payload_bytes: int = Field(
        262_144, ge=1024, le=268_435_455,
        description="Largest request/reply payload, bytes; larger requests are refused unread "
        "(v5 also tells the broker to drop requests over 16 x this; for 3.1.1 set the broker's "
        "message_size_limit)",
    )
    stream_interval_s: float = Field(
        0.05, ge=0, le=10,
        description="Streamed text is batched into at most one chunk per this many seconds "
        "(0.05 = 20 messages/s; 0 = every token)",
    )
    keepalive_s: int = Field(60, ge=5, le=65_535, description="MQTT keepalive, seconds")
    pool: bool = Field(
        True, description="Also take work from the fleet pool topic edgerunner/pool/request"
    )
    session_expiry_s: int = Field(
        3600, ge=0, le=4_294_967_295,
        description="v5: how long the broker keeps device-addressed requests while the daemon "
        "is away, seconds",
    )
    pool_session_expiry_s: int = Field(
        30, ge=0, le=3600,
        description="v5: the pool session outlives a disconnect this long (short, so pool work "
        "goes to devices that are up)",
    )
    reply_backlog: int = Field(
        1000, ge=10, le=1_000_000,
        description="Reply messages kept while the broker is unreachable; beyond it a streaming "
        "request is stopped and answered with an error",
    )
    reconnect_max_delay_s: int = Field(
        30, ge=1, le=3600, description="Reconnect backoff doubles from 1 s up to this, seconds"
    )
    info_interval_s: float = Field(
        30.0, ge=1, le=86_400, description="Re-publish the retained info topic this often, seconds"
    )
    homeassistant: bool = Field(
        False, description="Announce this device to Home Assistant (MQTT discovery, retained "
        "configs under <homeassistant_prefix>/...) and publish edgerunner/<device>/state"
    )
    homeassistant_prefix: str = Field(
        "homeassistant", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Home Assistant's MQTT discovery prefix (its MQTT integration's setting)",
    )


    def secret(self) -> str | None:
        """The broker password from password_file or password (None: the URL's, if any)."""
        if self.password_file is not None:
            return read_secret(self.password_file, "mqtt.password_file")
        return self.password.get_secret_value() if self.password is not None else None


def read_secret(path: Path, setting: str) -> str:
    """The first line of a secret file; ConfigError naming `setting` if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {setting} {path}: {exc.strerror}",
                          "check the path, and that the daemon's user may read it") from exc
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError(f"{setting} {path} is empty", "write the secret on its first line")
    return secret


class ServeConfig(_Settings):
    """Everything `edgerunner serve` can be told."""

    socket: Path | None = Field(
        None,
        description="Unix socket path; default $XDG_RUNTIME_DIR/edgerunner.sock, "
        "else /run/edgerunner/edgerunner.sock",
    )
    socket_mode: int = Field(0o660, ge=0, le=0o777, description="Unix socket permissions")
    http: str | None = Field(
        None, description="Also listen on TCP HOST:PORT (e.g. 127.0.0.1:8080); unset = socket only"
    )
    api_key: SecretStr | None = Field(
        None,
        description="Key TCP clients must send as `Authorization: Bearer <key>` (all but "
        "/health); set it with EDGERUNNER_API_KEY or api_key_file, never on the command line. "
        "The unix socket's file mode is its authentication",
    )
    api_key_file: Path | None = Field(
        None, description="File holding the API key (one line); wins over api_key"
    )
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names TCP requests may carry besides IP addresses, localhost and this "
        "machine's host name (anything else is refused: DNS rebinding)",
    )
    http_allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins (https://app.example) allowed to call the API; other "
        "cross-origin requests are refused (CSRF)",
    )
    max_connections: int = Field(
        256, ge=1, le=1_000_000,
        description="Open HTTP connections at most (kept below the open-file limit); more are "
        "answered 503 and closed",
    )
    idle_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="A connection that sends no whole request head this long is closed, "
        "seconds (also the keep-alive timeout between requests)",
    )
    queue_depth: int = Field(
        8, ge=1, le=1024, description="Requests waiting beyond the running ones"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="A request not finished this long after arrival fails"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="On stop, in-flight work gets this long before cancel"
    )
    default_max_tokens: int = Field(
        512, ge=1, le=1_048_576, description="max_tokens when a request leaves it out"
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=268_435_456, description="Largest accepted request body, bytes"
    )
    stream_flush_s: float = Field(
        0.02, ge=0, le=1,
        description="SSE: after the first token, tokens gather this long (s) per write; the "
        "final one is never held back. Fewer writes leave the cores to llama.cpp",
    )
    memory_reserve_mb: float = Field(
        128.0, ge=0, le=1_048_576,
        description="Headroom (MiB) that must stay free; below it new work is refused",
    )
    rss_ceiling_mb: float | None = Field(
        None, gt=0, le=4_194_304,
        description="Exit (drain first) if RSS exceeds this; default 1.5 x predicted peak",
    )
    psi_full_avg10_limit: float = Field(
        10.0, ge=0, le=100,
        description="memory PSI full avg10 (%) above which new work is refused",
    )
    strict: bool = Field(
        False, description="Refuse to start if the plan does not fit, instead of shrinking n_ctx"
    )
    keep_alive_s: float = Field(
        0.0, ge=0, le=31_536_000, description="Unload the model after this idle time (0 = never)"
    )
    log_prompts: bool = Field(False, description="Log prompt and output text (privacy: off)")
    guard_poll_s: float = Field(1.0, gt=0, le=3600, description="Memory guard poll interval")
    guard_root: Path = Field(
        Path("/"), description="Root for /proc and /sys/fs/cgroup (tests point it at a fake tree)"
    )
    n_ctx: int | None = Field(
        None, ge=256, le=1_048_576,
        description="Serve a smaller context than the bundle's plan (less memory); unset = plan",
    )
    n_threads: int | None = Field(
        None, ge=1, le=256, description="Override the plan's decode threads"
    )
    n_parallel: int | None = Field(
        None, ge=1, le=MAX_PARALLEL,
        description="Requests decoded together (continuous batching); unset = the plan's",
    )
    mqtt: MqttConfig = Field(
        default_factory=lambda: MqttConfig.model_validate({}), description="MQTT transport"
    )

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        # "0660" from env or TOML strings means octal, as chmod reads it
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError as exc:
                raise ValueError(f"socket_mode {value!r} is not an octal mode like 0660") from exc
        return value

    @field_validator("http")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"http {value!r} must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    def http_api_key(self) -> str | None:
        """The API key from api_key_file or api_key (None: TCP needs no key)."""
        if self.api_key_file is not None:
            return read_secret(self.api_key_file, "api_key_file")
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def socket_path(self) -> Path:
        """The socket to listen on, with the default filled in (never a discovered one)."""
        return self.socket if self.socket is not None else default_socket_path()

    def http_host_port(self) -> tuple[str, int] | None:
        """(host, port) for the TCP listener, or None."""
        if self.http is None:
            return None
        host, _, port = self.http.rpartition(":")
        return host.strip("[]"), int(port)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}",
                          "check the path and its permissions") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the file's syntax") from exc


def _env_value(raw: str) -> Any:
    # lists arrive as JSON ("[...]"); everything else is coerced by pydantic's lax mode
    if raw.startswith("["):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """EDGERUNNER_QUEUE_DEPTH=4, EDGERUNNER_MQTT__URL=... → nested settings dict."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in ServeConfig.model_fields:
            continue  # other EDGERUNNER_* variables (TRACEBACK, PROFILES_DIR) are not settings
        if len(path) > 1 and path[0] != "mqtt":
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _env_value(raw)
    return out


def load_config(
    bundle_config: Path | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServeConfig:
    """Defaults ← bundle config.toml ← --config FILE ← EDGERUNNER_* env ← flags, validated once."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if bundle_config is not None and bundle_config.exists():
        layers.append((str(bundle_config), _read_toml(bundle_config)))
    if config_file is not None:
        layers.append((str(config_file), _read_toml(config_file)))
    layers.append(("environment", env_overrides(os.environ if environ is None else environ)))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    for source, layer in layers:
        merged = _merge(merged, layer)
        try:
            ServeConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"invalid setting from {source}: {_describe(exc)}",
                              "see `edgerunner serve --help` and the bundle's config.toml") from exc
    return ServeConfig.model_validate(merged)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _toml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _render_fields(model: type[BaseModel], values: BaseModel, skip: set[str]) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        lines.append(f"# {field.description}")
        value = getattr(values, name)
        if name == "socket_mode":
            lines.append(f"socket_mode = 0o{value:o}")
        elif value is None:
            lines.append(f"# {name} = (unset)")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return lines


def render_config_toml(manifest: BundleManifest) -> str:
    """The bundle's user-editable config.toml: every setting, its meaning, and its default."""
    predicted = manifest.prediction.memory.total_mb
    defaults = ServeConfig.model_validate({})
    head = [
        f"# edgerunner daemon settings for bundle {manifest.name}",
        "# Precedence: this file < `serve --config FILE` < EDGERUNNER_* env "
        "(EDGERUNNER_MQTT__URL for [mqtt]) < flags.",
        f"# The plan predicts a peak RSS of {predicted:.0f} MiB "
        f"(n_ctx {manifest.plan.n_ctx}, KV {manifest.plan.kv_type}).",
        "",
    ]
    body = _render_fields(ServeConfig, defaults, skip={"mqtt", "guard_root"})
    mqtt = ["[mqtt]", *_render_fields(MqttConfig, defaults.mqtt, skip=set())]
    return "\n".join([*head, *body, *mqtt]).rstrip() + "\n"
