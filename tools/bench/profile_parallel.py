"""Where the daemon's time goes while N streaming clients decode together (py-spy).

Starts `edgerunner serve BUNDLE --parallel N` as bench_parallel does, lets N concurrent
streaming clients run `--rounds` times, and samples the daemon with py-spy (`pip install
py-spy`; needs ptrace rights, e.g. root or kernel.yama.ptrace_scope=0) for exactly that time.
Prints the share of samples per thread and the heaviest functions (self and total), and
writes the collapsed stacks (`--out`, input for flamegraph.pl or speedscope).

    python tools/bench/profile_parallel.py BUNDLE [-n 4] [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_parallel import PROMPTS, concurrent_streams, start_daemon, user


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("-n", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("profile_parallel.txt"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="er-prof-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "bench.toml"
        config.write_text("")
        sock = tmp / "p.sock"
        proc = start_daemon(args.bundle, sock, config, args.n, None, tmp / "daemon.log")
        transport = httpx.HTTPTransport(uds=str(sock))
        try:
            with httpx.Client(transport=transport, base_url="http://edgerunner",
                              timeout=600) as http:
                concurrent_streams(http, [user("Hello")] * args.n, 4)  # warm
                record = subprocess.Popen(
                    [spy, "record", "--pid", str(proc.pid), "--rate", str(args.rate),
                     "--format", "raw", "--threads", "--output", str(args.out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # py-spy attaches
                started = time.perf_counter()
                tokens = 0
                for r in range(args.rounds):
                    prompts = [user(PROMPTS[(r + k) % len(PROMPTS)]) for k in range(args.n)]
                    tokens += sum(s.tokens for s in concurrent_streams(http, prompts,
                                                                       args.max_tokens))
                seconds = time.perf_counter() - started
                record.send_signal(2)  # SIGINT: py-spy writes what it has
                record.wait(timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s aggregate "
          f"({args.n} clients, py-spy attached)")
    summarize(args.out, args.top)


def summarize(path: Path, top: int) -> None:
    """Per-thread and per-function shares of the collapsed stacks py-spy wrote."""
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        threads[frames[0]] += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            total[frame] += count
    print(f"\n{samples} samples; by thread:")
    for name, count in threads.most_common():
        print(f"  {100 * count / samples:5.1f}%  {name}")
    print("\nself time (top frames):")
    for name, count in own.most_common(top):
        print(f"  {100 * count / samples:5.1f}%  {name}")
    print("\ninclusive time:")
    for name, count in total.most_common(top):
        print(f"  {100 * count / samples:5.1f}%  {name}")


if __name__ == "__main__":
    main()
