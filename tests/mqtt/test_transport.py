"""The MQTT transport against a real Mosquitto and the real model, in process."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time

import pytest

from edgerunner.client.mqtt import MqttChat, RemoteError, wait_for_status
from edgerunner.runtime.mqtt.session import SessionOptions, connect_async, new_client
from tests.mqtt.conftest import REFUSALS

pytestmark = pytest.mark.mqtt

HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
         "temperature": 0}
# a prompt the small model keeps answering for hundreds of tokens: the grammar (an array of at
# least 400 integers) cannot end early, so only max_tokens or a cancel stops it
COUNT = {"messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
         "max_tokens": 600, "temperature": 0, "stream": True,
         "response_format": {"type": "json_schema", "json_schema": {"name": "nums", "schema": {
             "type": "array", "items": {"type": "integer"}, "minItems": 400}}}}


def test_v5_round_trip_echoes_correlation_data(broker, serve, probe) -> None:
    serve(broker.url)
    p = probe(broker.url, "edgerunner/reply/t/#")
    p.publish("edgerunner/dev1/request", json.dumps(HELLO),
              response_topic="edgerunner/reply/t/1", correlation=b"\x00corr-1")
    msg = p.next()
    reply = json.loads(msg.payload)
    assert msg.topic == "edgerunner/reply/t/1"
    assert msg.properties.CorrelationData == b"\x00corr-1"
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] >= 1


def test_311_round_trip_with_reply_to_and_id_in_body(broker, serve) -> None:
    serve(broker.url, protocol="3.1.1")
    with MqttChat(broker.url, "dev1", protocol="3.1.1", timeout=60) as chat:
        request_id = chat.send(HELLO, request_id="req-311")
        (reply,) = list(chat.replies(request_id))
    assert reply["id"] == "req-311"
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("refusal", list(REFUSALS.values()), ids=list(REFUSALS))
def test_v5_falls_back_to_311_when_the_broker_refuses_v5(
    broker, serve, probe, v311_gate, refusal: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    gate = v311_gate(refusal)
    caplog.set_level(logging.WARNING, logger="edgerunner.runtime.mqtt.link")
    p = probe(broker.url, "edgerunner/dev1/info")
    transport = serve(gate.url)  # protocol "5", the default
    assert not transport.device.v5 and transport.pool is not None and not transport.pool.v5
    # each session tried v5 once, then connected with 3.1.1 (protocol level 4)
    assert sorted(gate.levels) == [4, 4, 5, 5]
    assert gate.levels.index(4) > gate.levels.index(5)
    fallbacks = [r for r in caplog.records if "does not support MQTT v5" in r.getMessage()]
    assert len(fallbacks) == 2  # device and pool, once each
    assert json.loads(p.next().payload)["mqtt"]["protocol"] == "3.1.1"
    # the daemon now reads 3.1.1 envelopes (reply_to and id in the body)
    with MqttChat(broker.url, "dev1", protocol="3.1.1", timeout=60) as chat:
        (reply,) = list(chat.replies(chat.send(HELLO, request_id="after-fallback")))
    assert reply["id"] == "after-fallback"
    assert reply["object"] == "chat.completion"


def test_ask_client_falls_back_to_311_too(broker, serve, v311_gate) -> None:
    serve(broker.url, protocol="3.1.1")
    gate = v311_gate(REFUSALS["3.1.1 broker"])
    with MqttChat(gate.url, "dev1", timeout=60) as chat:
        assert not chat.v5
        reply = chat.complete(HELLO)
    assert reply["object"] == "chat.completion"
    assert gate.levels == [5, 4]


def test_stream_seq_increases_and_final_chunk_has_usage(broker, serve, probe) -> None:
    serve(broker.url, stream_interval_s=0)  # one chunk per token: the most messages
    p = probe(broker.url, "edgerunner/reply/s")
    body = {**COUNT, "max_tokens": 24}
    p.publish("edgerunner/dev1/request", json.dumps(body), response_topic="edgerunner/reply/s",
              correlation=b"s")
    chunks = [p.json()]
    while chunks[-1]["choices"][0]["finish_reason"] is None:
        chunks.append(p.json())
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 24
    assert "usage" not in chunks[0] or len(chunks) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()


def test_chunks_fit_the_brokers_maximum_packet_size(broker_factory, serve, probe) -> None:
    limit = 420
    broker = broker_factory(f"max_packet_size {limit}\n")
    # a long interval makes the whole text arrive in the final flush, which must be split
    transport = serve(broker.url, stream_interval_s=10)
    assert transport.device.max_packet == limit
    p = probe(broker.url, "edgerunner/reply/big")
    p.publish("edgerunner/dev1/request", json.dumps({**COUNT, "max_tokens": 80}),
              response_topic="edgerunner/reply/big", correlation=b"b")
    messages = [p.next()]
    while json.loads(messages[-1].payload)["choices"][0]["finish_reason"] is None:
        messages.append(p.next())
    assert len(messages) > 2, "the text should not have fitted one packet"
    assert all(len(m.payload) + len(m.topic) < limit for m in messages)
    chunks = [json.loads(m.payload) for m in messages]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert chunks[-1]["usage"]["completion_tokens"] == 80


def test_cancel_stops_generation_with_an_error(broker, serve) -> None:
    transport = serve(broker.url)
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        request_id = chat.send(COUNT)
        replies = chat.replies(request_id)
        first = next(replies)
        assert first["seq"] == 0
        chat.cancel(request_id)
        with pytest.raises(RemoteError) as err:
            for _ in replies:
                pass
    assert err.value.code == "cancelled"
    assert transport.scheduler.stats.failed["cancelled"] == 1


def test_malformed_payloads_get_error_replies_and_the_daemon_keeps_serving(
    broker, serve, probe
) -> None:
    serve(broker.url, max_payload_bytes=4096)
    p = probe(broker.url, "edgerunner/reply/bad/#")
    cases = {
        "not-json": b"hello there",
        "binary": bytes(range(256)),
        "schema": json.dumps({"messages": [{"role": "wizard", "content": "x"}],
                              "temperature": 9}).encode(),
        "array": b"[1, 2, 3]",
        "oversized": json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode(),
    }
    for name, payload in cases.items():
        p.publish("edgerunner/dev1/request", payload, response_topic=f"edgerunner/reply/bad/{name}",
                  correlation=name.encode())
    errors = {}
    for _ in cases:
        msg = p.next()
        errors[msg.properties.CorrelationData.decode()] = json.loads(msg.payload)["error"]
    assert set(errors) == set(cases)
    assert all(e["code"] == "invalid_request" for e in errors.values())
    assert "not valid JSON" in errors["not-json"]["message"]
    assert "UTF-8" in errors["binary"]["message"]
    assert "messages.0.role" in errors["schema"]["message"]
    assert "temperature" in errors["schema"]["message"]
    assert "4096" in errors["oversized"]["message"]
    # a 3.1.1-style request with a bad body is answered on its reply_to
    p.publish("edgerunner/dev1/request", json.dumps(
        {"reply_to": "edgerunner/reply/bad/311", "id": 7, "messages": "nope"}))
    reply = p.json()
    assert reply["id"] == "7" and reply["error"]["code"] == "invalid_request"
    # still serving
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        assert chat.complete(HELLO)["choices"][0]["message"]["content"]


def test_reply_topic_injection_is_refused(broker, serve, probe) -> None:
    serve(broker.url)
    watch = probe(broker.url, "#")
    hostile = ["edgerunner/dev1/request", "edgerunner/dev2/cancel", "edgerunner/dev1/status",
               "edgerunner/pool/request", "edgerunner/reply/+", "edgerunner/reply/#",
               "$SYS/broker", "somewhere/else"]
    for topic in hostile:
        watch.publish("edgerunner/dev1/request", json.dumps(HELLO), response_topic=topic,
                      correlation=b"x")
    watch.publish("edgerunner/dev1/request", json.dumps({**HELLO, "reply_to": hostile[1]}))
    # noLocal: the watcher never sees its own publishes, so anything here came from the daemon
    leaked = [m for m in watch.quiet(2.0) if not m.topic.endswith(("/status", "/info"))]
    assert leaked == []
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        assert chat.complete(HELLO)["object"] == "chat.completion"


def test_request_expiring_in_the_queue_is_not_generated(broker, serve, probe) -> None:
    transport = serve(broker.url)
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        # long requests in every slot (together within the engine's 1,024 KV cells): the
        # next one has to wait in the queue
        long_ids = [chat.send({**COUNT, "max_tokens": 200})
                    for _ in range(transport.scheduler.slots)]
        for long_id in long_ids:
            next(chat.replies(long_id, timeout=60))  # running
        p = probe(broker.url, "edgerunner/reply/exp")
        p.publish("edgerunner/dev1/request", json.dumps(HELLO),
                  response_topic="edgerunner/reply/exp", correlation=b"e", expiry=1)
        time.sleep(1.5)  # let it expire while it waits behind the long requests
        assert not transport.scheduler.stats.completed, "a long request ended too early"
        for long_id in long_ids:
            chat.cancel(long_id)
    reply = p.json()
    assert reply["error"]["code"] == "timeout"
    assert "expired before it could run" in reply["error"]["message"]
    assert transport.scheduler.stats.completed == 0


def test_status_and_info_are_retained_and_offline_after_stop(broker, serve, probe) -> None:
    transport = serve(broker.url, device_id="kitchen")
    p = probe(broker.url, "edgerunner/kitchen/status", "edgerunner/kitchen/info")
    got = {m.topic: m for m in (p.next(), p.next())}
    assert got["edgerunner/kitchen/status"].payload == b"online"
    assert got["edgerunner/kitchen/status"].retain
    info = json.loads(got["edgerunner/kitchen/info"].payload)
    assert info["device_id"] == "kitchen"
    assert info["model"] == transport.scheduler.model_name
    assert "queue_depth" in info and "version" in info
    transport.stop(2.0)
    assert p.next().payload == b"offline"


def test_pool_spreads_work_over_two_daemons_and_loses_none(
    broker, serve, mqtt_engine_b
) -> None:
    a = serve(broker.url, device_id="pool-a")
    b = serve(broker.url, device_id="pool-b", engine=mqtt_engine_b)
    n = 8
    with MqttChat(broker.url, device_id=None, timeout=120) as chat:
        ids = [chat.send({**HELLO, "max_tokens": 4}) for _ in range(n)]
        replies = [list(chat.replies(i)) for i in ids]
    assert all(r[0]["object"] == "chat.completion" for r in replies)
    done_a, done_b = a.scheduler.stats.completed, b.scheduler.stats.completed
    assert done_a + done_b == n
    assert done_a >= 1 and done_b >= 1


def test_daemon_started_before_the_broker_connects_when_it_comes_up(
    broker_factory, serve
) -> None:
    broker = broker_factory(start=False)
    transport = serve(broker.url, wait=False)
    time.sleep(0.5)
    assert not transport.connected
    broker.start()
    assert transport.device.wait_ready(15)
    assert wait_for_status(broker.url, "dev1", "online", timeout=10)
    with MqttChat(broker.url, "dev1", timeout=60) as chat:
        assert chat.complete(HELLO)["object"] == "chat.completion"


def test_broker_restart_mid_stream_loses_no_request(broker_factory, serve) -> None:
    # the broker saves its sessions on every change, so even SIGKILL keeps them
    broker = broker_factory("autosave_on_changes true\nautosave_interval 1\n")
    transport = serve(broker.url)
    outcome: dict[str, object] = {}
    with MqttChat(broker.url, "dev1", timeout=90) as chat:
        request_id = chat.send({**COUNT, "max_tokens": 150})
        replies = chat.replies(request_id)

        def read_rest() -> None:
            try:
                outcome["chunks"] = list(replies)
            except RemoteError as exc:
                outcome["error"] = exc.code

        first = next(replies)
        reader = threading.Thread(target=read_rest)
        reader.start()
        broker.stop(signal.SIGKILL)
        time.sleep(1.0)
        broker.start()
        reader.join(120)
    assert not reader.is_alive(), "no final reply and no error after the broker restart"
    assert transport.device.connects >= 2
    if "error" in outcome:  # an explicit error is an acceptable answer; silence is not
        assert outcome["error"] in ("cancelled", "timeout", "internal_error")
    else:
        chunks = [first, *outcome["chunks"]]  # type: ignore[list-item]
        assert [c["seq"] for c in chunks] == list(range(len(chunks)))
        assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_request_nobody_subscribes_to_fails_fast_instead_of_timing_out(broker) -> None:
    with MqttChat(broker.url, "nobody-here", timeout=60) as chat:
        request_id = chat.send(HELLO)
        with pytest.raises(RemoteError) as err:
            list(chat.replies(request_id, timeout=10))
    assert err.value.code == "no_subscribers"


def test_clients_turn_nagle_off(broker) -> None:
    # with Nagle on, a request sent right after the PUBACK of a reply waits for a delayed ACK
    client, address = new_client(broker.url, SessionOptions("nodelay-check"))
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    connect_async(client, address, SessionOptions("nodelay-check"))
    client.loop_start()
    try:
        assert connected.wait(10)
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.disconnect()
        client.loop_stop()


def _hold_admission(transport) -> tuple[threading.Event, threading.Event]:  # type: ignore[no-untyped-def]
    """Make every scheduler admission wait for `release` (set `entered` on the way in)."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    transport.scheduler.admission = hold
    return entered, release


