"""Home Assistant MQTT discovery: each daemon appears in HA as one device with its sensors.

    <prefix>/binary_sensor/<node>/connectivity/config   from edgerunner/<device>/status
    <prefix>/sensor/<node>/<object>/config              from edgerunner/<device>/state

`<prefix>` is HA's discovery prefix (default `homeassistant`), `<node>` the device id with the
characters HA does not allow in a node id replaced by `_`. Configs are retained, so HA finds
the device whenever it (re)starts; every entity but connectivity is unavailable while the
status topic says `offline` (the daemon's Last Will). The state topic carries one flat JSON
object built from the info document, re-published with it. An empty retained config removes
an entity: `forget` does that for the whole device.

Keys follow https://www.home-assistant.io/integrations/mqtt/#discovery-messages and the sensor
and binary_sensor MQTT platforms (unique_id, device, availability_topic, state_topic,
value_template, unit_of_measurement, device_class, state_class).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from edgerunner import __version__
from edgerunner.errors import ConfigError
from edgerunner.runtime.health import Health, ServedModel
from edgerunner.runtime.mqtt.topics import ROOT, DeviceTopics

if TYPE_CHECKING:
    from edgerunner.bundle.settings import MqttConfig
    from edgerunner.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "homeassistant"
_NODE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
Publish = Callable[..., Any]  # Link.publish(topic, payload, retain=...)


@dataclass(frozen=True)
class Entity:
    """One HA entity: where its config goes and what it reads from which topic."""

    component: Literal["sensor", "binary_sensor"]
    object_id: str
    name: str
    key: str = ""  # the state JSON's key ("" = the status topic itself)
    extra: dict[str, Any] = field(default_factory=dict)


ENTITIES = (
    Entity("binary_sensor", "connectivity", "Connectivity",
           extra={"device_class": "connectivity", "payload_on": "online",
                  "payload_off": "offline", "entity_category": "diagnostic"}),
    Entity("sensor", "temperature", "Temperature", "temperature_c",
           {"device_class": "temperature", "unit_of_measurement": "°C",
            "state_class": "measurement", "suggested_display_precision": 1}),
    Entity("binary_sensor", "throttled", "Throttled", "throttled",
           {"device_class": "problem", "payload_on": "ON", "payload_off": "OFF"}),
    Entity("sensor", "decode_speed", "Decode speed", "decode_tps",
           {"unit_of_measurement": "tok/s", "state_class": "measurement",
            "icon": "mdi:speedometer", "suggested_display_precision": 1}),
    Entity("sensor", "queue_depth", "Queue depth", "queue_depth",
           {"state_class": "measurement", "icon": "mdi:tray-full"}),
    Entity("sensor", "slots_in_use", "Requests decoding", "slots_in_use",
           {"state_class": "measurement", "icon": "mdi:format-list-numbered"}),
    Entity("sensor", "memory_headroom", "Memory headroom", "headroom_mb",
           {"device_class": "data_size", "unit_of_measurement": "MiB",
            "state_class": "measurement", "suggested_display_precision": 0}),
    Entity("sensor", "model", "Model", "model",
           {"icon": "mdi:brain", "entity_category": "diagnostic"}),
    Entity("sensor", "state", "State", "state",
           {"icon": "mdi:state-machine", "entity_category": "diagnostic"}),
)


def node_id(device_id: str) -> str:
    """The device id as an HA discovery node id ([A-Za-z0-9_-])."""
    return _NODE_UNSAFE.sub("_", device_id)


@dataclass(frozen=True)
class DeviceCard:
    """What HA shows about the device: the bundle's model on the profile's hardware."""

    model: str = ""
    hardware: str = ""
    sw_version: str = __version__

    @classmethod
    def of(cls, served: ServedModel) -> DeviceCard:
        """From the served bundle's description."""
        return cls(model=served.name, hardware=served.hardware,
                   sw_version=served.edgerunner_version)


