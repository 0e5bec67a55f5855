"""Structured log lines: the message, then every `extra={...}` field as key=value (logfmt)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

# attributes every LogRecord has; anything else came from `extra=`
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class LogfmtFormatter(logging.Formatter):
    """`2024-... INFO edgerunner.runtime.scheduler: done job=chatcmpl-1 seconds=0.41`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if not extras:
            return line
        fields = " ".join(f"{k}={_value(v)}" for k, v in extras.items())
        return f"{line} {fields}"


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text


class RepeatFilter(logging.Filter):
    """Warnings and errors repeating one message template: at most `burst` lines per `window`
    seconds each; the next line after a quiet spell carries `suppressed=N`.

    A flood (EMFILE from accept(), a broker refusing every reconnect, a client sending the
    same bad request in a loop) then costs a few lines a minute instead of filling the disk.
    """

    def __init__(self, window: float = 10.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.burst = burst
        self._clock = clock
        # template → (window start, lines let through in it, lines suppressed since)
        self._seen: dict[tuple[str, int, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = self._clock()
        start, passed, suppressed = self._seen.get(key, (now, 0, 0))
        if now - start >= self.window:
            start, passed = now, 0
        if passed >= self.burst:
            self._seen[key] = (start, passed, suppressed + 1)
            return False
        if suppressed:
            record.suppressed = suppressed
        self._seen[key] = (start, passed + 1, 0)
        if len(self._seen) > 1024:  # templates are few; forget the oldest if not
            self._seen.pop(next(iter(self._seen)))
        return True


def install(level: int = logging.INFO) -> None:
    """Use logfmt on the root handlers, rate-limit repeated warnings on the one it creates, and
    let edgerunner's INFO lines through."""
    root = logging.getLogger()
    created = not root.handlers
    if created:
        logging.basicConfig()
    fmt = LogfmtFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.setFormatter(fmt)
        # only on a handler of our own: a host's handlers (pytest's, an embedding app's) keep
        # every record they are given
        if created and not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())
    edgerunner = logging.getLogger("edgerunner")
    if edgerunner.getEffectiveLevel() > level:
        edgerunner.setLevel(level)
