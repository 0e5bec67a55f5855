"""sd_notify over $NOTIFY_SOCKET, and a watchdog that stops pinging when inference hangs.

The protocol is a datagram of newline-separated ``KEY=value`` lines sent to the unix socket
systemd names in $NOTIFY_SOCKET (a leading '@' means the abstract namespace); no libsystemd.
Outside systemd every call is a no-op, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from edgerunner.runtime.supervise.ticker import Ticker

logger = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd; does nothing when $NOTIFY_SOCKET is unset."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send one datagram of KEY=value lines; False (logged) when it could not be sent."""
        if not self.enabled:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        payload = "\n".join(lines).encode("utf-8")
        # A socket per message, as libsystemd does: nothing to keep open or leak across threads.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, target)
        except OSError as exc:
            # Losing the notify socket must not take the model down with it.
            logger.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: the model is loaded and every transport listens."""
        return self.send("READY=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        """STATUS=: the line `systemctl status` shows."""
        return self.send(_status(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: still alive."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: a slow load needs this much more time from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1e6))}")

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic timestamp systemd expects; READY=1 ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: draining in-flight work before exit."""
        return self.send("STOPPING=1", *([_status(status)] if status else []))


def _status(text: str) -> str:
    # One datagram line per field: a newline inside STATUS would start a bogus field.
    return "STATUS=" + " ".join(text.split("\n"))


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when no watchdog is asked for.

    systemd sets $WATCHDOG_PID to the process it expects pings from; any other process (a child
    that inherited the environment) must not ping.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2e6


class Heartbeat:
    """Progress marks from the inference worker; alive while the last mark is recent.

    The worker beats when it takes a job, on every generated token, when it finishes, and on
    every wake-up of its idle wait, so only a worker stuck inside llama.cpp (or dead) goes quiet.
    """

    def __init__(self, max_silence: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_silence <= 0:
            raise ValueError("max_silence must be positive")
        self.max_silence = max_silence
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """Record progress now."""
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def is_alive(self) -> bool:
        """True while the last beat is at most max_silence old."""
        return self.age() <= self.max_silence


class Watchdog:
    """Pings systemd every interval, but only while ``is_alive()`` says the daemon works.

    A hung inference makes ``is_alive`` false, the pings stop, and systemd kills and restarts
    the service after WatchdogSec.
    """

    def __init__(
        self, notifier: Notifier, is_alive: Callable[[], bool], interval: float | None = None
    ) -> None:
        self.notifier = notifier
        self.is_alive = is_alive
        self.interval = interval if interval is not None else watchdog_interval()
        self._ticker = Ticker("sd-watchdog", self.interval or 1.0, self.tick)
        self.pings = 0
        self.missed = 0

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for pings."""
        return self.interval is not None and self.notifier.enabled

    def tick(self) -> bool:
        """One check: ping if alive. Returns whether it pinged."""
        try:
            alive = self.is_alive()
        except Exception:  # a broken liveness check means we cannot vouch for the daemon
            logger.exception("watchdog liveness check failed")
            alive = False
        if not alive:
            self.missed += 1
            if self.missed == 1:
                logger.error("inference worker shows no progress; withholding watchdog pings")
            return False
        if self.missed:
            logger.warning("inference worker progresses again after %d missed pings", self.missed)
            self.missed = 0
        if self.notifier.watchdog():
            self.pings += 1
            return True
        return False

    def start(self) -> None:
        """Ping now, then from a background thread until stop(); no-op without a watchdog."""
        if not self.enabled or self._ticker.running:
            return
        self.tick()
        self._ticker.start()

    def stop(self) -> None:
        """Stop the background thread."""
        self._ticker.stop()

    async def run(self) -> None:
        """Ping from the event loop until cancelled: a blocked loop also stops the pings."""
        if not self.enabled:
            return
        assert self.interval is not None
        while True:
            self.tick()
            await asyncio.sleep(self.interval)


def format_status(
    model: str, quant: str, n_ctx: int, queue: int, queue_max: int,
    rss_mb: float, predicted_mb: float, temperature_c: float | None = None, state: str = "serving",
) -> str:
    """The STATUS= line: what a person checking `systemctl status` wants at a glance."""
    parts = [
        f"{state}: {model} {quant} ctx {n_ctx}",
        f"queue {queue}/{queue_max}",
        f"RSS {rss_mb:.0f}/{predicted_mb:.0f} MiB predicted",
    ]
    if temperature_c is not None:
        parts.append(f"{temperature_c:.0f}°C")
    return " · ".join(parts)
