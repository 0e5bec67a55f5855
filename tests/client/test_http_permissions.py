"""The client's words when the daemon's socket is closed to the user: an installed service's
socket is 0660 in a 0750 runtime directory, both of its group, so a user outside that group
gets EACCES from stat (the directory) or from connect (the socket)."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The kernel checks file permissions only for an unprivileged process: under root the child
# drops to nobody (after its imports), otherwise it runs as the test user.
CHILD = r"""
import json, os, sys
from edgerunner.client.http import Client
from edgerunner.errors import ClientError

client = Client(sys.argv[1], timeout=5)
if os.getuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
try:
    client.health()
except ClientError as exc:
    print(json.dumps({"message": exc.message, "hint": exc.hint}))
except BaseException as exc:
    print(json.dumps({"raised": repr(exc)}))
else:
    print(json.dumps({"raised": None}))
"""


def other_group() -> tuple[int, str]:
    """A group the test's child is not in."""
    if os.getuid() != 0:
        gid = os.getgid()  # the owner is closed out by the mode bits instead
        return gid, grp.getgrgid(gid).gr_name
    for entry in grp.getgrall():
        if entry.gr_gid not in (0, 65534) and "nobody" not in entry.gr_mem:
            return entry.gr_gid, entry.gr_name
    pytest.skip("no group to close the socket to")


@pytest.fixture
def listening() -> Iterator[tuple[Path, socket.socket]]:
    """A listening unix socket in a fresh directory under /tmp (pytest's own tmp is 0700)."""
    with tempfile.TemporaryDirectory(prefix="er-perm-", dir="/tmp") as tmp:
        path = Path(tmp) / "api.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        try:
            yield path, server
        finally:
            server.close()
            Path(tmp).chmod(0o700)  # the closed-directory case leaves it unreadable


def run_child(sock: Path) -> dict[str, str | None]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(sock)], capture_output=True,
                         text=True, timeout=60, check=True)
    result: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def close_to_child(path: Path, mode: int, gid: int) -> None:
    if os.getuid() == 0:
        os.chown(path, 0, gid)
        path.chmod(mode)
    else:
        path.chmod(0)


@pytest.mark.parametrize("closed", ["directory", "socket"])
def test_a_user_outside_the_group_is_told_which_group_to_join(
        listening: tuple[Path, socket.socket], closed: str) -> None:
    sock, _ = listening
    gid, group = other_group()
    if closed == "directory":
        sock.chmod(0o660)
        close_to_child(sock.parent, 0o750, gid)  # as systemd's RuntimeDirectoryMode=0750
    else:
        sock.parent.chmod(0o755)
        close_to_child(sock, 0o660, gid)  # as the daemon's socket_mode 0o660
    got = run_child(sock)
    assert "raised" not in got, got  # a ClientError, not a raw PermissionError
    assert got["message"] is not None and got["hint"] is not None
    assert "permission denied" in got["message"]
    assert str(sock) in got["message"]
    assert repr(group) in got["message"]
    assert f"usermod -aG {group} " in got["hint"]


def test_a_missing_socket_still_says_the_daemon_is_not_running(
        listening: tuple[Path, socket.socket]) -> None:
    sock, _ = listening
    sock.parent.chmod(0o755)
    got = run_child(sock.parent / "other.sock")
    assert got["message"] is not None and "does not exist" in got["message"]
    assert got["hint"] is not None and "edgerunner serve" in got["hint"]
