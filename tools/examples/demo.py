"""The main job end to end on the default model: pack it for rpi5, serve the bundle on a unix
socket, answer one prompt through that socket, shut the daemon down cleanly.

Run with `make demo` (which sets up the virtualenv first). Everything goes to a temp directory;
pass --keep DIR to keep the bundle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgerunner import Client

PROMPT = "In one sentence: why run a language model on the device itself?"


def edgerunner(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the edgerunner CLI the way a user would."""
    cmd = [sys.executable, "-m", "edgerunner", *args]
    print(f"\n$ edgerunner {' '.join(args)}", flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="rpi5")
    parser.add_argument("--keep", type=Path, help="keep the bundle in this directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="er-demo-", dir="/tmp"))
    out = args.keep or work / "out"
    out.mkdir(parents=True, exist_ok=True)
    try:
        edgerunner("plan", "--profile", args.profile)
        edgerunner("pack", "--profile", args.profile, "-o", str(out))
        bundle = next(p for p in out.iterdir() if (p / "manifest.json").exists())
        edgerunner("verify", str(bundle))
        sock = work / "er.sock"
        log = work / "serve.log"
        print(f"\n$ edgerunner serve {bundle} --socket {sock} 2>{log} &", flush=True)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgerunner", "serve", str(bundle), "--socket", str(sock)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=log.open("wb"),
        )
        try:
            with Client(sock) as client:
                client.wait_ready(process=daemon)
            edgerunner("ask", PROMPT, "--socket", str(sock), "--max-tokens", "64")
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
        print(f"\n--- daemon log ({log.name})\n{log.read_text()}", end="")
        print(f"daemon stopped with exit code {code}; socket removed: {not sock.exists()}")
        return 0 if code == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
