"""Hypothesis against the real daemon over both transports: every hostile request gets a final
answer (a result or an error naming what was wrong), never a 5xx, never silence; the daemon
stays up. The strategies are tools/research/fuzz_campaign.py's, which runs the same for longer."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

TOOL = Path(__file__).resolve().parents[2] / "tools" / "research" / "fuzz_campaign.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_campaign", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_campaign"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_tool()

def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class Target:
    """One daemon (and broker) for the whole module: a death shows in every later example."""

    def __init__(self, proc: object, sock: Path, url: str | None) -> None:
        self.proc = proc
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                                 base_url="http://edgerunner", timeout=300)
        self.mqtt = fuzz.MqttProbe(url, "fuzz") if url else None


@pytest.fixture(scope="module")
def target(rpi5_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    work = Path(tmp_path_factory.mktemp("fuzz", numbered=True))
    short = Path(tempfile.mkdtemp(prefix="er-fz-", dir="/tmp"))
    has_broker = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
    port = fuzz._free_port()
    broker = fuzz.mosquitto(work, port) if has_broker else None
    url = broker.__enter__() if broker is not None else None
    args = ("--mqtt", url, "--device-id", "fuzz") if url else ()
    with fuzz.daemon(rpi5_bundle, short, *args) as proc:
        target = Target(proc, short / "f.sock", url)
        try:
            yield target
        finally:
            target.http.close()
            if target.mqtt is not None:
                target.mqtt.close()
    if broker is not None:
        broker.__exit__(None, None, None)
    shutil.rmtree(short, ignore_errors=True)


@fuzz_settings(150)
@given(request=fuzz.HTTP_REQUEST)
def test_every_http_request_gets_a_final_answer(target: Target,
                                                request: tuple[str, bytes]) -> None:
    path, body = request
    fuzz.send_http(target.http, path, body)  # asserts the contract
    assert target.proc.poll() is None  # type: ignore[attr-defined]


@pytest.mark.mqtt
@fuzz_settings(60)
@given(payload=fuzz.MQTT_PAYLOAD)
def test_every_mqtt_request_gets_a_final_reply(target: Target, payload: bytes) -> None:
    if target.mqtt is None:
        pytest.skip("Mosquitto is not installed: `make test` installs it")
    outcome = target.mqtt.send(payload)
    assert outcome not in ("lost", "unparseable reply", "internal_error"), (outcome, payload[:200])
    assert target.proc.poll() is None  # type: ignore[attr-defined]
