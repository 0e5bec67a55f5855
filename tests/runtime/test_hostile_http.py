"""Hostile HTTP clients against the real daemon: bombs in the body, floods of connections,
cross-origin browsers, missing keys. Every one gets a 4xx/503 that says why, never a 500."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgerunner.bundle.settings import ServeConfig
from edgerunner.bundle.unit import render_unit
from edgerunner.client.http import Client
from edgerunner.errors import ClientError
from edgerunner.runtime.http.access import FD_BASELINE, FD_RESERVE
from edgerunner.runtime.http.openai import create_app
from edgerunner.runtime.http.server import HttpTransport, transport_from_config
from edgerunner.runtime.protocol import MAX_JSON_DEPTH
from edgerunner.runtime.supervise.logfmt import LogfmtFormatter, RepeatFilter
from tests.mqtt.conftest import free_port
from tests.runtime.conftest import RunningDaemon
from tests.runtime.test_http import MSG, assert_serving, error_of

CHAT = "/v1/chat/completions"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["body", "schema", "completion"])
def test_deep_nesting_is_a_400_naming_the_limit(http: httpx.Client, where: str) -> None:
    if where == "body":
        path, content = CHAT, ('{"messages": [{"role": "user", "content": "hi"}], "x": '
                               + nested(1000) + "}")
    elif where == "schema":
        schema = '{"type": "array", "items": ' * 900 + '{"type": "integer"}' + "}" * 900
        path, content = CHAT, (
            '{"messages": [{"role": "user", "content": "hi"}], "response_format": '
            '{"type": "json_schema", "json_schema": {"name": "deep", "schema": '
            + schema + "}}}")
    else:
        path, content = "/v1/completions", '{"prompt": "hi", "stop": ' + nested(5000) + "}"
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    message = error_of(r, 400, "invalid_request")
    assert f"deeper than {MAX_JSON_DEPTH} levels" in message and "nesting limit" in message
    assert_serving(http)


def test_nesting_up_to_the_limit_is_parsed(http: httpx.Client) -> None:
    # a schema this deep is legal JSON for the body: it reaches validation (and is refused
    # there for what it is, an unknown field), not the nesting check
    content = '{"messages": [{"role": "user", "content": "hi"}], "x": ' + nested(
        MAX_JSON_DEPTH - 1) + "}"
    r = http.post(CHAT, content=content)
    assert "x: unknown field" in error_of(r, 400, "invalid_request")


@pytest.mark.parametrize("path,body", [
    (CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\uDBFF"]}'),
    ("/v1/completions", '{"prompt": "x\\ud83d"}'),
])
def test_lone_surrogate_is_a_400(http: httpx.Client, path: str, body: str) -> None:
    r = http.post(path, content=body)
    assert "lone UTF-16 surrogate" in error_of(r, 400, "invalid_request")


def test_surrogate_pair_is_an_ordinary_character(http: httpx.Client) -> None:
    body = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00 hi"}], "max_tokens": 2}'
    assert http.post(CHAT, content=body).status_code == 200


def test_chunked_body_is_bounded_as_it_arrives(served: RunningDaemon, http: httpx.Client) -> None:
    limit = served.daemon.config.max_body_bytes
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(4 * limit // 65536):
            sent += 65536
            yield b" " * 65536

    r = http.post(CHAT, content=chunks())  # no Content-Length: Transfer-Encoding: chunked
    assert f"exceeds {limit} bytes" in error_of(r, 400, "invalid_request")
    assert r.headers["connection"] == "close"
    assert_serving(http)


def raw_exchange(sock_path: Path, data: bytes) -> bytes:
    """Send `data` on one connection and read until the server closes it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(sock_path))
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def request(path: str, body: bytes | None = None, *, close: bool = False) -> bytes:
    head = f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\nHost: edgerunner\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def test_pipelined_request_after_a_400_is_answered(served: RunningDaemon) -> None:
    good = json.dumps({"messages": MSG, "max_tokens": 2}).encode()
    out = raw_exchange(served.socket, request(CHAT, b'{"messages": [') + request(
        CHAT, good, close=True))
    assert out.count(b"HTTP/1.1 ") == 2
    first, second = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"400") and second.startswith(b"200")
    assert b"chat.completion" in second


