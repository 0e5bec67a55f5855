"""No RSS growth across many requests: after a warm-up, RSS after N requests stays within a small
bound of RSS after N/2 (a leak of more than ~16 KiB per request would show)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

WARM_UP = 150
HALF = 250
BOUND_MIB = 4.0  # measured here: +1.7 MiB from request 500 to 1000, +2.3 from 1000 to 2000


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def send(http: httpx.Client, i: int) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": f"Say a number {i}"}],
                            "max_tokens": 1}
    if i % 3 == 0:  # a grammar each third request, a stream each fifth, an error each seventh
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
    if i % 5 == 0:
        body["stream"] = True
    if i % 7 == 0:
        body["max_tokens"] = 10**9  # refused: context_length_exceeded
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == (400 if i % 7 == 0 else 200), reply.text


@pytest.mark.slow
def test_rss_does_not_grow_with_requests(spawn: Any) -> None:
    daemon = spawn()
    daemon.wait_ready()
    with daemon.client() as http:
        for i in range(WARM_UP):
            send(http, i)
        half = None
        for i in range(2 * HALF):
            send(http, WARM_UP + i)
            if i == HALF - 1:
                half = rss_mib(daemon.proc.pid)
        full = rss_mib(daemon.proc.pid)
    assert half is not None
    assert full - half < BOUND_MIB, f"RSS {half:.1f} MiB after {HALF} requests, {full:.1f} after "\
                                    f"{2 * HALF}"
