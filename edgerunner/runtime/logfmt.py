"""Structured log lines: the message, then every `extra={...}` field as key=value (logfmt)."""

from __future__ import annotations

import json
import logging

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


def install(level: int = logging.INFO) -> None:
    """Use logfmt on the root handlers and let edgerunner's INFO lines through."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    fmt = LogfmtFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.setFormatter(fmt)
    edgerunner = logging.getLogger("edgerunner")
    if edgerunner.getEffectiveLevel() > level:
        edgerunner.setLevel(level)
