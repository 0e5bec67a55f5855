"""Where edgerunner keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/edgerunner (default ~/.cache/edgerunner)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgerunner"


def runtime_socket_path() -> Path:
    """Default daemon socket: $XDG_RUNTIME_DIR/edgerunner.sock, else /run/edgerunner/."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "edgerunner.sock"
    return Path("/run/edgerunner/edgerunner.sock")


def profiles_dir() -> Path:
    """The shipped device profiles (overridable with EDGERUNNER_PROFILES_DIR)."""
    override = os.environ.get("EDGERUNNER_PROFILES_DIR")
    if override:
        return Path(override)
    return Path(__file__).parent / "_profiles"


def systemd_dir() -> Path:
    """The shipped systemd unit templates."""
    return Path(__file__).parent / "_systemd"


def user_profiles_dir() -> Path:
    """$XDG_CONFIG_HOME/edgerunner/profiles: calibrated or user-written profiles."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgerunner" / "profiles"
