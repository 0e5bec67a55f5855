"""The daemon over its unix socket with several clients at once: they decode together."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.runtime.conftest import RunningDaemon

# a prompt the small model answers at length: it runs to max_tokens
LONG = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


def _stream(client: httpx.Client, max_tokens: int, out: list[dict[str, object]],
            stop_after: int | None = None) -> None:
    body = {"messages": LONG, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks: list[dict[str, object]] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                if stop_after is not None and len(chunks) >= stop_after:
                    break  # the client goes away mid-stream
    out.extend(chunks)


def test_streaming_clients_decode_together_and_a_disconnect_frees_its_slot(
    served: RunningDaemon,
) -> None:
    slots = served.daemon.manifest.plan.n_parallel
    assert slots >= 2, "the rpi5 bundle's plan decodes several requests together"
    results: list[list[dict[str, object]]] = [[] for _ in range(slots)]
    clients = [served.client() for _ in range(slots)]
    threads = [threading.Thread(target=_stream, args=(c, 48, results[i]),
                                kwargs={"stop_after": 3 if i == 0 else None})
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    most = 0
    with served.client() as probe:
        while any(t.is_alive() for t in threads):
            most = max(most, probe.get("/health").json()["queue"]["running"])
            time.sleep(0.01)
        for t in threads:
            t.join()
        # the one that left freed its slot: nothing runs once the others are done
        deadline = time.monotonic() + 10
        while probe.get("/health").json()["queue"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = probe.get("/health").json()
        metrics = probe.get("/metrics").text.splitlines()
    for c in clients:
        c.close()
    assert most >= 2  # they were in the batch together
    assert health["queue"]["running"] == 0 and health["queue"]["slots"] == slots
    assert f"edgerunner_slots {slots}" in metrics
    for chunks in results[1:]:
        usage = chunks[-1]["usage"]
        assert isinstance(usage, dict) and usage["completion_tokens"] == 48
    assert len(results[0]) == 3  # the client that disconnected
