"""`edgerunner serve --mqtt` as a real process, and `edgerunner ask --mqtt` against it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.cli import main
from edgerunner.client.mqtt import wait_for_status

pytestmark = pytest.mark.mqtt


@pytest.fixture
def daemon(broker, rpi5_bundle: Path, short_tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon as a subprocess serving the rpi5 bundle over a socket and MQTT."""
    log = short_tmp / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(rpi5_bundle), "--no-verify",
             "--mqtt", broker.url, "--device-id", "proc1", "--socket", str(short_tmp / "d.sock")],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_for_status(broker.url, "proc1", "online", timeout=90):
            proc.kill()
            proc.wait(10)
            pytest.fail(f"daemon never came online: {log.read_text()[-3000:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_last_will_says_offline_when_the_daemon_is_killed(broker, daemon, probe) -> None:
    p = probe(broker.url, "edgerunner/proc1/status")
    assert p.next().payload == b"online"
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(10)
    msg = p.next(timeout=30)
    assert msg.payload == b"offline"


def test_sigterm_publishes_offline_and_exits_cleanly(broker, daemon, probe) -> None:
    p = probe(broker.url, "edgerunner/proc1/status")
    assert p.next().payload == b"online"
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert p.next(timeout=10).payload == b"offline"


def test_ask_over_mqtt_streams_and_returns_schema_json(broker, daemon, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["ask", "Say hello.", "--mqtt", broker.url,
                                  "--device-id", "proc1", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()

    schema = tmp_path / "reading.json"
    schema.write_text(json.dumps({
        "type": "object",
        "properties": {"room": {"type": "string"}, "celsius": {"type": "number"}},
        "required": ["room", "celsius"],
    }))
    result = runner.invoke(main, ["ask", "The kitchen is 21.5 degrees. Report it as JSON.",
                                  "--mqtt", broker.url, "--device-id", "proc1",
                                  "--mqtt-protocol", "3.1.1", "--json-schema", str(schema),
                                  "--max-tokens", "64", "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    content = json.loads(result.output)["choices"][0]["message"]["content"]
    reading = json.loads(content)
    assert set(reading) >= {"room", "celsius"}


def test_ask_over_mqtt_needs_both_url_and_device(broker) -> None:
    result = CliRunner().invoke(main, ["ask", "hi", "--mqtt", broker.url])
    assert result.exit_code == 2
    assert "--device-id" in result.output


def test_iot_client_example_prints_the_parsed_json(broker, daemon) -> None:
    example = Path(__file__).parents[2] / "tools" / "examples" / "iot_client_example.py"
    result = subprocess.run(
        [sys.executable, str(example), "--broker", "127.0.0.1", "--port", str(broker.port),
         "--device", "proc1", "The hall is 19 C and its window is open."],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reading = json.loads(result.stdout)
    assert set(reading) == {"room", "temperature_c", "window_open"}
    assert isinstance(reading["window_open"], bool)