def test_slow_admission_leaves_the_network_loop_serving_cancels(broker, serve, probe) -> None:
    transport = serve(broker.url, pool=False)
    entered, release = _hold_admission(transport)
    p = probe(broker.url, "edgerunner/reply/slow")
    try:
        p.publish("edgerunner/dev1/request", json.dumps(HELLO),
                  response_topic="edgerunner/reply/slow", correlation=b"held")
        assert entered.wait(10), "the first request never reached admission"
        p.publish("edgerunner/dev1/request", json.dumps(HELLO),
                  response_topic="edgerunner/reply/slow", correlation=b"waiting")
        p.publish("edgerunner/dev1/cancel", json.dumps({"id": "waiting"}))
        # answered while the first request is still stuck in admission: paho's thread is free
        cancelled = p.next(10)
        assert not release.is_set()
        assert cancelled.properties.CorrelationData == b"waiting"
        assert json.loads(cancelled.payload)["error"]["code"] == "cancelled"
        assert transport.connected
    finally:
        release.set()
    held = p.next(60)
    assert held.properties.CorrelationData == b"held"
    assert json.loads(held.payload)["object"] == "chat.completion"
    assert p.quiet(1.0) == []
    # the cancelled request never reached the scheduler
    assert transport.scheduler.stats.submitted == 1


