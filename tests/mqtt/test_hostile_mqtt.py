"""Hostile MQTT publishers and faults against a real Mosquitto: retained requests, forged
duplicates, bombs in the payload, a daemon killed mid-generation, a broker killed mid-stream."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerunner.client.mqtt import MqttChat, RemoteError, wait_for_status
from edgerunner.runtime.protocol import MAX_JSON_DEPTH
from tests.mqtt.test_transport import COUNT, HELLO

pytestmark = pytest.mark.mqtt

REQUEST = "edgerunner/dev1/request"


def test_retained_request_is_refused_and_never_run(broker, serve, probe) -> None:
    transport = serve(broker.url)
    p = probe(broker.url, "edgerunner/reply/ret/#")
    # published live while the daemon listens: v5 keeps the retain flag as published
    p.publish(REQUEST, json.dumps(HELLO), response_topic="edgerunner/reply/ret/live",
              correlation=b"live", retain=True)
    reply = p.json()
    assert reply["error"]["code"] == "invalid_request"
    assert "retained" in reply["error"]["message"]
    # the daemon cleared it: a new subscriber (or the daemon after a restart) gets nothing
    watcher = probe(broker.url, REQUEST)
    assert watcher.quiet(1.0) == []
    transport.stop(2.0)
    serve(broker.url)
    assert p.quiet(1.5) == []
    assert transport.scheduler.stats.submitted == 0


def test_retained_request_waiting_at_the_broker_is_refused_at_start(
    broker, serve, probe
) -> None:
    p = probe(broker.url, "edgerunner/reply/old/#")
    p.publish(REQUEST, json.dumps({**HELLO, "reply_to": "edgerunner/reply/old/1", "id": "r1"}),
              retain=True)
    transport = serve(broker.url, protocol="3.1.1")  # 3.1.1 sees it with retain set too
    reply = p.json()
    assert reply["id"] == "r1" and "retained" in reply["error"]["message"]
    assert transport.scheduler.stats.submitted == 0


def test_same_reply_topic_and_correlation_twice_is_two_requests(broker, serve, probe) -> None:
    transport = serve(broker.url)
    p = probe(broker.url, "edgerunner/reply/twin")
    for _ in range(2):  # not redeliveries (no DUP flag): a second client may reuse the names
        p.publish(REQUEST, json.dumps(HELLO), response_topic="edgerunner/reply/twin",
                  correlation=b"same-id")
    replies = [p.json(), p.json()]
    assert [r["object"] for r in replies] == ["chat.completion"] * 2
    assert transport.scheduler.stats.submitted == 2


def test_payload_bombs_get_error_replies(broker, serve, probe) -> None:
    serve(broker.url)
    p = probe(broker.url, "edgerunner/reply/bomb/#")
    deep_schema = '{"type": "array", "items": ' * 900 + "{}" + "}" * 900
    cases = {
        "deep-body": '{"messages": ' + "[" * 1000 + "]" * 1000 + "}",
        "deep-schema": ('{"messages": [{"role": "user", "content": "hi"}], "response_format": '
                        '{"type": "json_schema", "json_schema": {"schema": ' + deep_schema
                        + "}}}"),
        "surrogate": '{"messages": [{"role": "user", "content": "x\\udc00"}]}',
    }
    for name, payload in cases.items():
        p.publish(REQUEST, payload, response_topic=f"edgerunner/reply/bomb/{name}",
                  correlation=name.encode())
    errors = {}
    for _ in cases:
        msg = p.next()
        errors[msg.properties.CorrelationData.decode()] = json.loads(msg.payload)["error"]
    assert all(e["code"] == "invalid_request" for e in errors.values())
    for name in ("deep-body", "deep-schema"):
        assert f"deeper than {MAX_JSON_DEPTH} levels (the nesting limit)" in \
            errors[name]["message"]
    assert "lone UTF-16 surrogate" in errors["surrogate"]["message"]
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        assert chat.complete(HELLO)["object"] == "chat.completion"


def test_oversized_requests_are_refused_unread(broker, serve, probe) -> None:
    transport = serve(broker.url, max_payload_bytes=4096)
    p = probe(broker.url, "edgerunner/reply/big/#")
    body = {"messages": [{"role": "user", "content": "x" * 20_000}]}
    p.publish(REQUEST, json.dumps(body), response_topic="edgerunner/reply/big/over",
              correlation=b"over")
    reply = p.json()
    assert "over this device's limit of 4096" in reply["error"]["message"]
    # far over it (v5 Maximum Packet Size): the broker does not even hand it to the daemon
    huge = {"messages": [{"role": "user", "content": "x" * 400_000}]}
    p.publish(REQUEST, json.dumps(huge), response_topic="edgerunner/reply/big/huge",
              correlation=b"huge")
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        assert chat.complete(HELLO)["object"] == "chat.completion"
    assert p.quiet(0.5) == []
    assert transport.device.connects == 1  # and it was not disconnected for it
    assert transport.scheduler.stats.submitted == 1


def test_broker_restart_mid_stream_ends_every_request(broker_factory, serve) -> None:
    # the broker saves its sessions on every change, so even SIGKILL keeps them
    broker = broker_factory("autosave_on_changes true\nautosave_interval 1\n")
    transport = serve(broker.url)
    n = 3
    outcomes: dict[str, Any] = {}
    with MqttChat(broker.url, "dev1", timeout=90) as chat:
        ids = [chat.send({**COUNT, "max_tokens": 16}) for _ in range(n)]
        first = chat.replies(ids[0])
        head = next(first)  # the first request streams; the others wait in the queue

        def read(request_id: str, replies: Iterator[dict[str, Any]]) -> None:
            try:
                outcomes[request_id] = list(replies)
            except RemoteError as exc:
                outcomes[request_id] = exc.code

        readers = [threading.Thread(target=read, args=(ids[0], first))]
        readers += [threading.Thread(target=read, args=(i, chat.replies(i))) for i in ids[1:]]
        for reader in readers:
            reader.start()
        broker.stop(signal.SIGKILL)
        time.sleep(1.0)
        broker.start()
        for reader in readers:
            reader.join(120)
    assert all(not r.is_alive() for r in readers), "a request got no final message"
    if not isinstance(outcomes[ids[0]], str):
        outcomes[ids[0]] = [head, *outcomes[ids[0]]]
    for request_id in ids:
        chunks = outcomes[request_id]
        # replies() raises on a gap in seq; an explicit error is an answer too
        if isinstance(chunks, str):
            assert chunks in ("cancelled", "timeout")
            continue
        assert [c["seq"] for c in chunks] == list(range(len(chunks)))
        assert chunks[-1]["choices"][0]["finish_reason"] is not None
    # the broker delivered the unanswered requests again (DUP): none of them ran twice
    assert transport.scheduler.stats.submitted == n


@pytest.fixture
def daemon_process(broker, rpi5_bundle: Path, short_tmp: Path) -> Iterator[Any]:
    """Start `edgerunner serve --mqtt` processes on one socket and device id; killed after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = (short_tmp / f"daemon{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(rpi5_bundle), "--no-verify",
             "--mqtt", broker.url, "--device-id", "k9", "--socket", str(short_tmp / "d.sock"),
             "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_request_in_flight_when_the_daemon_is_killed_is_answered_after_restart(
    broker, daemon_process, probe
) -> None:
    first = daemon_process()
    # "online" is retained: wait for the probe's own view of the transition instead
    assert wait_for_status(broker.url, "k9", "online", timeout=90)
    p = probe(broker.url, "edgerunner/reply/k9")
    p.publish("edgerunner/k9/request", json.dumps({**COUNT, "max_tokens": 30}),
              response_topic="edgerunner/reply/k9", correlation=b"in-flight")
    assert json.loads(p.next(60).payload)["seq"] == 0  # generating
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    daemon_process()
    # the broker kept the unacknowledged request in the daemon's session and delivers it
    # again: generated from the start, to its final chunk
    while True:
        msg = p.next(120)
        assert msg.properties.CorrelationData == b"in-flight"
        reply = json.loads(msg.payload)
        if "error" in reply:
            assert reply["error"]["code"] in ("cancelled", "timeout")
            break
        if reply["choices"][0]["finish_reason"] is not None:
            assert reply["usage"]["completion_tokens"] == 30
            break
