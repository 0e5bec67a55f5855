"""edgerunner: pack a local LLM for a small device and serve it there under memory guards.

    from edgerunner import read_model_info, resolve_profile, make_plan, verify_bundle
    from edgerunner.pack import packer as pack

Names are imported on first use, so `import edgerunner` stays cheap (no llama.cpp load).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "EdgerunnerError": "edgerunner.errors",
    "ModelInfo": "edgerunner.pack.gguf_info",
    "read_model_info": "edgerunner.pack.gguf_info",
    "DeviceProfile": "edgerunner.profiles",
    "resolve_profile": "edgerunner.profiles",
    "list_profiles": "edgerunner.profiles",
    "estimate_memory": "edgerunner.pack.memory",
    "PlanOptions": "edgerunner.pack.planner",
    "make_plan": "edgerunner.pack.planner",
    "pack": "edgerunner.pack.packer",
    "BundleManifest": "edgerunner.bundle.manifest",
    "load_bundle": "edgerunner.bundle.store",
    "verify_bundle": "edgerunner.bundle.store",
    "ensure_default_model": "edgerunner.pack.default_model",
    "Client": "edgerunner.client.http",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgerunner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