def test_admission_keeps_order_refuses_overflow_and_cancels_mid_admission(
    broker, serve, probe
) -> None:
    transport = serve(broker.url, pool=False)
    transport.admission_limit = 2
    entered, release = _hold_admission(transport)
    p = probe(broker.url, "edgerunner/reply/order")
    short = {**HELLO, "max_tokens": 2}
    try:
        p.publish("edgerunner/dev1/request", json.dumps(short),
                  response_topic="edgerunner/reply/order", correlation=b"a")
        assert entered.wait(10)
        for name in (b"b", b"c", b"d"):
            p.publish("edgerunner/dev1/request", json.dumps(short),
                      response_topic="edgerunner/reply/order", correlation=name)
        # b and c wait for admission; d finds the admission queue full
        busy = p.next(10)
        assert busy.properties.CorrelationData == b"d"
        assert json.loads(busy.payload)["error"]["code"] == "busy"
        # a is inside Scheduler.submit: the cancel lands on the job it becomes
        p.publish("edgerunner/dev1/cancel", json.dumps({"id": "a"}))
        time.sleep(0.5)  # let the cancel reach the transport before admission resumes
    finally:
        release.set()
    replies = [p.next(60) for _ in range(3)]
    assert [m.properties.CorrelationData for m in replies] == [b"a", b"b", b"c"]
    bodies = [json.loads(m.payload) for m in replies]
    assert bodies[0]["error"]["code"] == "cancelled"
    assert [b["object"] for b in bodies[1:]] == ["chat.completion"] * 2
    assert p.quiet(1.0) == []


