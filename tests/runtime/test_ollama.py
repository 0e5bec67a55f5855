"""The Ollama API, driven by the official `ollama` client (unmodified) over the unix socket and
TCP, against a real daemon serving the real default model."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from edgerunner.bundle.store import Bundle
from edgerunner.runtime.http import ollama_protocol as op
from edgerunner.runtime.protocol import CompletionRequest, RequestError
from tests.runtime.conftest import RunningDaemon, make_config

SCHEMA = {
    "type": "object",
    "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "available": {"type": "boolean"}},
    "required": ["age", "available"],
}
HELLO = [{"role": "user", "content": "Say hello."}]
FAST = {"num_predict": 4, "temperature": 0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def daemon(bundle: Bundle) -> Iterator[RunningDaemon]:
    """A daemon on a unix socket and on a loopback TCP port."""
    tmp = Path(tempfile.mkdtemp(prefix="er-", dir="/tmp"))
    port = _free_port()
    config = make_config(tmp / "o.sock", http=f"127.0.0.1:{port}", rss_ceiling_mb=1_000_000)
    running = RunningDaemon(bundle, config).start()
    running.tcp_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["unix", "tcp"])
def client(request: pytest.FixtureRequest, daemon: RunningDaemon) -> Iterator[ollama.Client]:
    if request.param == "unix":
        made = daemon.ollama_client()
    else:
        made = ollama.Client(host=daemon.tcp_url, timeout=120)  # type: ignore[attr-defined]
    yield made
    made.close()


@pytest.fixture
def uds(daemon: RunningDaemon) -> Iterator[ollama.Client]:
    made = daemon.ollama_client()
    yield made
    made.close()


@pytest.fixture
def raw(daemon: RunningDaemon) -> Iterator[httpx.Client]:
    with daemon.client(timeout=120) as http:
        yield http


def _name(daemon: RunningDaemon) -> str:
    return daemon.daemon.manifest.name


def _assert_final(part: Any) -> None:
    assert part.done is True
    assert part.done_reason in ("stop", "length")
    assert part.eval_count is not None and part.eval_count >= 1
    assert part.prompt_eval_count is not None and part.prompt_eval_count >= 1
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(part, field), int) and getattr(part, field) > 0, field
    assert isinstance(part.load_duration, int) and part.load_duration >= 0
    # the parts add up: evaluation happens inside the request's total time
    assert part.prompt_eval_duration + part.eval_duration <= part.total_duration


def test_list_show_ps_version(client: ollama.Client, daemon: RunningDaemon) -> None:
    name = _name(daemon)
    listed = client.list()
    assert [m.model for m in listed.models] == [f"{name}:latest"]
    model = listed.models[0]
    assert model.size and model.size > 0
    assert model.details is not None and model.details.format == "gguf"
    assert model.details.family == "llama"
    assert model.details.quantization_level == daemon.daemon.manifest.plan.quant
    shown = client.show(name)
    assert shown.modelinfo is not None
    assert shown.modelinfo["edgerunner.n_ctx"] == daemon.daemon.engine.n_ctx  # type: ignore[union-attr]
    assert shown.capabilities == ["completion", "tools"]
    assert client.show(f"{name}:latest").details == shown.details
    running = client.ps()
    assert [m.model for m in running.models] == [f"{name}:latest"]
    assert running.models[0].context_length == daemon.daemon.engine.n_ctx  # type: ignore[union-attr]
    version = client._client.get("/api/version").json()
    assert version["version"] and version["edgerunner"]


def test_chat_not_streamed(client: ollama.Client, daemon: RunningDaemon) -> None:
    reply = client.chat(model=_name(daemon), messages=HELLO, options=FAST, stream=False)
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.model == _name(daemon)
    _assert_final(reply)
    assert reply.eval_count is not None and reply.eval_count <= 4


def test_chat_streamed(client: ollama.Client, daemon: RunningDaemon) -> None:
    parts = list(client.chat(model=f"{_name(daemon)}:latest", messages=HELLO, options=FAST,
                             stream=True))
    assert len(parts) >= 2
    assert all(not p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts[:-1])
    assert parts[-1].message.content == ""
    _assert_final(parts[-1])


def test_generate(client: ollama.Client, daemon: RunningDaemon) -> None:
    reply = client.generate(model=_name(daemon), prompt="The sky is", options=FAST)
    assert reply.response
    _assert_final(reply)
    parts = list(client.generate(model=_name(daemon), prompt="Count: 1, 2,", raw=True,
                                 options=FAST, stream=True))
    assert "".join(p.response or "" for p in parts[:-1])
    _assert_final(parts[-1])


def test_format_schema_returns_json_that_parses(client: ollama.Client,
                                                daemon: RunningDaemon) -> None:
    reply = client.chat(
        model=_name(daemon), format=SCHEMA, options={"num_predict": 48, "temperature": 0},
        messages=[{"role": "user", "content": "Ollama is 22 years old and busy. Respond in JSON."}])
    data = json.loads(reply.message.content or "")
    assert set(data) == {"age", "available"}
    assert isinstance(data["age"], int) and isinstance(data["available"], bool)
    prompt = 'What color is the sky? Answer as JSON, e.g. {"color": "red"}.'
    generated = client.generate(model=_name(daemon), prompt=prompt, format="json",
                                options={"num_predict": 48, "temperature": 0})
    assert generated.done_reason == "stop", generated.response  # closed within the budget
    assert isinstance(json.loads(generated.response or ""), dict)


def test_sampling_options_are_honoured(uds: ollama.Client, daemon: RunningDaemon) -> None:
    options = {"num_predict": 6, "temperature": 0.9, "top_p": 0.8, "top_k": 20, "seed": 7,
               "repeat_penalty": 1.1, "num_ctx": daemon.daemon.engine.n_ctx, "num_thread": 2}
    # raw: a prompt too short for the shared-prefix cache, so both evaluate it whole. (Through
    # the cache the second would evaluate only its tail, in a batch of another shape, and
    # llama.cpp's kernels round that differently: a seeded sample can then differ.)
    first = uds.generate(model=_name(daemon), prompt="Once upon a time", raw=True,
                         options=options)
    again = uds.generate(model=_name(daemon), prompt="Once upon a time", raw=True,
                         options=options)
    assert first.response == again.response  # same seed, same text
    assert first.eval_count is not None and first.eval_count <= 6
    stopped = uds.generate(model=_name(daemon), prompt="1, 2, 3, 4,", raw=True,
                           options={"num_predict": 16, "temperature": 0, "stop": [","]})
    assert "," not in (stopped.response or "")


def _refused(call: Any, status: int, *words: str) -> str:
    with pytest.raises(ollama.ResponseError) as info:
        call()
    assert info.value.status_code == status, info.value.error
    for word in words:
        assert word in info.value.error, info.value.error
    return info.value.error


def test_errors_are_ollama_shaped(uds: ollama.Client, daemon: RunningDaemon) -> None:
    name, n_ctx = _name(daemon), daemon.daemon.engine.n_ctx
    _refused(lambda: uds.chat(model="llama3.2", messages=HELLO), 404, "llama3.2", name)
    _refused(lambda: uds.show("llama3.2"), 404, "not found")
    too_big = {"num_ctx": n_ctx * 4}
    _refused(lambda: uds.chat(model=name, messages=HELLO, options=too_big), 400,
             str(n_ctx * 4), str(n_ctx))
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    _refused(lambda: uds.chat(model=name, messages=HELLO, tools=[tool], format="json"), 400,
             "tools and response_format cannot be combined")
    image = [{"role": "user", "content": "what is this?", "images": [b"\x89PNG"]}]
    _refused(lambda: uds.chat(model=name, messages=image), 400, "images", "not supported")
    _refused(lambda: uds.generate(model=name, prompt="x", suffix="y"), 400, "suffix")
    _refused(lambda: uds.chat(model=name, messages=HELLO, think=True), 400, "think")
    _refused(lambda: uds.chat(model=name, messages=HELLO, options={"mirostat": 2}), 400,
             "mirostat")
    _refused(lambda: uds.chat(model=name, messages=HELLO, options={"num_predikt": 2}), 400,
             "num_predikt")
    _refused(lambda: uds.pull(name), 501, "pulled")
    _refused(lambda: uds.delete(name), 501, "deleted")
    _refused(lambda: uds.embed(model=name, input="x"), 501, "embeddings")
    # a prompt plus num_predict beyond the window: the scheduler's own admission check
    long = [{"role": "user", "content": "word " * 50}]
    _refused(lambda: uds.chat(model=name, messages=long, options={"num_predict": n_ctx}), 400,
             "context window")


def test_generate_with_system_and_root(raw: httpx.Client, daemon: RunningDaemon) -> None:
    r = raw.post("/api/generate", json={"model": _name(daemon), "prompt": "Hi", "stream": False,
                                        "system": "Answer in French.", "options": FAST})
    assert r.status_code == 200 and r.json()["response"]
    assert raw.get("/").status_code == 200


def test_a_client_leaving_the_stream_cancels_its_job(raw: httpx.Client,
                                                     daemon: RunningDaemon) -> None:
    stats = daemon.daemon.scheduler.stats  # type: ignore[union-attr]
    before = stats.failed["cancelled"]
    body = {"model": _name(daemon), "prompt": "Write a long story.",
            "options": {"num_predict": 400}}
    with raw.stream("POST", "/api/generate", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        first = json.loads(next(r.iter_lines()))
        assert first["done"] is False
    for _ in range(200):
        if stats.failed["cancelled"] > before:
            break
        time.sleep(0.05)
    assert stats.failed["cancelled"] == before + 1


def test_raw_errors(raw: httpx.Client, daemon: RunningDaemon) -> None:
    bad = raw.post("/api/chat", content=b"{not json")
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    assert raw.get("/api/chat").status_code == 405
    missing = raw.get("/api/nothing-here")
    assert missing.status_code == 404 and "/api/tags" in missing.json()["error"]
    no_model = raw.post("/api/chat", json={"messages": HELLO})
    assert no_model.status_code == 400 and "model" in no_model.json()["error"]
    name = _name(daemon)
    for body in (b"[]", b'{"model": "' + name.encode() + b'", "messages": ' + b"[" * 100
                 + b"]" * 100 + b"}", b'{"model": "\\ud800"}',
                 b'{"model": "' + name.encode() + b'", "format": "yaml"}'):
        r = raw.post("/api/chat", content=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), body[:60]
    huge = raw.post("/api/generate", content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}')
    assert huge.status_code == 400 and "max_body_bytes" in huge.json()["error"]


def test_load_and_keep_alive(uds: ollama.Client, raw: httpx.Client,
                             daemon: RunningDaemon) -> None:
    name = _name(daemon)
    loaded = raw.post("/api/chat", json={"model": name, "messages": []}).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load"
    assert raw.post("/api/generate", json={"model": name}).json()["done_reason"] == "load"
    # keep_alive values are accepted (the daemon's keep_alive_s decides); 0 cannot unload
    for keep in ("5m", -1, "1h30m", 300):
        reply = uds.chat(model=name, messages=HELLO, options=FAST, keep_alive=keep)
        assert reply.done
    error = _refused(lambda: uds.chat(model=name, messages=[], keep_alive=0), 400, "keep_alive")
    assert "unload" in error
    bad = raw.post("/api/chat", json={"model": name, "messages": HELLO, "keep_alive": "soon"})
    assert bad.status_code == 400 and "duration" in bad.json()["error"]


def test_200_concurrent_clients_each_answered_or_refused(daemon: RunningDaemon) -> None:
    async def run() -> list[httpx.Response]:
        transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(transport=transport, base_url="http://edgerunner",
                                     timeout=120, limits=limits) as http:
            body = {"model": _name(daemon), "messages": HELLO, "stream": False,
                    "options": {"num_predict": 1}}
            return await asyncio.gather(*(http.post("/api/chat", json=body)
                                          for _ in range(200)))

    replies = asyncio.run(run())
    answered = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 503]
    assert len(answered) + len(refused) == 200, {r.status_code for r in replies}
    assert answered, "nobody was answered"
    for reply in answered:
        assert reply.json()["done"] is True
    for reply in refused:
        assert "queue full" in reply.json()["error"]
        assert int(reply.headers["Retry-After"]) >= 1
    print(f"200 concurrent /api/chat: {len(answered)} answered, {len(refused)} refused busy")
    # still serving afterwards
    with daemon.client(timeout=60) as http:
        after = http.post("/api/chat", json={"model": _name(daemon), "messages": HELLO,
                                             "stream": False, "options": FAST})
        assert after.status_code == 200


@pytest.mark.parametrize(("keep", "unload"), [(0, True), ("0", True), ("0s", True),
                                               ("0m", True), (-1, False), ("-1s", False),
                                               ("5m", False), ("1h30m", False), (None, False)])
def test_keep_alive_unload_is_recognised(keep: Any, unload: bool) -> None:
    body = op.ChatRequest.model_validate({"model": "m", "keep_alive": keep})
    assert op.wants_unload(body) is unload


def test_translation_to_the_openai_request() -> None:
    body = op.ChatRequest.model_validate({
        "model": "m", "messages": HELLO, "format": SCHEMA, "options": {
            "num_predict": -1, "temperature": 0.2, "top_k": 5, "seed": -1, "stop": ["\n"],
            "num_gpu": 99}})
    request = op.chat_request(body, n_ctx=2048)
    assert request.max_tokens is None  # -1: up to the context, capped by default_max_tokens
    assert (request.temperature, request.top_k, request.seed) == (0.2, 5, None)
    assert request.stop == ["\n"]
    assert request.response_format is not None
    assert request.response_format.json_schema is not None
    assert request.response_format.json_schema.schema_ == SCHEMA
    raw = op.generate_request(op.GenerateRequest.model_validate(
        {"model": "m", "prompt": "x", "raw": True, "format": "json"}), n_ctx=2048)
    assert isinstance(raw, CompletionRequest) and raw.prompt == "x"
    assert raw.response_format is not None and raw.response_format.type == "json_object"
    with pytest.raises(RequestError, match="unknown field"):
        op.parse(op.ChatRequest, {"model": "m", "mesages": HELLO})
