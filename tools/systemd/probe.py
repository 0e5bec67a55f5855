"""Runs inside the lane's container with /opt/edgerunner/bin/python: one client action, JSON out.

    probe.py health SOCKET            /health (exit 1 with the error when it cannot connect)
    probe.py ask SOCKET               a short chat answer
    probe.py drain SOCKET UNIT        stream a long answer, `systemctl stop UNIT` once it flows,
                                      report how the stream ended
    probe.py long SOCKET              one request whose prompt fills most of the context
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgerunner.client.http import Client
from edgerunner.errors import ClientError


def main() -> int:
    action, sock = sys.argv[1], Path(sys.argv[2])
    try:
        with Client(sock, timeout=600) as client:
            if action == "health":
                health = client.health()
                print(json.dumps({"state": health["state"], "pid": health["pid"]}))
            elif action == "ask":
                reply = client.chat([{"role": "user", "content": "Say hi."}], max_tokens=8)
                print(json.dumps({"text": reply["choices"][0]["message"]["content"]}))
            elif action == "drain":
                return drain(client, sys.argv[3])
            elif action == "long":
                words = " ".join(f"item{i}" for i in range(1400))
                reply = client.chat([{"role": "user", "content": f"Summarise: {words}"}],
                                    max_tokens=16)
                print(json.dumps({"finish": reply["choices"][0]["finish_reason"]}))
    except ClientError as exc:
        print(json.dumps({"error": exc.message}))
        return 1
    except OSError as exc:  # e.g. the socket's directory is closed to this user
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


def drain(client: Client, unit: str) -> int:
    pieces: list[str] = []
    stopper: dict[str, object] = {}

    def stop() -> None:
        started = time.monotonic()
        done = subprocess.run(["systemctl", "stop", unit], capture_output=True, text=True)
        stopper.update(rc=done.returncode, seconds=round(time.monotonic() - started, 2))

    thread = threading.Thread(target=stop)
    for piece in client.stream_chat([{"role": "user", "content": "Count from one to fifty."}],
                                    max_tokens=160, temperature=0.0):
        pieces.append(piece)
        if len(pieces) == 3:
            thread.start()  # SIGTERM while the answer is still being generated
    if not thread.is_alive() and "rc" not in stopper:
        thread.start()  # the answer was shorter than three pieces: stop anyway
    thread.join()
    print(json.dumps({"pieces": len(pieces), "finish": client.last_finish_reason,
                      "usage": client.last_usage, "stop": stopper}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
