"""edgerunner: pack a local LLM for a small device and serve it there under memory guards."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
