"""MQTT pieces that need no broker: URLs, topic safety, duplicate ids, batching and splitting."""

from __future__ import annotations

import json

import pytest

from edgerunner.errors import ConfigError
from edgerunner.runtime.mqtt.reply import Replier, ReplyBacklogFull, ReplyRoute, ReplyStream
from edgerunner.runtime.mqtt.request import read_request
from edgerunner.runtime.mqtt.topics import (
    SeenIds,
    check_device_id,
    parse_broker_url,
    reply_topic_problem,
)
from edgerunner.runtime.protocol import DoneEvent, ErrorEvent, RequestError, TextEvent, Usage

ALLOWED = ["edgerunner/reply/"]


def test_broker_urls() -> None:
    tcp = parse_broker_url("mqtt://user:p%40ss@broker.lan:1884")
    assert (tcp.transport, tcp.host, tcp.port, tcp.tls) == ("tcp", "broker.lan", 1884, False)
    assert (tcp.username, tcp.password) == ("user", "p@ss")
    assert parse_broker_url("mqtts://broker").port == 8883
    assert parse_broker_url("mqtts://broker").tls
    unix = parse_broker_url("unix:///run/mosquitto/mqtt.sock")
    assert (unix.transport, unix.host) == ("unix", "/run/mosquitto/mqtt.sock")
    with pytest.raises(ConfigError, match="unknown scheme"):
        parse_broker_url("http://broker:1883")
    with pytest.raises(ConfigError, match="no host"):
        parse_broker_url("mqtt://:1883")


def test_device_ids_must_be_single_topic_levels() -> None:
    assert check_device_id("kitchen-pi_2") == "kitchen-pi_2"
    for bad in ("a/b", "+", "#", "", "pool", "x" * 65):
        with pytest.raises(ConfigError):
            check_device_id(bad)


@pytest.mark.parametrize("topic", [
    "edgerunner/dev1/request", "edgerunner/other/cancel", "edgerunner/x/status",
    "edgerunner/x/info", "edgerunner/pool/request", "edgerunner/reply/+", "edgerunner/reply/#",
    "$SYS/x", "$share/g/edgerunner/reply/a", "elsewhere/reply", "", "edgerunner/reply/\x00",
])
def test_reply_topics_that_are_refused(topic: str) -> None:
    assert reply_topic_problem(topic, ALLOWED) is not None


def test_reply_topics_that_are_allowed() -> None:
    assert reply_topic_problem("edgerunner/reply/app/42", ALLOWED) is None
    assert reply_topic_problem("acme/replies/1", ["acme/replies/"]) is None


def test_seen_ids_is_a_bounded_lru() -> None:
    seen = SeenIds(capacity=2)
    assert seen.first_time("a") and seen.first_time("b")
    assert not seen.first_time("a")
    assert seen.first_time("c")  # evicts b, the least recently seen
    assert seen.first_time("b")


def test_311_envelope_fields_are_stripped_before_validation() -> None:
    payload = json.dumps({"reply_to": "edgerunner/reply/a", "id": 5,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
    got = read_request(payload, None, v5=False, max_payload_bytes=4096, allowed_prefixes=ALLOWED)
    assert got.route is not None and got.route.request_id == "5"
    assert got.request is not None and got.error is None


def test_oversized_311_request_is_refused_on_its_reply_to() -> None:
    payload = json.dumps({"reply_to": "edgerunner/reply/a",
                          "messages": [{"role": "user", "content": "x" * 3000}]}).encode()
    got = read_request(payload, None, v5=False, max_payload_bytes=1024, allowed_prefixes=ALLOWED)
    assert got.route is not None and got.route.topic == "edgerunner/reply/a"
    assert got.error is not None and "1024" in got.error.message


class Recorder:
    """A Publisher that keeps what it was given; can simulate a full backlog."""

    def __init__(self, full: bool = False) -> None:
        self.sent: list[tuple[bytes, bool]] = []
        self.full = full

    def __call__(self, topic: str, payload: bytes, properties: object, *, final: bool) -> None:
        if self.full and not final:
            raise ReplyBacklogFull("full")
        self.sent.append((payload, final))

    def objects(self) -> list[dict]:
        return [json.loads(p) for p, _ in self.sent]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stream(recorder: Recorder, clock: Clock, max_packet: int = 1 << 20) -> ReplyStream:
    replier = Replier(recorder, lambda: max_packet, 1 << 20)
    route = ReplyRoute("edgerunner/reply/t", v5=True, correlation=b"c")
    return ReplyStream(replier, route, model="m", stream=True, interval=0.05, clock=clock)


def test_tokens_are_batched_to_the_interval_and_the_first_goes_at_once() -> None:
    rec, clock = Recorder(), Clock()
    sink = stream(rec, clock)
    sink(TextEvent("a"))  # first text: sent immediately
    for piece in "bcdef":
        clock.now += 0.009  # five tokens within 50 ms: held back
        sink(TextEvent(piece))
    clock.now += 0.01
    sink(TextEvent("g"))  # 60 ms after the last send: one batched chunk
    sink(DoneEvent("abcdefg", "stop", Usage(prompt_tokens=3, completion_tokens=7,
                                            total_tokens=10)))
    chunks = rec.objects()
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["a", "bcdefg", None]
    assert [c["seq"] for c in chunks] == [0, 1, 2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 7


def test_text_is_split_so_every_chunk_fits_the_packet_limit() -> None:
    rec, clock = Recorder(), Clock()
    sink = stream(rec, clock, max_packet=400)
    text = "é\"\n" * 300  # escapes and multi-byte characters
    sink(TextEvent(text))
    sink(DoneEvent(text, "length", Usage()))
    chunks = rec.objects()
    assert len(chunks) > 3
    assert all(len(p) <= 400 - 64 - len("edgerunner/reply/t") - 1 for p, _ in rec.sent)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_backlog_full_stops_the_stream_and_answers_with_an_error() -> None:
    rec, clock = Recorder(full=True), Clock()
    sink = stream(rec, clock)
    with pytest.raises(ReplyBacklogFull):
        sink(TextEvent("a"))  # the scheduler cancels a job whose sink raises
    sink(ErrorEvent(RequestError("cancelled", "request was cancelled")))
    (error,) = rec.objects()
    assert error["error"]["code"] == "cancelled"
    assert "broker was unreachable" in error["error"]["message"]