@contextmanager
def serving(transport: HttpTransport) -> Iterator[HttpTransport]:
    """Run a second HttpTransport (same scheduler as the daemon) on its own loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(transport.start(), loop).result(30)
        yield transport
    finally:
        asyncio.run_coroutine_threadsafe(transport.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_unhandled_error_is_a_500_that_says_connection_close(
    served: RunningDaemon, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = served.daemon
    assert daemon.scheduler is not None

    def broken_metrics() -> str:
        raise RuntimeError(" ".join(["secret", "request", "text"]))  # the log shows source

    app = create_app(daemon.scheduler, daemon.health, broken_metrics)
    with serving(HttpTransport(app, short_tmp / "crash.sock")) as transport:
        out = raw_exchange(transport.socket_path, request("/metrics") + request("/health"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "internal_error"
    assert out.count(b"HTTP/1.1 ") == 1  # closed, as announced: /health was not read
    assert "unhandled RuntimeError on /metrics" in caplog.text
    assert "secret request text" not in caplog.text


def test_connections_over_the_cap_are_refused_and_idle_ones_time_out(
    served: RunningDaemon, short_tmp: Path
) -> None:
    daemon = served.daemon
    assert daemon.scheduler is not None
    app = create_app(daemon.scheduler, daemon.health, daemon.metrics)
    transport = HttpTransport(app, short_tmp / "cap.sock", max_connections=4,
                              idle_timeout_s=1.0)
    with serving(transport):
        idle = []
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(transport.socket_path))
            idle.append(sock)
        try:
            idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            refused = raw_exchange(transport.socket_path, request("/health"))
            assert refused.startswith(b"HTTP/1.1 503")
            assert b"connection: close" in refused.lower()
            assert b"too many open connections" in refused and b'"busy"' in refused
            for sock in idle:  # the server closes every idle connection
                sock.settimeout(30)
                assert sock.recv(100) == b""
        finally:
            for sock in idle:
                sock.close()
        # capacity is back
        ok = raw_exchange(transport.socket_path, request("/health", close=True))
        assert ok.startswith(b"HTTP/1.1 200")


@pytest.fixture
def tcp_api(served: RunningDaemon, short_tmp: Path) -> Iterator[dict[str, Any]]:
    """The daemon's scheduler behind transport_from_config with TCP and an API key file."""
    daemon = served.daemon
    assert daemon.scheduler is not None
    key_file = short_tmp / "key"
    key_file.write_text("k3y-canary\n")
    port = free_port()
    config = ServeConfig.model_validate({
        "socket": short_tmp / "tcp.sock", "http": f"127.0.0.1:{port}",
        "api_key_file": key_file, "http_allowed_origins": ["https://app.example"]})
    with serving(transport_from_config(config, daemon.scheduler, daemon.health, daemon.metrics)):
        yield {"base": f"http://127.0.0.1:{port}", "socket": short_tmp / "tcp.sock"}


def test_api_key_is_required_over_tcp(tcp_api: dict[str, Any]) -> None:
    body = {"messages": MSG, "max_tokens": 2}
    with httpx.Client(base_url=tcp_api["base"], timeout=60) as tcp:
        assert "Authorization: Bearer" in error_of(tcp.post(CHAT, json=body), 401, "unauthorized")
        wrong = tcp.post(CHAT, json=body, headers={"Authorization": "Bearer nope"})
        error_of(wrong, 401, "unauthorized")
        error_of(tcp.get("/metrics"), 401, "unauthorized")
        assert tcp.get("/health").status_code == 200  # liveness needs no key
        ok = tcp.post(CHAT, json=body, headers={"Authorization": "Bearer k3y-canary"})
        assert ok.status_code == 200, ok.text
    with Client(base_url=tcp_api["base"], api_key="k3y-canary") as client:
        assert client.chat(MSG, max_tokens=2)["object"] == "chat.completion"
    with Client(base_url=tcp_api["base"], api_key="") as client, \
            pytest.raises(ClientError, match="unauthorized"):
        client.models()
    # the unix socket's file mode is its authentication
    uds = httpx.Client(transport=httpx.HTTPTransport(uds=str(tcp_api["socket"])),
                       base_url="http://edgerunner", timeout=60)
    with uds:
        assert uds.post(CHAT, json=body).status_code == 200


