"""Secrets and prompts stay out of everything the daemon prints or publishes by default: its
log, /health, /metrics and the retained MQTT info topic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from edgerunner.bundle.settings import load_config
from edgerunner.client.mqtt import MqttChat, RemoteError, wait_for_status
from edgerunner.runtime.mqtt.topics import redact_url

pytestmark = pytest.mark.mqtt

PASSWORD = "pw-CANARY-4711"
PROMPT = "prompt-CANARY-0815"
MODEL = "model-CANARY-42"


def test_redact_url() -> None:
    assert redact_url("mqtt://edge:s3cret@broker:1883") == "mqtt://edge:***@broker:1883"
    assert redact_url("mqtts://broker:8883") == "mqtts://broker:8883"
    assert redact_url("mqtt://:p%40ss@h") == "mqtt://:***@h"


def test_password_from_a_file_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text(f"{PASSWORD}\n")
    config = load_config(environ={"EDGERUNNER_MQTT__PASSWORD_FILE": str(secret)})
    assert config.mqtt.secret() == PASSWORD
    config = load_config(environ={"EDGERUNNER_MQTT__PASSWORD": PASSWORD})
    assert config.mqtt.secret() == PASSWORD
    assert PASSWORD not in repr(config) and PASSWORD not in config.model_dump_json()


def auth_broker(broker_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A broker that lets in only user `edge` with PASSWORD."""
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "edge", PASSWORD],
                   check=True, capture_output=True)
    broker = broker_factory(f"password_file {passwords}\n", start=False)
    broker.config.write_text(broker.config.read_text().replace("allow_anonymous true",
                                                               "allow_anonymous false"))
    broker.start()
    return broker


def test_the_daemon_logs_in_with_a_password_file(broker_factory, serve, tmp_path: Path) -> None:
    broker = auth_broker(broker_factory, tmp_path)
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    serve(broker.url, username="edge", password_file=secret)  # waits until subscribed
    with MqttChat(broker.url, "dev1", username="edge", password=PASSWORD, timeout=60) as chat:
        assert chat.complete({"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 2})["object"] == "chat.completion"


def test_no_password_or_prompt_in_logs_health_metrics_or_info(
    broker_factory, probe, rpi5_bundle: Path, short_tmp: Path, tmp_path: Path
) -> None:
    broker = auth_broker(broker_factory, tmp_path)
    url = f"mqtt://edge:{PASSWORD}@127.0.0.1:{broker.port}"
    log = short_tmp / "daemon.log"
    sock = short_tmp / "d.sock"
    with log.open("wb") as out:
        # the worst case: the password in the URL on the command line
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(rpi5_bundle), "--no-verify",
             "--mqtt", url, "--device-id", "sec1", "--socket", str(sock), "--threads", "1"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for_status(url, "sec1", "online", timeout=90), log.read_text()[-2000:]
        info = probe(url, "edgerunner/sec1/info").next(30).payload.decode()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://edgerunner", timeout=60) as http:
            ok = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2})
            assert ok.status_code == 200
            unknown = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": PROMPT}], "model": MODEL})
            assert unknown.status_code == 404
            bad = http.post("/v1/chat/completions", content=f'{{"messages": "{PROMPT}"')
            assert bad.status_code == 400
            health, metrics = http.get("/health").text, http.get("/metrics").text
        with MqttChat(url, "sec1", timeout=60) as chat:
            chat.complete({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2})
            with pytest.raises(RemoteError):
                chat.complete({"messages": [{"role": "user", "content": PROMPT}],
                               "model": MODEL})
            with pytest.raises(RemoteError):
                chat.complete({"messages": [{"role": PROMPT, "content": "x"}]})
            chat.cancel(PROMPT)
        p = probe(url, "edgerunner/reply/sec/#")
        p.publish("edgerunner/sec1/cancel", f"not json {PROMPT}")
        p.publish("edgerunner/sec1/request", f"{{{PROMPT}",
                  response_topic="edgerunner/reply/sec/1")
        assert "error" in p.json()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    text = log.read_text()
    assert "mqtt://edge:***@127.0.0.1" in text  # the URL is logged, redacted
    assert "password" in text and "process list" in text  # and the URL's password warned about
    for where, content in {"log": text, "info": info, "/health": health,
                           "/metrics": metrics}.items():
        for canary in (PASSWORD, PROMPT, MODEL):
            assert canary not in content, f"{canary} leaked into {where}"
    assert json.loads(info)["device_id"] == "sec1"
