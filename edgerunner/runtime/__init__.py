"""The on-device daemon: engine, scheduler, guards and transports behind `edgerunner serve`."""

from __future__ import annotations

__all__: list[str] = []
