"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerunner.runtime.supervise.notify import (
    Heartbeat,
    Notifier,
    Watchdog,
    format_status,
    watchdog_interval,
)


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        target = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(target)
        self.address = address

    def recv(self, timeout: float = 5.0) -> list[str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        return data.decode().split("\n")

    def drain(self) -> list[list[str]]:
        got = []
        while (msg := self.recv(timeout=0.01)) is not None:
            got.append(msg)
        return got


@pytest.fixture
def systemd(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(short_tmp / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    yield fake
    fake.sock.close()


def test_lifecycle_messages_arrive_in_order(systemd: FakeSystemd) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.extend_timeout(30)
    assert notifier.ready(status="serving SmolLM2")
    assert notifier.status("queue 1/8\nsecond line")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.stopping()
    assert systemd.recv() == ["EXTEND_TIMEOUT_USEC=30000000"]
    assert systemd.recv() == ["READY=1", "STATUS=serving SmolLM2"]
    assert systemd.recv() == ["STATUS=queue 1/8 second line"]
    assert systemd.recv() == ["WATCHDOG=1"]
    reloading = systemd.recv()
    assert reloading is not None and reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert systemd.recv() == ["STOPPING=1"]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystemd(f"@edgerunner-test-{os.getpid()}-{threading.get_ident()}")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
        assert Notifier().ready()
        assert fake.recv() == ["READY=1"]
    finally:
        fake.sock.close()


def test_without_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not Watchdog(notifier, lambda: True, interval=1).enabled


def test_a_vanished_socket_is_logged_not_raised(short_tmp: Path) -> None:
    notifier = Notifier(str(short_tmp / "gone"))
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": pid}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    # Another process is the one systemd watches.
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_watchdog_pings_only_while_the_worker_progresses(systemd: FakeSystemd) -> None:
    now = [0.0]
    heartbeat = Heartbeat(max_silence=10, clock=lambda: now[0])
    dog = Watchdog(Notifier(), heartbeat.is_alive, interval=5)
    assert dog.tick()
    now[0] = 9.0
    assert dog.tick()
    now[0] = 10.5  # no beat for longer than max_silence: a hung inference
    assert not dog.tick()
    assert not dog.tick()
    heartbeat.beat()
    assert dog.tick()
    assert [m for m in systemd.drain()] == [["WATCHDOG=1"]] * 3
    assert dog.pings == 3


def test_a_failing_liveness_check_withholds_the_ping(systemd: FakeSystemd) -> None:
    def broken() -> bool:
        raise RuntimeError("scheduler gone")

    assert not Watchdog(Notifier(), broken, interval=1).tick()
    assert systemd.drain() == []


def _worker(heartbeat: Heartbeat, hang: threading.Event, release: threading.Event,
            stop: threading.Event) -> None:
    """A worker loop that beats on every step, and blocks (like a stuck decode) when told to."""
    while not stop.is_set():
        heartbeat.beat()
        if hang.is_set():
            release.wait()
            hang.clear()
        time.sleep(0.01)


def test_a_hung_worker_thread_stops_the_pings(systemd: FakeSystemd) -> None:
    heartbeat = Heartbeat(max_silence=0.3)
    hang, release, stop = threading.Event(), threading.Event(), threading.Event()
    worker = threading.Thread(target=_worker, args=(heartbeat, hang, release, stop))
    worker.start()
    dog = Watchdog(Notifier(), heartbeat.is_alive, interval=0.05)
    dog.start()
    try:
        assert systemd.recv() == ["WATCHDOG=1"]
        hang.set()
        # Once the worker has been stuck for longer than max_silence, no ping may arrive.
        deadline = time.monotonic() + 10
        while heartbeat.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not heartbeat.is_alive()
        systemd.drain()
        assert systemd.recv(timeout=0.5) is None
        assert dog.missed > 0
        release.set()  # the decode returns: pings resume
        assert systemd.recv() == ["WATCHDOG=1"]
    finally:
        stop.set()
        release.set()
        dog.stop()
        worker.join()


def test_async_watchdog_runs_on_the_event_loop(systemd: FakeSystemd) -> None:
    async def main() -> None:
        dog = Watchdog(Notifier(), lambda: True, interval=0.01)
        task = asyncio.create_task(dog.run())
        while dog.pings < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert systemd.drain()[:2] == [["WATCHDOG=1"], ["WATCHDOG=1"]]


def test_status_line_names_what_an_operator_checks() -> None:
    line = format_status("SmolLM2-135M", "Q4_K_M", 4096, 1, 8, 301.4, 320.0, 52.3)
    assert line == (
        "serving: SmolLM2-135M Q4_K_M ctx 4096 · queue 1/8 · RSS 301/320 MiB predicted · 52°C"
    )
    assert "°C" not in format_status("m", "q", 1, 0, 1, 1, 1)