class Discovery:
    """The discovery configs and the state topic of one device."""

    def __init__(self, device_id: str, card: DeviceCard, prefix: str = DEFAULT_PREFIX) -> None:
        self.device_id = device_id
        self.node = node_id(device_id)
        self.card = card
        self.prefix = prefix.rstrip("/")
        self.topics = DeviceTopics(device_id)
        self.state_topic = f"{ROOT}/{device_id}/state"
        self._speed = _Speed()

    def config_topic(self, entity: Entity) -> str:
        return f"{self.prefix}/{entity.component}/{self.node}/{entity.object_id}/config"

    def device(self) -> dict[str, Any]:
        device: dict[str, Any] = {
            "identifiers": [f"edgerunner_{self.node}"],
            "name": f"edgerunner {self.device_id}",
            "manufacturer": "edgerunner",
            "model": self.card.model or "edgerunner",
            "sw_version": self.card.sw_version,
        }
        if self.card.hardware:
            device["hw_version"] = self.card.hardware
        return device

    def configs(self) -> dict[str, dict[str, Any]]:
        """Every entity's config by its discovery topic."""
        out = {}
        for entity in ENTITIES:
            config: dict[str, Any] = {
                "name": entity.name,
                "unique_id": f"edgerunner_{self.node}_{entity.object_id}",
                "device": self.device(),
                "origin": {"name": "edgerunner", "sw_version": __version__},
            }
            if entity.key:
                config["state_topic"] = self.state_topic
                config["value_template"] = f"{{{{ value_json.{entity.key} }}}}"
                config["availability_topic"] = self.topics.status
                config["payload_available"] = "online"
                config["payload_not_available"] = "offline"
            else:
                # connectivity reads the status topic itself, so it shows "disconnected"
                # rather than "unavailable" when the daemon is gone
                config["state_topic"] = self.topics.status
            config.update(entity.extra)
            out[self.config_topic(entity)] = config
        return out

    def announce(self, publish: Publish) -> None:
        """Publish every config, retained (on every connect: HA may have lost them)."""
        for topic, config in self.configs().items():
            publish(topic, json.dumps(config).encode(), retain=True)

    def state(self, health: Health, completion_tokens: int,
              generation_seconds: float) -> dict[str, Any]:
        """The state topic's JSON from the daemon's Health and the scheduler's counters."""
        return {
            "temperature_c": health.temperature_c,
            "throttled": "ON" if health.slowed else "OFF",
            "decode_tps": self._speed.update(completion_tokens, generation_seconds),
            "queue_depth": health.queue.depth,
            "slots_in_use": health.queue.running,
            "headroom_mb": health.memory.headroom_mb,
            "model": health.model or self.card.model,
            "state": health.state,
        }

    def publish_state(self, publish: Publish, health: Health, completion_tokens: int,
                      generation_seconds: float) -> None:
        state = self.state(health, completion_tokens, generation_seconds)
        publish(self.state_topic, json.dumps(state).encode(), retain=True)

    def forget(self, publish: Publish) -> None:
        """Remove the device from HA: empty retained configs (and state)."""
        for topic in self.configs():
            publish(topic, b"", retain=True)
        publish(self.state_topic, b"", retain=True)


class _Speed:
    """Tokens per second of generation since the previous state (the last value while idle)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = 0
        self._seconds = 0.0
        self._value = 0.0

    def update(self, tokens: int, seconds: float) -> float:
        with self._lock:
            d_tokens, d_seconds = tokens - self._tokens, seconds - self._seconds
            self._tokens, self._seconds = tokens, seconds
            if d_tokens > 0 and d_seconds > 0:
                self._value = round(d_tokens / d_seconds, 2)
            return self._value


def discovery_for(config: MqttConfig, device_id: str, scheduler: Scheduler,
                  served: ServedModel | None = None) -> Discovery | None:
    """The transport's Discovery when `mqtt.homeassistant` is on (None otherwise)."""
    if not config.homeassistant:
        return None
    card = DeviceCard.of(served) if served is not None else DeviceCard(model=scheduler.model_name)
    return Discovery(device_id, card, config.homeassistant_prefix)


def publish_state(discovery: Discovery, publish: Publish, health: Health,
                  scheduler: Scheduler) -> None:
    """The state topic, next to each info publish."""
    stats = scheduler.stats
    discovery.publish_state(publish, health, stats.completion_tokens, stats.generation_seconds)


def forget_device(config: MqttConfig, device_id: str, timeout: float = 10.0) -> list[str]:
    """Connect to the broker and clear `device_id`'s retained discovery configs and state (HA
    then deletes the device); the topics cleared. ConfigError if the broker cannot be reached."""
    from edgerunner.runtime.mqtt.session import SessionOptions, connect_async, new_client
    from edgerunner.runtime.mqtt.topics import redact_url

    if not config.url:
        raise ConfigError("no MQTT broker to remove the device from",
                          "pass --mqtt URL (or set mqtt.url in config.toml)")
    discovery = Discovery(device_id, DeviceCard(), config.homeassistant_prefix)
    options = SessionOptions(client_id=f"edgerunner-{device_id}-forget",
                             protocol=config.protocol)
    client, address = new_client(config.url, options, username=config.username,
                                 password=config.secret(), ca_file=config.ca_file)
    connected = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            connected.set()

    client.on_connect = on_connect
    connect_async(client, address, options)
    client.loop_start()
    sent: list[Any] = []
    topics: list[str] = []

    def publish(topic: str, payload: bytes, retain: bool = False) -> None:
        topics.append(topic)
        sent.append(client.publish(topic, payload, qos=1, retain=retain))

    try:
        if not connected.wait(timeout):
            raise ConfigError(f"could not connect to the MQTT broker {redact_url(config.url)} "
                              f"within {timeout:g} s", "check --mqtt and the broker's "
                              "credentials, and that it is running")
        discovery.forget(publish)
        for info in sent:
            info.wait_for_publish(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    logger.info("homeassistant: removed %s (%d retained topics cleared)", device_id, len(topics))
    return topics
