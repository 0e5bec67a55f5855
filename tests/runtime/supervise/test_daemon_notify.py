"""The real `edgerunner serve` process under a fake systemd: the notify protocol end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def recv_until(sock: socket.socket, want: str, deadline: float,
               log: list[list[str]]) -> list[str]:
    """Collect datagrams into log until one holds a `want` line; return that one."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            fields = sock.recv(65536).decode().split("\n")
        except TimeoutError:
            break
        log.append(fields)
        if any(f == want or f.startswith(want) for f in fields):
            return fields
    raise AssertionError(f"no {want!r} from the daemon; got {log}")


@pytest.mark.slow
def test_serve_speaks_sd_notify(rpi5_bundle: Path, short_tmp: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify"))
    api = short_tmp / "api.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(short_tmp / "notify"), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgerunner", "serve", str(rpi5_bundle), "--socket", str(api)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    log: list[list[str]] = []
    try:
        deadline = time.monotonic() + 120
        ready = recv_until(notify, "READY=1", deadline, log)
        # Before READY: a longer start timeout was asked for while the model loaded.
        assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for msg in log[:-1] for f in msg)
        # At READY the socket already answers.
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(api)), timeout=10) as client:
            health = client.get("http://edgerunner/health").json()
        assert health["state"] == "ready"
        status = next(f for f in ready if f.startswith("STATUS="))
        assert health["model"] in status and "queue" in status and "RSS" in status
        # The serving loop pings the watchdog (every WATCHDOG_USEC / 2).
        recv_until(notify, "WATCHDOG=1", time.monotonic() + 10, log)
        proc.send_signal(signal.SIGTERM)
        recv_until(notify, "STOPPING=1", time.monotonic() + 30, log)
        assert proc.wait(timeout=60) == 0
        assert not api.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        notify.close()
    assert "Traceback" not in stderr, stderr
