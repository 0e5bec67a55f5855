"""Starting and stopping an installed bundle's daemon: systemd, or a child process directly.

The update state machine (device.update) only needs these few verbs, so the same code drives a
device under systemd and a container or test machine without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Protocol

from edgerunner.bundle.unit import BUNDLES_DIR, CONFIG_DIR, socket_path, unit_name
from edgerunner.errors import InstallError

logger = logging.getLogger(__name__)

DIRECT_STOP_TIMEOUT_S = 60.0


class ServiceController(Protocol):
    """What an update needs from whatever runs the daemon."""

    kind: str

    def is_running(self, name: str) -> bool:
        """The instance for bundle `name` is up (or starting)."""

    def restart(self, name: str) -> None:
        """(Re)start the instance so it serves what is installed now; InstallError if it
        cannot even be started."""

    def stop(self, name: str) -> None:
        """Stop the instance (drain, then exit)."""

    def socket(self, name: str) -> Path:
        """The unix socket the instance listens on, as seen from here."""

    def exited(self, name: str) -> str | None:
        """Why the instance is not running (exit status), or None while it runs."""


def _under(root: Path, absolute: str) -> Path:
    return Path(root) / absolute.lstrip("/")


class SystemdController:
    """systemctl on this machine (root must be /). Type=notify: restart returns after READY=1."""

    kind = "systemd"

    def __init__(self, systemctl: str = "systemctl") -> None:
        self.systemctl = systemctl

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.systemctl, *args], capture_output=True, text=True,
                              check=False)
        if check and done.returncode != 0:
            raise InstallError(f"`systemctl {' '.join(args)}` failed (exit {done.returncode}): "
                               f"{done.stderr.strip()}",
                               hint=f"see `journalctl -u {args[-1]}`")
        return done

    def is_running(self, name: str) -> bool:
        done = self._run("is-active", "--quiet", unit_name(name), check=False)
        return done.returncode == 0

    def restart(self, name: str) -> None:
        # the service user and the unit file may be new: create and load them first
        subprocess.run(["systemd-sysusers"], capture_output=True, check=False)
        self._run("daemon-reload")
        self._run("enable", unit_name(name), check=False)
        self._run("reset-failed", unit_name(name), check=False)
        self._run("restart", unit_name(name))

    def stop(self, name: str) -> None:
        self._run("stop", unit_name(name), check=False)

    def socket(self, name: str) -> Path:
        return Path(socket_path(name))

    def exited(self, name: str) -> str | None:
        done = self._run("show", "-p", "ActiveState,Result,ExecMainStatus", unit_name(name),
                         check=False)
        props = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        if props.get("ActiveState") in ("active", "activating", "reloading"):
            return None
        return (f"{unit_name(name)} is {props.get('ActiveState', 'unknown')} "
                f"(result {props.get('Result', '?')}, exit status "
                f"{props.get('ExecMainStatus', '?')})")


class DirectController:
    """`edgerunner serve` as a detached child process, one per bundle, with a pid file.

    Layout under root: run/edgerunner/<name>/api.sock (socket), run/edgerunner/<name>.pid,
    var/log/edgerunner/<name>.log (the daemon's output).
    """

    kind = "direct"

    def __init__(self, root: Path, executable: str) -> None:
        self.root = Path(root)
        self.command = shlex.split(executable)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _pidfile(self, name: str) -> Path:
        return _under(self.root, "/run/edgerunner") / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return _under(self.root, "/var/log/edgerunner") / f"{name}.log"

    def socket(self, name: str) -> Path:
        return _under(self.root, socket_path(name))

    def _pid(self, name: str) -> int | None:
        try:
            return int(self._pidfile(name).read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is a child of this process
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def is_running(self, name: str) -> bool:
        pid = self._pid(name)
        return pid is not None and self._alive(pid)

    def exited(self, name: str) -> str | None:
        pid = self._pid(name)
        if pid is not None and self._alive(pid):
            return None
        child = self._children.get(pid) if pid is not None else None
        code = child.returncode if child is not None else None
        where = self.log_path(name)
        return (f"the daemon (pid {pid}) exited"
                + (f" with code {code}" if code is not None else "") + f"; its log: {where}")

    def stop(self, name: str) -> None:
        pid = self._pid(name)
        if pid is None or not self._alive(pid):
            self._pidfile(name).unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DIRECT_STOP_TIMEOUT_S
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._alive(pid):
            logger.warning("pid %d did not stop within %.0f s; killing it", pid,
                           DIRECT_STOP_TIMEOUT_S)
            os.kill(pid, signal.SIGKILL)
            while self._alive(pid):
                time.sleep(0.05)
        self._pidfile(name).unlink(missing_ok=True)

    def restart(self, name: str) -> None:
        self.stop(name)
        sock = self.socket(name)
        bundle = _under(self.root, BUNDLES_DIR) / name
        config = _under(self.root, CONFIG_DIR) / f"{name}.toml"
        log = self.log_path(name)
        try:
            sock.parent.mkdir(parents=True, exist_ok=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            argv = [*self.command, "serve", str(bundle), "--socket", str(sock),
                    "--config", str(config)]
            with log.open("ab") as out:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise InstallError(f"cannot start `edgerunner serve` for {name}: {exc}",
                               hint="check the edgerunner executable and --root") from exc
        self._children[child.pid] = child
        self._pidfile(name).write_text(f"{child.pid}\n")
        logger.info("started pid %d: %s", child.pid, " ".join(argv))


def pick_controller(service: str, root: Path, executable: str) -> ServiceController:
    """systemd, direct, or auto: systemd when root is / and systemd runs, else direct."""
    from edgerunner.device.install import systemd_running

    at_root = Path(root).resolve() == Path("/")
    if service == "auto":
        service = "systemd" if at_root and systemd_running() else "direct"
    if service == "systemd":
        if not systemd_running() or not at_root:
            raise InstallError("the systemd controller needs systemd running and --root /",
                               hint="pass --service direct to run the daemon as a child process")
        return SystemdController()
    return DirectController(root, executable)
