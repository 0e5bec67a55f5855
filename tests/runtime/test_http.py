"""The real daemon on a unix socket: OpenAI compatibility, streaming, bad input, load."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from typing import Any

import httpx
import openai
import pytest

from edgerunner.host.cpu import host_cpu_features
from edgerunner.pack.isa import repack_isa
from edgerunner.runtime.engine.preflight import serving_features, system_info
from tests.runtime.conftest import RunningDaemon

MSG = [{"role": "user", "content": "Say hello."}]
# a grammar that cannot end early: generation runs until max_tokens or a cancel
LONG = {"type": "json_schema", "json_schema": {"name": "nums", "schema": {
    "type": "array", "items": {"type": "integer"}, "minItems": 1000}}}


def assert_serving(http: httpx.Client) -> None:
    """The daemon still answers a normal request."""
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def error_of(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["type"] and body["error"]["message"]
    message: str = body["error"]["message"]
    return message


def sse_events(lines: list[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_curl_over_the_unix_socket(served: RunningDaemon) -> None:
    body = json.dumps({"messages": MSG, "max_tokens": 8, "temperature": 0})
    out = subprocess.run(
        ["curl", "-s", "--unix-socket", str(served.socket), "-H", "Content-Type: application/json",
         "-d", body, "http://localhost/v1/chat/completions"],
        capture_output=True, text=True, timeout=60, check=True)
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] >= 1
    models = subprocess.run(["curl", "-s", "--unix-socket", str(served.socket),
                             "http://localhost/v1/models"],
                            capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(models.stdout)["data"][0]["id"] == served.daemon.manifest.name


def test_socket_mode_is_0660(served: RunningDaemon) -> None:
    assert served.socket.stat().st_mode & 0o777 == 0o660


def test_openai_client_whole_and_streamed(served: RunningDaemon) -> None:
    transport = httpx.HTTPTransport(uds=str(served.socket))
    with httpx.Client(transport=transport) as http_client:
        client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused",
                               http_client=http_client, max_retries=0)
        model = client.models.list().data[0].id
        for _ in range(2):  # the second run starts from the same cached prompt as the stream
            whole = client.chat.completions.create(
                model=model, messages=MSG, max_tokens=10, temperature=0)  # type: ignore[arg-type]
        assert whole.choices[0].message.content
        assert whole.usage is not None and whole.usage.prompt_tokens > 5
        stream = client.chat.completions.create(
            model=model, messages=MSG, max_tokens=10, temperature=0,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content  # greedy: same answer both ways
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        completion = client.completions.create(model=model, prompt="The sky is",
                                               max_tokens=5, temperature=0)
        assert completion.choices[0].text


def test_sse_stream_shape(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": MSG, "max_tokens": 6, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with http.stream("POST", "/v1/completions",
                     json={"prompt": "Once upon", "max_tokens": 4, "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert {e["object"] for e in events[:-1]} == {"text_completion"}


def test_json_schema_response_parses(http: httpx.Client) -> None:
    schema = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 30},
                             "population": {"type": "integer"}},
              "required": ["city", "population"]}
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Describe a city as JSON."}],
        "max_tokens": 80, "temperature": 0,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "city", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    data = json.loads(r.json()["choices"][0]["message"]["content"])
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


def test_health_and_metrics(http: httpx.Client, served: RunningDaemon) -> None:
    http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
    health = http.get("/health").json()
    assert health["state"] == "ready" and health["model"] == served.daemon.manifest.name
    assert health["plan"]["n_ctx"] == served.daemon.manifest.plan.n_ctx
    assert health["queue"] == {"depth": 0, "max": 8, "running": 0,
                               "slots": served.daemon.manifest.plan.n_parallel}
    assert "temperature_c" in health
    memory = health["memory"]
    # the manifest predicts for the profile's CPU; the daemon for this one (its repack rules)
    prediction = served.daemon.manifest.prediction
    here = repack_isa(serving_features(system_info(), host_cpu_features()))
    weights_here = prediction.weights_mb_by_cpu[here] - prediction.memory.weights_mb
    assert memory["predicted_mb"] == pytest.approx(
        prediction.memory.total_mb + weights_here, rel=1e-3)
    assert memory["rss_mb"] > 0 and memory["guard"] == "ok"
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.text.splitlines()
    completed = next(ln for ln in lines if ln.startswith("edgerunner_requests_completed_total"))
    assert float(completed.split()[1]) >= 1
    assert any(ln.startswith("edgerunner_rss_predicted_bytes ") for ln in lines)
    assert any(ln.startswith("edgerunner_queue_capacity 8") for ln in lines)
    assert f"edgerunner_slots {served.daemon.manifest.plan.n_parallel}" in lines
    assert "edgerunner_slots_in_use 0" in lines


@pytest.mark.parametrize(
    ("content", "code", "needle"),
    [
        (b"{not json", "invalid_request", "not valid JSON"),
        (b"[1,2]", "invalid_request", "JSON object"),
        (json.dumps({"messages": "hello"}).encode(), "invalid_request", "messages"),
        (json.dumps({"messages": MSG, "max_tokens": "ten"}).encode(), "invalid_request",
         "max_tokens"),
        (json.dumps({"messages": MSG, "frobnicate": True}).encode(), "invalid_request",
         "frobnicate: unknown field"),
        (json.dumps({"messages": []}).encode(), "invalid_request", "messages"),
        (json.dumps({"messages": MSG, "max_tokens": 0}).encode(), "invalid_request",
         "max_tokens"),
        (json.dumps({"messages": MSG, "max_tokens": -5}).encode(), "invalid_request",
         "max_tokens"),
        (json.dumps({"messages": MSG, "max_tokens": 10**15}).encode(), "invalid_request",
         "max_tokens"),
        (json.dumps({"messages": MSG, "response_format": {
            "type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}).encode(),
         "invalid_request", "json_schema"),
    ],
)
def test_bad_input_is_refused_and_the_daemon_keeps_serving(
    http: httpx.Client, content: bytes, code: str, needle: str
) -> None:
    r = http.post("/v1/chat/completions", content=content,
                  headers={"Content-Type": "application/json"})
    assert needle in error_of(r, 400, code)
    assert_serving(http)


def test_unknown_model_and_route(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": MSG, "model": "gpt-9"})
    assert "gpt-9" in error_of(r, 404, "model_not_found")
    assert "/v1/chat/completions" in error_of(http.get("/v2/nothing"), 404, "invalid_request")
    assert_serving(http)


def test_huge_prompt_names_both_numbers(http: httpx.Client, served: RunningDaemon) -> None:
    n_ctx = served.daemon.manifest.plan.n_ctx
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "lorem ipsum " * n_ctx}], "max_tokens": 50})
    message = error_of(r, 400, "context_length_exceeded")
    prompt_tokens = int(message.split("prompt is ")[1].split()[0])
    assert prompt_tokens > n_ctx
    assert "max_tokens is 50" in message and f"{n_ctx} tokens" in message
    # a short prompt with a max_tokens beyond the window: also refused, not silently truncated
    r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": n_ctx})
    assert f"max_tokens is {n_ctx}" in error_of(r, 400, "context_length_exceeded")
    big = http.post("/v1/chat/completions", content=b"x" * (2 * 1024 * 1024))
    assert "max_body_bytes" in error_of(big, 400, "invalid_request")
    assert_serving(http)


def test_client_disconnect_mid_stream_cancels_the_job(
    http: httpx.Client, served: RunningDaemon
) -> None:
    stats = served.daemon.scheduler.stats  # type: ignore[union-attr]
    cancelled_before = stats.failed["cancelled"]
    tokens_before = stats.completion_tokens
    with served.client(timeout=60) as other, other.stream(
        "POST", "/v1/chat/completions",
        json={"messages": MSG, "max_tokens": 1500, "stream": True, "response_format": LONG},
    ) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # the connection is closed; the worker notices and stops
    deadline = time.monotonic() + 30
    while stats.failed["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.failed["cancelled"] == cancelled_before + 1
    assert stats.completion_tokens - tokens_before < 1500
    assert_serving(http)


def test_client_disconnect_while_waiting_for_a_whole_answer_cancels_the_job(
    http: httpx.Client, served: RunningDaemon
) -> None:
    scheduler = served.daemon.scheduler
    assert scheduler is not None
    cancelled_before = scheduler.stats.failed["cancelled"]
    tokens_before = scheduler.stats.completion_tokens
    body = json.dumps({"messages": MSG, "max_tokens": 1500, "response_format": LONG}).encode()
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(served.socket))
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edgerunner\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while not scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.busy, "the request never started"
    # the client hung up before any byte of the answer: the worker notices and stops
    deadline = time.monotonic() + 30
    while scheduler.stats.failed["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.stats.failed["cancelled"] == cancelled_before + 1
    assert scheduler.stats.completion_tokens - tokens_before < 1500
    assert_serving(http)


def test_hundred_requests_at_once_with_queue_of_eight(served: RunningDaemon) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"Number {i}?"}], "max_tokens": 4})

    async def burst() -> list[httpx.Response]:
        transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(transport=transport, base_url="http://edgerunner",
                                     timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    responses = asyncio.run(asyncio.wait_for(burst(), timeout=300))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 9  # one running + a full queue of eight
    assert statuses.count(503) >= 1
    for r in responses:
        if r.status_code == 503:
            assert "queue full" in error_of(r, 503, "busy")
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["choices"][0]["message"]["content"] is not None
    with served.client(timeout=60) as http:
        assert_serving(http)
