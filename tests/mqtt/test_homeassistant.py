"""Home Assistant MQTT discovery from real daemons on a real Mosquitto: a subscriber on
homeassistant/# sees one complete HA device per daemon, and every state topic gets values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.settings import MqttConfig
from edgerunner.cli import main
from edgerunner.client.mqtt import wait_for_status
from edgerunner.errors import ConfigError
from edgerunner.runtime.mqtt.homeassistant import (
    ENTITIES,
    DeviceCard,
    Discovery,
    forget_device,
    node_id,
)

pytestmark = pytest.mark.mqtt

DEVICES = ("ha-a", "ha.b")  # the dot is not allowed in an HA node id
TEMPLATE = re.compile(r"^\{\{ value_json\.([a-z_]+) \}\}$")
SENSOR_KEYS = {"name", "unique_id", "device", "availability_topic", "payload_available",
               "payload_not_available", "state_topic", "value_template"}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}


@pytest.fixture
def daemons(broker, rpi5_bundle: Path, short_tmp: Path) -> Iterator[dict[str, Path]]:
    """Two daemons with discovery on (one by --mqtt-homeassistant, one by its --config file),
    each with its own socket."""
    by_flag = short_tmp / "flag.toml"
    by_flag.write_text("[mqtt]\ninfo_interval_s = 1\n")
    by_file = short_tmp / "file.toml"
    by_file.write_text("[mqtt]\nhomeassistant = true\ninfo_interval_s = 1\n")
    procs, sockets = [], {}
    for device, how in zip(DEVICES, (["--config", str(by_flag), "--mqtt-homeassistant"],
                                     ["--config", str(by_file)]), strict=True):
        sock = short_tmp / f"{device}.sock"
        log = (short_tmp / f"{device}.log").open("wb")
        procs.append((device, log, subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(rpi5_bundle), "--no-verify",
             "--threads", "1", "--mqtt", broker.url, "--device-id", device, "--socket",
             str(sock), *how], stdout=log, stderr=subprocess.STDOUT)))
        sockets[device] = sock
    try:
        for device, _, _proc in procs:
            if not wait_for_status(broker.url, device, "online", timeout=90):
                pytest.fail(f"{device} never came online: "
                            f"{(short_tmp / f'{device}.log').read_text()[-3000:]}")
        yield sockets
    finally:
        for _, _log, proc in procs:
            proc.terminate()
        for _, log, proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


def _collect(p: Any, want: int, timeout: float = 30) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + timeout
    while len(configs) < want and time.monotonic() < end:
        msg = p.next(timeout=max(0.1, end - time.monotonic()))
        if msg.payload:
            configs[msg.topic] = json.loads(msg.payload)
    return configs


def test_each_daemon_is_a_complete_ha_device_whose_sensors_update(
        broker, daemons: dict[str, Path], probe, rpi5_bundle: Path) -> None:
    manifest = BundleManifest.model_validate_json((rpi5_bundle / "manifest.json").read_text())
    p = probe(broker.url, "homeassistant/#")
    configs = _collect(p, len(ENTITIES) * len(DEVICES))
    for device in DEVICES:
        node = node_id(device)
        mine = {t: c for t, c in configs.items() if t.split("/")[2] == node}
        assert len(mine) == len(ENTITIES), sorted(configs)
        identifiers = {json.dumps(c["device"]["identifiers"]) for c in mine.values()}
        assert len(identifiers) == 1, "all entities belong to one HA device"
        for topic, config in mine.items():
            prefix, component, _, object_id, last = topic.split("/")
            assert (prefix, last) == ("homeassistant", "config")
            assert component in ("sensor", "binary_sensor")
            assert set(config["device"]) >= DEVICE_KEYS, config["device"]
            assert config["device"]["manufacturer"] == "edgerunner"
            assert config["device"]["model"] == manifest.name
            assert config["device"]["hw_version"] == manifest.profile.display_name
            assert config["unique_id"].endswith(object_id)
            if object_id == "connectivity":
                assert config["device_class"] == "connectivity"
                assert config["state_topic"] == f"edgerunner/{device}/status"
            else:
                assert set(config) >= SENSOR_KEYS, (topic, sorted(config))
                assert config["availability_topic"] == f"edgerunner/{device}/status"
                assert TEMPLATE.match(config["value_template"])
        by_object = {t.split("/")[3]: c for t, c in mine.items()}
        assert by_object["temperature"]["device_class"] == "temperature"
        assert by_object["temperature"]["unit_of_measurement"] == "°C"
        assert by_object["memory_headroom"]["unit_of_measurement"] == "MiB"
        assert by_object["decode_speed"]["state_class"] == "measurement"
        assert len({c["unique_id"] for c in configs.values()}) == len(configs)

    # every state topic the configs name really receives values, for every template's key
    state_topics = {c["state_topic"] for c in configs.values()}
    s = probe(broker.url, *sorted(state_topics))
    payloads: dict[str, bytes] = {}

    def settled() -> bool:
        # the first state may say "loading": MQTT connects before the daemon reports ready
        return set(payloads) == state_topics and all(
            json.loads(payloads[f"edgerunner/{d}/state"])["state"] == "ready" for d in DEVICES)

    end = time.monotonic() + 30
    while not settled() and time.monotonic() < end:
        msg = s.next(timeout=max(0.1, end - time.monotonic()))
        payloads[msg.topic] = msg.payload
    assert set(payloads) == state_topics
    for config in configs.values():
        payload = payloads[config["state_topic"]]
        if "value_template" not in config:
            assert payload == b"online"
            continue
        key = TEMPLATE.match(config["value_template"]).group(1)  # type: ignore[union-attr]
        state = json.loads(payload)
        assert key in state, (key, state)
    for device in DEVICES:
        state = json.loads(payloads[f"edgerunner/{device}/state"])
        assert state["model"] == manifest.name and state["state"] == "ready"
        assert isinstance(state["queue_depth"], int)
        assert isinstance(state["headroom_mb"], float) and state["headroom_mb"] > 0
        assert state["throttled"] in ("ON", "OFF")
        assert state["temperature_c"] is None or isinstance(state["temperature_c"], float)

    # after a request, the decode speed sensor of that device updates
    device = DEVICES[0]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemons[device])),
                      base_url="http://edgerunner", timeout=60) as http:
        r = http.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
        assert r.status_code == 200
    end = time.monotonic() + 20
    speed = 0.0
    while speed <= 0 and time.monotonic() < end:
        msg = s.next(timeout=max(0.1, end - time.monotonic()))
        if msg.topic == f"edgerunner/{device}/state":
            speed = json.loads(msg.payload)["decode_tps"]
    assert speed > 0


def test_forget_removes_the_device(broker, probe) -> None:
    discovery = Discovery("gone.1", DeviceCard(model="m", hardware="Raspberry Pi 5"))
    publisher = probe(broker.url, "unused/#")
    discovery.announce(publisher.publish)
    publisher.publish(discovery.state_topic, b"{}", retain=True)
    first = probe(broker.url, "homeassistant/#")
    assert len(_collect(first, len(ENTITIES))) == len(ENTITIES)
    cleared = forget_device(MqttConfig(url=broker.url), "gone.1")
    assert set(cleared) == {*discovery.configs(), discovery.state_topic}
    # empty retained configs: HA deletes the entities, and a new subscriber gets nothing
    later = probe(broker.url, "homeassistant/#", "edgerunner/gone.1/state")
    assert [m for m in later.quiet(1.0) if m.payload] == []


def test_forget_names_an_unreachable_broker() -> None:
    with pytest.raises(ConfigError, match="could not connect"):
        forget_device(MqttConfig(url="mqtt://127.0.0.1:1"), "x", timeout=0.5)


def test_serve_forget_flag_removes_the_device(broker, probe, rpi5_bundle: Path) -> None:
    discovery = Discovery("gone.2", DeviceCard(model="m"))
    publisher = probe(broker.url, "unused/#")
    discovery.announce(publisher.publish)
    result = CliRunner().invoke(main, [
        "serve", str(rpi5_bundle), "--no-verify", "--mqtt", broker.url, "--device-id",
        "gone.2", "--mqtt-homeassistant-forget"])
    assert result.exit_code == 0, result.output
    assert "removed gone.2 from Home Assistant" in result.output
    later = probe(broker.url, "homeassistant/#")
    assert [m for m in later.quiet(1.0) if m.payload] == []
