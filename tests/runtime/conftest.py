"""A real daemon on a short unix socket, serving the real default model."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from edgerunner.bundle.manifest import BundleManifest, RuntimePlan
from edgerunner.bundle.settings import ServeConfig
from edgerunner.bundle.store import Bundle, load_bundle
from edgerunner.client.http import Client
from edgerunner.errors import ClientError
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.protocol import DoneEvent, ErrorEvent, Event, TextEvent, parse_request
from edgerunner.runtime.scheduler import Scheduler
from edgerunner.runtime.supervise.daemon import Daemon


@pytest.fixture
def bundle_manifest() -> BundleManifest:
    """A manifest as pack writes one (no model file behind it)."""
    from edgerunner.bundle.manifest import Prediction, RuntimePlan, SourceModel
    from edgerunner.profiles import resolve_profile

    return BundleManifest(
        name="test-rpi5-q4_1", edgerunner_version="0.1.0", llama_cpp_python_version="0.3.36",
        source=SourceModel(name="t", sha256="0" * 64, architecture="llama", file_type="F16"),
        profile=resolve_profile("rpi5"), plan=RuntimePlan(), prediction=Prediction(),
    )


@pytest.fixture(scope="session")
def bundle(rpi5_bundle: Path) -> Bundle:
    """The default model packed for rpi5, loaded as the daemon loads it (verified)."""
    return load_bundle(rpi5_bundle, verify=True)


class RunningDaemon:
    """A Daemon running its asyncio loop in a background thread."""

    def __init__(self, bundle: Bundle, config: ServeConfig) -> None:
        self.daemon = Daemon(bundle, config)
        self.socket = config.socket_path()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(self.daemon.run())
        except BaseException as exc:
            self.error = exc

    def start(self, timeout: float = 60) -> RunningDaemon:
        self._thread.start()
        end = time.monotonic() + timeout
        while self.daemon.state != "ready":
            if not self._thread.is_alive():
                raise RuntimeError(f"daemon died during start-up: {self.error!r}")
            if time.monotonic() > end:
                raise TimeoutError("daemon did not become ready")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60) -> int | None:
        self.daemon.stop_threadsafe()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "daemon did not stop"
        return self.exit_code

    def client(self, **kwargs: Any) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, base_url="http://edgerunner", **kwargs)

    def ollama_client(self) -> ollama.Client:
        """The unmodified `ollama` client on the daemon's unix socket."""
        return ollama.Client(host="http://edgerunner", timeout=120,
                             transport=httpx.HTTPTransport(uds=str(self.socket)))


def make_config(sock: Path, **overrides: Any) -> ServeConfig:
    """A ServeConfig for tests: given socket, real guard paths unless overridden."""
    # one thread: the test machine's cores are shared, and llama.cpp's threads spin-wait
    return ServeConfig.model_validate({"socket": sock, "request_timeout_s": 120,
                                       "drain_timeout_s": 10, "n_threads": 1, **overrides})


@pytest.fixture(scope="session")
def served(bundle: Bundle) -> Iterator[RunningDaemon]:
    """One daemon shared by the HTTP tests (queue 8); every test must leave it serving."""
    tmp = Path(tempfile.mkdtemp(prefix="er-", dir="/tmp"))
    # the RSS ceiling guards a daemon process; this one shares pytest's process with other models
    config = make_config(tmp / "d.sock", rss_ceiling_mb=1_000_000)
    running = RunningDaemon(bundle, config).start()
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def http(served: RunningDaemon) -> Iterator[httpx.Client]:
    """An httpx client on the shared daemon's socket."""
    with served.client(timeout=120) as client:
        yield client


class Collector:
    """A scheduler sink that records events; `on_text` runs on the worker thread per piece."""

    def __init__(self, on_text: Any = None) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.on_text = on_text

    def __call__(self, event: Event) -> None:
        self.seen.append(event)
        self.events.put(event)
        if isinstance(event, TextEvent) and self.on_text is not None:
            self.on_text(event)

    def final(self, timeout: float = 60) -> DoneEvent | ErrorEvent:
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, (DoneEvent, ErrorEvent)):
                return event

    def texts(self) -> list[str]:
        return [e.text for e in self.seen if isinstance(e, TextEvent)]


# the engine-level tests' plan: the default model in a small window, one thread
PLAN = RuntimePlan(quant="Q4_1", n_ctx=1024, kv_type="q8_0", flash_attn=True, n_threads=1,
                   n_batch=256, n_ubatch=256)


def chat(content: str, schema: Any = None, *, system: str | None = None, **extra: Any) -> Any:
    """A validated chat request: one user message (after `system`, if given), and a
    json_schema response_format when `schema` is given; `extra` are the other fields."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    if schema is not None:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
    return parse_request("chat", {"messages": messages, **extra})


@contextmanager
def loaded_engine(model: Path, plan: RuntimePlan, *, name: str = "smol",
                  **kwargs: Any) -> Iterator[Engine]:
    """An Engine for `model` under `plan` with its weights loaded; closed when the block ends."""
    eng = Engine(model, plan, name=name, **kwargs)
    eng.load()
    try:
        yield eng
    finally:
        eng.close()


@contextmanager
def started(scheduler: Scheduler) -> Iterator[Scheduler]:
    """A started scheduler, shut down (5 s drain) when the block ends."""
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.shutdown(5)


class ServeProcess:
    """`python -m edgerunner serve` in a subprocess, with its socket; its log goes to a file
    (a pipe nobody reads fills after ~64 KiB of log lines and then blocks the daemon)."""

    def __init__(self, bundle: Bundle, sock: Path, *args: str, env: dict[str, str] | None = None):
        self.socket = sock
        self.log = sock.with_name(f"{sock.name}.log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgerunner", "serve", str(bundle.dir), "--socket",
                 str(sock), "--threads", "1", *args],
                env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log,
            )

    def wait_ready(self, timeout: float = 120) -> None:
        try:
            with Client(self.socket) as client:
                client.wait_ready(timeout, process=self.proc)
        except ClientError as exc:
            raise AssertionError(f"{exc}: {self.stderr()}") from exc

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://edgerunner", timeout=timeout)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        """The daemon's log so far."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def spawn(bundle: Bundle, short_tmp: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        proc = ServeProcess(bundle, short_tmp / "s.sock", *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
