"""Reading /proc and /sys under a root: small helpers host.memory and host.cpu share."""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path) -> str | None:
    """The file's text, or None if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def self_cgroups(root: Path) -> list[tuple[str, list[str], str]]:
    """/proc/self/cgroup as (hierarchy id, controllers, path); v2 is ("0", [], path)."""
    entries = []
    for line in (read_text(root / "proc/self/cgroup") or "").splitlines():
        hier, controllers, path = [*line.split(":", 2), "", ""][:3]
        entries.append((hier, [c for c in controllers.split(",") if c], path.strip()))
    return entries


def v1_group(top: Path, controllers: list[str], path: str, wanted: str) -> Path | None:
    """A v1 hierarchy's directory for our group (its mount root inside a container)."""
    names = [",".join(controllers), wanted, *(n for n in ("cpu,cpuacct",) if wanted == "cpu")]
    mount = next((top / name for name in names if (top / name).is_dir()), None)
    if mount is None:
        return None
    node = mount / path.lstrip("/")
    return node if node.is_dir() else mount


def ancestors(top: Path, node: Path) -> list[Path]:
    """node, its parent, … up to top (limits set on any of them bind node too)."""
    chain = []
    while True:
        chain.append(node)
        if node == top or top not in node.parents:
            return chain
        node = node.parent
