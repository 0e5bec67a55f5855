"""MQTT names and limits: broker URLs, the topic layout, reply-topic safety, duplicate ids.

Shared by the daemon's transport and the client so both sides agree on every topic name.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from edgerunner.errors import ConfigError

ROOT = "edgerunner"
POOL_TOPIC = f"{ROOT}/pool/request"
POOL_SHARE_GROUP = "edgerunner"
POOL_SUBSCRIPTION = f"$share/{POOL_SHARE_GROUP}/{POOL_TOPIC}"
DEFAULT_REPLY_PREFIX = f"{ROOT}/reply/"

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Topics a reply must never land on: another device's inbox, cancel, status, info or state.
_CONTROL_TOPIC = re.compile(rf"^{ROOT}/[^/]+/(request|cancel|status|info|state)(/|$)")
_MAX_TOPIC_BYTES = 1024


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens and how to talk to it, parsed from a URL."""

    transport: Literal["tcp", "unix"]
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse mqtt://[user:pass@]host[:port], mqtts://host[:port] or unix:///path/to/socket."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "unix":
        path = parts.path
        if not path:
            raise ConfigError(
                f"MQTT URL {redact_url(url)!r} names no socket path",
                hint="write a unix-socket broker as unix:///run/mosquitto/mqtt.sock",
            )
        return BrokerAddress("unix", path, 0, tls=False, username=user, password=password)
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(
            f"MQTT URL {redact_url(url)!r} has an unknown scheme {parts.scheme!r}",
            hint="use mqtt://host:1883, mqtts://host:8883 or unix:///path/to/socket",
        )
    if not parts.hostname:
        raise ConfigError(f"MQTT URL {redact_url(url)!r} names no host",
                          hint="e.g. mqtt://localhost:1883")
    tls = scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"MQTT URL {redact_url(url)!r} has an invalid port",
                          hint="e.g. :1883") from exc
    return BrokerAddress("tcp", parts.hostname, port, tls=tls, username=user, password=password)


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (what every log line and message prints)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def check_device_id(device_id: str) -> str:
    """Return the id if it is safe inside a topic, else raise ConfigError."""
    if not _DEVICE_ID.match(device_id) or device_id == "pool" or device_id == "reply":
        raise ConfigError(
            f"device id {device_id!r} cannot be used in MQTT topics",
            hint="use 1-64 letters, digits, '.', '_' or '-' (not 'pool' or 'reply')",
        )
    return device_id


@dataclass(frozen=True)
class DeviceTopics:
    """The topics one device owns."""

    device_id: str

    @property
    def request(self) -> str:
        return f"{ROOT}/{self.device_id}/request"

    @property
    def cancel(self) -> str:
        return f"{ROOT}/{self.device_id}/cancel"

    @property
    def status(self) -> str:
        return f"{ROOT}/{self.device_id}/status"

    @property
    def info(self) -> str:
        return f"{ROOT}/{self.device_id}/info"


def reply_topic_problem(topic: str, allowed_prefixes: list[str]) -> str | None:
    """Why a reply may not be published on `topic`, or None when it may."""
    if not topic:
        return "the reply topic is empty"
    if len(topic.encode()) > _MAX_TOPIC_BYTES:
        return f"the reply topic is longer than {_MAX_TOPIC_BYTES} bytes"
    if "+" in topic or "#" in topic or "\x00" in topic:
        return "the reply topic contains a wildcard or NUL character"
    if topic.startswith("$"):
        return "the reply topic is a broker system or shared-subscription topic"
    if _CONTROL_TOPIC.match(topic) or topic == POOL_TOPIC:
        return "the reply topic is a device control topic"
    if not any(topic.startswith(prefix) for prefix in allowed_prefixes):
        return f"the reply topic is outside the allowed prefixes {allowed_prefixes}"
    return None


class SeenIds:
    """A bounded LRU of request keys, so a redelivered request is answered once.

    Only a message the broker marks as a redelivery (DUP) is checked against it: two requests
    that merely share a reply topic and correlation are two requests.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def first_time(self, key: str) -> bool:
        """Record `key`; True the first time it is seen, False for a duplicate."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
        return True
