"""The daemon's HTTP listeners: the app served by uvicorn on a unix socket and optionally TCP,
inside the daemon's event loop (the daemon owns the signals and the drain)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from edgerunner.bundle.settings import ServeConfig
from edgerunner.errors import ConfigError
from edgerunner.runtime.health import InfoProvider, ServedModel
from edgerunner.runtime.http.access import Access, Gate, connection_cap, gated, protocol_class
from edgerunner.runtime.http.openai import MetricsProvider, create_app
from edgerunner.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at `path` with `mode`; refuses to replace a live daemon's socket."""
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"{path} exists and is not a socket",
                              "choose another --socket path or remove that file")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left behind by a daemon that died without cleaning up
        else:
            raise ConfigError(f"another daemon is already listening on {path}",
                              "stop it, or pass a different --socket")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never visible with wider permissions than asked, even briefly
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            raise ConfigError(f"socket path {path} is too long for a unix socket (≤107 bytes)",
                              "pass a shorter --socket path") from exc
        raise ConfigError(f"cannot create socket {path}: {exc.strerror}",
                          "check the directory exists and is writable") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          "pick a free port or another --http address") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class _Server(uvicorn.Server):
    # the daemon owns SIGTERM/SIGINT (drain first, then stop the server)
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpTransport:
    """uvicorn serving the app on a unix socket and optionally TCP, inside the daemon's loop."""

    def __init__(self, app: Starlette, socket_path: Path, socket_mode: int = 0o660,
                 tcp: tuple[str, int] | None = None, graceful_s: float = 5.0, *,
                 max_connections: int = 256, idle_timeout_s: float = 10.0,
                 api_key_set: bool = False) -> None:
        self.app = app
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.tcp = tcp
        self.graceful_s = graceful_s
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.api_key_set = api_key_set
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []

    async def start(self) -> None:
        """Bind and serve; returns once uvicorn accepts connections."""
        self._sockets = [bind_unix_socket(self.socket_path, self.socket_mode)]
        try:
            if self.tcp is not None:
                self._sockets.append(bind_tcp(*self.tcp))
        except ConfigError:
            self._remove_socket()
            raise
        # below the open-file limit, so accept() never fails with EMFILE (each connection is
        # one descriptor); the rest are answered 503 and closed at once
        cap = connection_cap(self.max_connections)
        gate = Gate(cap)
        self._sockets = [gated(sock, gate) for sock in self._sockets]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=max(1, round(self.graceful_s)), server_header=False,
            http=protocol_class(gate, self.idle_timeout_s),
            timeout_keep_alive=max(1, round(self.idle_timeout_s)),
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=self._sockets))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # surface the start-up failure
                raise RuntimeError("uvicorn stopped during start-up")
            await asyncio.sleep(0.01)
        logger.info("listening on unix:%s%s (at most %d connections)", self.socket_path,
                    f" and http://{self.tcp[0]}:{self.tcp[1]}" if self.tcp else "", cap)
        if self.tcp is not None and not is_loopback(self.tcp[0]):
            logger.warning(
                "http: listening on %s:%d, which other machines can reach; %s", *self.tcp,
                "requests need the API key" if self.api_key_set else
                "anyone on the network can use the model: set api_key_file (or "
                "EDGERUNNER_API_KEY), or bind 127.0.0.1")

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (bounded), remove the socket file."""
        try:
            if self._server is not None and self._task is not None:
                self._server.should_exit = True
                await self._task
        finally:
            self._remove_socket()

    def _remove_socket(self) -> None:
        for sock in self._sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def transport_from_config(config: ServeConfig, scheduler: Scheduler, info: InfoProvider,
                          metrics: MetricsProvider, served: ServedModel | None = None
                          ) -> HttpTransport:
    """The app and its listeners as `config` describes them (what the daemon serves)."""
    api_key = config.http_api_key()
    access = Access(api_key=api_key, allowed_hosts=frozenset(config.http_allowed_hosts),
                    allowed_origins=frozenset(config.http_allowed_origins))
    app = create_app(scheduler, info, metrics, max_body_bytes=config.max_body_bytes,
                     stream_flush_s=config.stream_flush_s, access=access, served=served)
    return HttpTransport(app, config.socket_path(), config.socket_mode, config.http_host_port(),
                         max_connections=config.max_connections,
                         idle_timeout_s=config.idle_timeout_s, api_key_set=api_key is not None)
