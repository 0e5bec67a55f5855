"""`edgerunner ask` and the Python client against the real daemon."""

from __future__ import annotations

import gc
import json
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgerunner.cli import main
from edgerunner.client.http import Client
from edgerunner.errors import ClientError
from tests.runtime.conftest import RunningDaemon


def test_client_chat_stream_and_health(served: RunningDaemon) -> None:
    with Client(served.socket) as client:
        assert client.health()["state"] == "ready"
        assert client.models() == [served.daemon.manifest.name]
        messages = [{"role": "user", "content": "Name a colour."}]
        # warm the prompt cache first: a cached prompt re-evaluates only its last token, in a
        # batch of one, which can flip a near-tie in greedy decoding against a cold batch eval
        client.chat(messages, max_tokens=6, temperature=0)
        whole = client.chat(messages, max_tokens=6, temperature=0)
        streamed = "".join(client.stream_chat(messages, max_tokens=6, temperature=0))
        assert streamed == whole["choices"][0]["message"]["content"]
        assert client.last_usage is not None and client.last_usage["completion_tokens"] >= 1
        with pytest.raises(ClientError, match="context_length_exceeded"):
            client.chat(messages, max_tokens=10**6)


def test_client_names_an_unreachable_socket(short_tmp: Path) -> None:
    with Client(short_tmp / "nobody.sock") as client, pytest.raises(ClientError) as info:
        client.chat([{"role": "user", "content": "x"}])
    assert "nobody.sock" in str(info.value) and "edgerunner serve" in str(info.value)


def test_client_closes_its_socket_when_the_daemon_is_gone(short_tmp: Path) -> None:
    # a socket file left by a daemon that died: the connect is refused; the failed connect's
    # socket must be closed (an unclosed one is a ResourceWarning, an error under this suite)
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(stale))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        for _ in range(3):
            with Client(stale) as client, pytest.raises(ClientError) as info:
                client.chat([{"role": "user", "content": "x"}])
            assert "Connection refused" in str(info.value) and "stale.sock" in str(info.value)
        unraisable: list[Any] = []
        hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
        try:
            gc.collect()
        finally:
            sys.unraisablehook = hook
    assert [u.exc_value for u in unraisable] == []


def test_ask_streams_the_answer(served: RunningDaemon) -> None:
    result = CliRunner().invoke(main, ["ask", "Say hello.", "--socket", str(served.socket),
                                       "--max-tokens", "5", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_ask_json_with_schema(served: RunningDaemon, tmp_path: Path) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                  "required": ["ok"]}))
    result = CliRunner().invoke(main, ["ask", "Is water wet?", "--socket", str(served.socket),
                                       "--json-schema", str(schema), "--max-tokens", "20",
                                       "--system", "Answer in JSON.", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"])["ok"], bool)


def test_ask_without_a_daemon_fails_with_a_hint(short_tmp: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "hi", "--socket", str(short_tmp / "none.sock")])
    assert result.exit_code == 1
    assert "cannot reach the daemon" in result.output and "hint" in result.output


def test_wait_ready_returns_the_health_of_a_ready_daemon(served: RunningDaemon) -> None:
    with Client(served.socket) as client:
        assert client.wait_ready(timeout=60)["state"] == "ready"


def test_wait_ready_names_a_daemon_that_exited_first(short_tmp: Path) -> None:
    import subprocess

    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    exited.wait()
    with Client(short_tmp / "never.sock") as client, pytest.raises(ClientError) as err:
        client.wait_ready(timeout=60, process=exited)
    assert "exited with code 3 before it was ready" in str(err.value)


def test_wait_ready_gives_up_after_its_timeout(short_tmp: Path) -> None:
    with Client(short_tmp / "never.sock") as client, pytest.raises(ClientError) as err:
        client.wait_ready(timeout=0.2, poll_s=0.05)
    assert "was not ready within 0.2 s" in str(err.value)
