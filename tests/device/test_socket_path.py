"""Which socket `ask` talks to by default: the user's own daemon, else the one installed service."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.cli import main
from edgerunner.paths import runtime_socket_path, service_sockets


def listen(path: Path) -> socket.socket:
    """A real unix socket file at path, as a daemon leaves it while it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
def xdg(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = short_tmp / "xdg"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


def test_one_installed_service_is_the_default(short_tmp: Path, xdg: Path,
                                              sockets: list[socket.socket]) -> None:
    root = short_tmp / "root"
    assert runtime_socket_path(root) == xdg / "edgerunner.sock"  # nothing is up
    service = root / "run/edgerunner/tiny-rpi5-Q4_1/api.sock"
    sockets.append(listen(service))
    assert service_sockets(root) == [service]
    assert runtime_socket_path(root) == service
    # The user's own daemon wins over the service once it is up.
    sockets.append(listen(xdg / "edgerunner.sock"))
    assert runtime_socket_path(root) == xdg / "edgerunner.sock"


def test_several_services_leave_the_choice_to_the_caller(short_tmp: Path, xdg: Path,
                                                         sockets: list[socket.socket]) -> None:
    root = short_tmp / "root"
    for name in ("b-one", "b-two"):
        sockets.append(listen(root / "run/edgerunner" / name / "api.sock"))
    assert len(service_sockets(root)) == 2
    assert runtime_socket_path(root) == xdg / "edgerunner.sock"


def test_without_xdg_runtime_dir(short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                 sockets: list[socket.socket]) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    root = short_tmp / "root"
    own = root / "run/edgerunner/edgerunner.sock"
    assert runtime_socket_path(root) == own
    service = root / "run/edgerunner/b/api.sock"
    sockets.append(listen(service))
    assert runtime_socket_path(root) == service
    sockets.append(listen(own))  # `serve` run by hand without --socket
    assert runtime_socket_path(root) == own


def test_a_file_that_is_not_a_socket_does_not_count(short_tmp: Path, xdg: Path) -> None:
    root = short_tmp / "root"
    stray = root / "run/edgerunner/b/api.sock"
    stray.parent.mkdir(parents=True)
    stray.write_text("not a socket")
    (xdg / "edgerunner.sock").write_text("not a socket either")
    assert service_sockets(root) == []
    assert runtime_socket_path(root) == xdg / "edgerunner.sock"


def test_install_names_the_socket_that_ask_then_finds(
    rpi5_bundle: Path, short_tmp: Path, xdg: Path, sockets: list[socket.socket]
) -> None:
    root = short_tmp / "root"
    runner = CliRunner()
    text = runner.invoke(main, ["install", str(rpi5_bundle), "--root", str(root)])
    assert text.exit_code == 0, text.output
    data = json.loads(runner.invoke(main, ["install", str(rpi5_bundle), "--root", str(root),
                                           "--json"]).output)
    name = data["name"]
    assert data["socket"] == f"/run/edgerunner/{name}/api.sock"
    assert f"the service listens on {data['socket']}" in text.output
    assert f"edgerunner ask --socket {data['socket']} 'Hello'" in text.output
    # The unit makes the service listen exactly there.
    unit = (root / "etc/systemd/system" / data["unit"]).read_text()
    assert f" --socket {data['socket']} " in unit
    # Once it is up, `ask` needs no flag to reach it.
    service = root / data["socket"].lstrip("/")
    sockets.append(listen(service))
    assert runtime_socket_path(root) == service