def test_requests_waiting_for_admission_are_answered_on_stop(broker, serve, probe) -> None:
    transport = serve(broker.url, pool=False)
    entered, release = _hold_admission(transport)
    p = probe(broker.url, "edgerunner/reply/stop")
    try:
        for name in (b"first", b"second"):
            p.publish("edgerunner/dev1/request", json.dumps(HELLO),
                      response_topic="edgerunner/reply/stop", correlation=name)
        assert entered.wait(10)
        time.sleep(0.5)  # let the second one reach the admission queue
        transport.scheduler.stop_accepting()
        stopping = threading.Thread(target=transport.stop, args=(10.0,))
        stopping.start()
    finally:
        release.set()
    stopping.join(15)
    got = {m.properties.CorrelationData: json.loads(m.payload) for m in (p.next(10), p.next(10))}
    # the first was inside Scheduler.submit (which refuses it now), the second still waiting
    for body in got.values():
        assert body["error"]["code"] == "cancelled"
        assert "shutting down" in body["error"]["message"]
    assert not stopping.is_alive()
    assert transport.scheduler.stats.submitted == 0


def test_device_topic_requests_decode_together(broker, serve, probe) -> None:
    transport = serve(broker.url, stream_interval_s=0)
    scheduler = transport.scheduler
    slots = scheduler.slots
    assert slots > 1, "the rpi5 bundle's plan decodes several requests together"
    p = probe(broker.url, "edgerunner/reply/par/#")
    body = {**COUNT, "max_tokens": 24}
    for i in range(slots):
        p.publish("edgerunner/dev1/request", json.dumps(body),
                  response_topic=f"edgerunner/reply/par/{i}", correlation=str(i).encode())
    most, finals = 0, {}
    while len(finals) < slots:
        msg = p.next()
        most = max(most, scheduler.running)
        chunk = json.loads(msg.payload)
        if chunk["choices"][0]["finish_reason"] is not None:
            finals[msg.topic] = chunk
    assert most == slots  # all of them were in the batch at once
    assert all(c["usage"]["completion_tokens"] == 24 for c in finals.values())
