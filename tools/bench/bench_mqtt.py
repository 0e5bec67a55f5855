"""MQTT against the unix socket, in one run, on a local Mosquitto this script starts.

1. The same streamed prompts through the socket (SSE) and through MQTT, alternating, against one
   daemon: decode tok/s ratio MQTT/socket (goal >= 0.95) and the latency MQTT adds to the first
   chunk (goal <= 15 ms). Consecutive requests never share a prompt (llama.cpp's prefix cache
   would favour the second); the broker runs with set_tcp_nodelay (see `mosquitto`).
2. The pool: N requests on edgerunner/pool/request served by 1 daemon, then by 2 daemons
   (each with --threads 1, as if each were one small device): throughput ratio and lost requests.

    python tools/bench/bench_mqtt.py [--bundle DIR] [--rounds 5] [--pool-requests 12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from edgerunner.bundle.store import load_bundle
from edgerunner.client.mqtt import MqttChat, wait_for_status
from edgerunner.host.cpu import cpu_budget, decode_threads

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "List five uses for a Raspberry Pi.",
    "Write a short poem about a lighthouse.",
]
MAX_TOKENS = 96


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mosquitto(workdir: Path) -> Iterator[str]:
    """A throwaway broker on a free loopback port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    # set_tcp_nodelay: Mosquitto leaves Nagle on by default, which holds a request behind the
    # delayed ACK of the previous reply's PUBACK (tens of ms); a latency-minded broker sets it
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"set_tcp_nodelay true\nlog_dest file {workdir}/mosquitto.log\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def daemon(bundle: Path, url: str, device: str, sock: Path, log: Path,
           *extra: str) -> Iterator[None]:
    """`edgerunner serve` as a subprocess, until it is online on MQTT."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "-v", "serve", str(bundle), "--no-verify",
             "--socket", str(sock), "--mqtt", url, "--device-id", device, *extra],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        if not wait_for_status(url, device, "online", timeout=120):
            raise SystemExit(f"daemon {device} did not come online; see {log}")
        yield
    finally:
        proc.terminate()
        proc.wait(60)


def body(prompt: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "seed": 1, "stream": True}


def via_socket(client: httpx.Client, prompt: str) -> tuple[float, float, int]:
    """(seconds to first chunk, seconds first→last chunk, completion tokens) over SSE."""
    payload = {**body(prompt), "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with client.stream("POST", "http://edgerunner/v1/chat/completions", json=payload) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or now
            last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - start, last - first, tokens


def via_mqtt(chat: MqttChat, prompt: str) -> tuple[float, float, int]:
    """The same over MQTT (streamed chunks, batched by the daemon)."""
    start = time.perf_counter()
    request_id = chat.send(body(prompt))
    first = last = 0.0
    tokens = 0
    for chunk in chat.replies(request_id):
        now = time.perf_counter()
        if chunk["choices"][0]["delta"].get("content"):
            first = first or now
        last = now
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return first - start, last - first, tokens


def pool_run(url: str, n: int) -> tuple[float, int]:
    """Send n pool requests at once; (seconds until all answered, answers received)."""
    with MqttChat(url, None, timeout=120) as chat:
        start = time.perf_counter()
        ids = [chat.send({**body(PROMPTS[i % len(PROMPTS)]), "max_tokens": 48,
                          "stream": False}) for i in range(n)]
        answered = sum(1 for i in ids for r in chat.replies(i) if "choices" in r)
        return time.perf_counter() - start, answered


def pack_default(workdir: Path) -> Path:
    from edgerunner.pack.packer import pack
    from edgerunner.profiles import resolve_profile

    print("packing the default model for rpi5 ...", flush=True)
    return pack(None, resolve_profile("rpi5"), workdir / "bundle").path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle dir [default: pack the default model]")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the prompts")
    parser.add_argument("--pool-requests", type=int, default=12)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="er-bm-", dir="/tmp"))
    try:
        bundle = args.bundle or pack_default(work)
        with mosquitto(work) as url:
            # the plan's threads, capped at the CPUs we may use (as the daemon does itself):
            # oversubscribed cores make every latency noisy
            plan = load_bundle(bundle, verify=False).manifest.plan
            threads = str(decode_threads(plan.n_threads, cpu_budget()))
            with daemon(bundle, url, "bench", work / "a.sock", work / "a.log",
                        "--threads", threads):
                http = httpx.Client(transport=httpx.HTTPTransport(uds=str(work / "a.sock")),
                                    timeout=300)
                with MqttChat(url, "bench", timeout=300) as chat:
                    via_socket(http, PROMPTS[0])  # warm both paths
                    via_mqtt(chat, PROMPTS[0])
                    rows: dict[str, list[tuple[float, float, int]]] = {"socket": [], "mqtt": []}
                    # llama.cpp reuses the KV cache of a repeated prompt prefix: every request
                    # follows one with another prompt, or the second path would skip most of
                    # its prompt processing; the paths alternate and each gets every prompt
                    for k in range(2 * len(PROMPTS) * args.rounds):
                        prompt = PROMPTS[k % len(PROMPTS)]
                        if k % 2 == 0:
                            rows["socket"].append(via_socket(http, prompt))
                        else:
                            rows["mqtt"].append(via_mqtt(chat, prompt))
                http.close()

            pool_extra = ("--threads", "1", "--queue-depth", str(args.pool_requests))
            with daemon(bundle, url, "pool-a", work / "p1.sock", work / "p1.log", *pool_extra):
                one = pool_run(url, args.pool_requests)
                with daemon(bundle, url, "pool-b", work / "p2.sock", work / "p2.log",
                            *pool_extra):
                    two = pool_run(url, args.pool_requests)
    except BaseException:
        print(f"failed; daemon and broker logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)

    def tps(r: list[tuple[float, float, int]]) -> float:
        return statistics.median((t - 1) / d for _, d, t in r if d > 0 and t > 1)

    def ttfc_ms(r: list[tuple[float, float, int]]) -> float:
        return 1000 * statistics.median(f for f, _, _ in r)

    s_tps, m_tps = tps(rows["socket"]), tps(rows["mqtt"])
    s_ttfc, m_ttfc = ttfc_ms(rows["socket"]), ttfc_ms(rows["mqtt"])
    n = len(rows["socket"])
    print(f"\n{'':28}{'socket':>12}{'mqtt':>12}{'mqtt/socket':>14}{'goal':>10}")
    print(f"{'decode tok/s (median)':28}{s_tps:12.1f}{m_tps:12.1f}{m_tps / s_tps:14.3f}"
          f"{'>= 0.95':>10}")
    print(f"{'first chunk, ms (median)':28}{s_ttfc:12.1f}{m_ttfc:12.1f}"
          f"{f'{m_ttfc - s_ttfc:+.1f} ms':>14}{'<= 15 ms':>10}")
    print(f"({n} streamed requests each, max_tokens {MAX_TOKENS}, temperature 0)")
    print(f"\n{'pool':28}{'1 daemon':>12}{'2 daemons':>12}{'2/1':>14}")
    print(f"{'requests answered':28}{one[1]:12d}{two[1]:12d}"
          f"{f'lost {args.pool_requests - one[1]} / {args.pool_requests - two[1]}':>14}")
    print(f"{'requests/s':28}{one[1] / one[0]:12.2f}{two[1] / two[0]:12.2f}"
          f"{(two[1] / two[0]) / (one[1] / one[0]):14.2f}")
    print(f"({args.pool_requests} requests, max_tokens 48, each daemon --threads 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