def test_foreign_host_and_cross_origin_posts_are_refused(tcp_api: dict[str, Any]) -> None:
    auth = {"Authorization": "Bearer k3y-canary"}
    body = json.dumps({"messages": MSG, "max_tokens": 2})
    with httpx.Client(base_url=tcp_api["base"], timeout=60) as tcp:
        # DNS rebinding: the attacker's name resolving to this address
        rebound = tcp.post(CHAT, content=body, headers={**auth, "Host": "evil.example:8080"})
        assert "evil.example" in error_of(rebound, 403, "forbidden")
        # CSRF: a page elsewhere posting text/plain (no CORS preflight)
        csrf = tcp.post(CHAT, content=body, headers={
            **auth, "Origin": "http://evil.example", "Content-Type": "text/plain"})
        assert "another origin" in error_of(csrf, 403, "forbidden")
        error_of(tcp.post(CHAT, content=body, headers={**auth, "Origin": "null"}),
                 403, "forbidden")
        for headers in ({"Host": "localhost:1"}, {"Origin": "https://app.example"},
                        {"Origin": tcp_api["base"]}):
            r = tcp.post(CHAT, content=body, headers={**auth, **headers})
            assert r.status_code == 200, (headers, r.text)


def test_a_non_loopback_bind_is_warned_about(
    served: RunningDaemon, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = served.daemon
    assert daemon.scheduler is not None
    caplog.set_level(logging.WARNING, logger="edgerunner.runtime.http.openai")
    config = ServeConfig.model_validate({"socket": short_tmp / "lan.sock",
                                         "http": f"0.0.0.0:{free_port()}"})
    with serving(transport_from_config(config, daemon.scheduler, daemon.health, daemon.metrics)):
        pass
    warned = [r.getMessage() for r in caplog.records if "other machines can reach" in
              r.getMessage()]
    assert len(warned) == 1 and "anyone on the network" in warned[0]


def test_repeated_warnings_are_rate_limited_with_a_count() -> None:
    now = [0.0]
    repeats = RepeatFilter(window=10.0, burst=2, clock=lambda: now[0])
    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("tests.repeats")
    handler = Keep()
    handler.addFilter(repeats)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        for i in range(1000):
            log.error("socket.accept() out of system resource: fd %d", i)
            log.info("queued %d", i)  # INFO lines are never held back
        now[0] = 11.0
        log.error("socket.accept() out of system resource: fd %d", 1000)
    finally:
        log.removeHandler(handler)
    errors = [r for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert getattr(errors[-1], "suppressed", None) == 998
    assert sum(r.levelno == logging.INFO for r in records) == 1000
    line = LogfmtFormatter("%(message)s").format(errors[-1])
    assert line.endswith("suppressed=998")


def test_the_unit_raises_the_file_limit_above_the_connection_cap(bundle_manifest) -> None:
    unit = render_unit(bundle_manifest)
    (limit,) = [int(line.split("=", 1)[1]) for line in unit.splitlines()
                if line.startswith("LimitNOFILE=")]
    assert limit >= ServeConfig.model_validate({}).max_connections + FD_RESERVE


def test_a_flood_of_connections_never_reaches_the_file_limit(bundle, short_tmp: Path) -> None:
    limit = 256  # soft = hard: the daemon cannot raise it; its cap becomes 256 - FD_RESERVE

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    sock_path, log = short_tmp / "flood.sock", short_tmp / "flood.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(bundle.dir), "--no-verify",
             "--socket", str(sock_path), "--threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_file_limit)
    flood: list[socket.socket] = []
    try:
        with Client(sock_path) as client:
            client.wait_ready(120, process=proc)
        baseline = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert baseline < FD_BASELINE, "the reserve does not cover the daemon's own files"
        while len(flood) < limit + 100:
            conn = socket.socket(socket.AF_UNIX)
            try:
                conn.connect(str(sock_path))
            except BlockingIOError:  # the listen queue is full until the daemon accepts
                conn.close()
                time.sleep(0.01)
                continue
            conn.settimeout(30)
            flood.append(conn)
        refused = 0
        for conn in flood[limit - FD_RESERVE:]:  # over the cap: a 503 at once, then closed
            answer = conn.recv(4096)
            refused += answer.startswith(b"HTTP/1.1 503")
        assert refused == 100 + FD_RESERVE
        for conn in flood:
            conn.close()
        flood.clear()
        with Client(sock_path) as client:  # the daemon never ran out of descriptors
            assert client.health()["state"] == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        for conn in flood:
            conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "Too many open files" not in text and "out of system resource" not in text
    cap = limit - FD_RESERVE
    warnings = [ln for ln in text.splitlines() if f"over the cap of {cap} open" in ln]
    assert 1 <= len(warnings) < 20  # one line per 10 s, each with its count
