"""Where edgerunner keeps things on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

# `edgerunner install`ed services listen on <this>/<bundle>/api.sock (systemd RuntimeDirectory=).
SERVICE_RUNTIME_DIR = "/run/edgerunner"
SERVICE_SOCKET_NAME = "api.sock"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/edgerunner (default ~/.cache/edgerunner)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgerunner"


def default_socket_path(root: Path = Path("/")) -> Path:
    """Where `serve` listens by default: $XDG_RUNTIME_DIR/edgerunner.sock, else under /run."""
    # no discovery here, unlike runtime_socket_path: a daemon must never take over the path
    # of an installed service's socket (/run/edgerunner/<bundle>/api.sock)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(runtime) if runtime else _under(root, SERVICE_RUNTIME_DIR)) / "edgerunner.sock"


def runtime_socket_path(root: Path = Path("/")) -> Path:
    """Default socket to connect to: the user's own daemon's, else the one installed service's.

    The user's own is default_socket_path(), and is also the answer when no single service is
    up. ``root`` is where /run is looked up (tests pass a temp tree); $XDG_RUNTIME_DIR is used
    as is.
    """
    own = default_socket_path(root)
    if _is_socket(own):
        return own
    services = service_sockets(root)
    # With several services installed no default can be right; the caller names one.
    return services[0] if len(services) == 1 else own


def service_sockets(root: Path = Path("/")) -> list[Path]:
    """The sockets of installed services that are up: /run/edgerunner/*/api.sock, sorted."""
    base = _under(root, SERVICE_RUNTIME_DIR)
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    return [path for entry in entries if _is_socket(path := entry / SERVICE_SOCKET_NAME)]


def _under(root: Path, absolute: str) -> Path:
    return Path(root) / absolute.lstrip("/")


def _is_socket(path: Path) -> bool:
    # A service's runtime directory is 0750: outside its group, stat fails with EACCES.
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


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
