"""A small client for the daemon's unix socket (or TCP), over httpx."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpcore
import httpx

from edgerunner.errors import ClientError
from edgerunner.paths import runtime_socket_path


class _UnixStream(httpcore.NetworkStream):
    """A connected unix socket as httpcore reads and writes it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._sock.settimeout(timeout)
        try:
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        return self._sock if info == "socket" else None


class _ClosingBackend(httpcore.SyncBackend):
    """httpcore's backend, except that a failed unix connect closes its socket (httpcore's own
    leaves it open: a ResourceWarning, and a file descriptor per attempt)."""

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return _UnixStream(sock)


class _UnixTransport(httpx.HTTPTransport):
    """httpx's transport over a unix socket, with the closing backend."""

    def __init__(self, path: str) -> None:
        super().__init__(uds=path)
        # httpx builds its pool without a way to pass a backend; same defaults as httpx's
        limits = httpx.Limits()
        self._pool = httpcore.ConnectionPool(
            uds=path, network_backend=_ClosingBackend(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` or anything it was raised from is a `kind` (httpx wraps OSErrors twice)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _group_of(path: Path) -> str:
    """The group of `path`, or of its nearest parent this user can stat (a closed directory
    hides the socket inside it), by name when it has one."""
    for candidate in (path, *path.parents):
        try:
            gid = candidate.stat().st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return "unknown"


class Client:
    """Talks to `edgerunner serve`: chat (whole or streamed), health, models."""

    def __init__(self, socket_path: Path | None = None, *, base_url: str | None = None,
                 timeout: float = 600.0, api_key: str | None = None) -> None:
        self.socket_path = None if base_url else Path(socket_path or runtime_socket_path())
        transport = (_UnixTransport(str(self.socket_path))
                     if self.socket_path is not None else None)
        self.where = f"unix:{self.socket_path}" if self.socket_path else str(base_url)
        # over TCP the daemon may want its API key; the socket never does
        key = api_key if api_key is not None else os.environ.get("EDGERUNNER_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key and base_url else None
        self._http = httpx.Client(transport=transport, base_url=base_url or "http://edgerunner",
                                  timeout=httpx.Timeout(timeout, connect=5.0), headers=headers)
        self.last_usage: dict[str, Any] | None = None
        self.last_finish_reason: str | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check_socket(self) -> None:
        # a missing socket file is the common mistake: say so plainly
        if self.socket_path is None:
            return
        try:
            self.socket_path.stat()
        except PermissionError as exc:  # a service's runtime directory is 0750
            raise self._denied() from exc
        except OSError as exc:
            raise self._unreachable(
                FileNotFoundError(f"{self.socket_path} does not exist")) from exc

    def _unreachable(self, exc: Exception) -> ClientError:
        if self.socket_path is not None and _caused_by(exc, PermissionError):
            return self._denied()
        return ClientError(f"cannot reach the daemon at {self.where}: {exc}",
                           "is `edgerunner serve` running? pass --socket PATH if it listens "
                           "elsewhere")

    def _denied(self) -> ClientError:
        """The socket (or its directory) is closed to this user: name the group that opens it."""
        assert self.socket_path is not None
        group = _group_of(self.socket_path)
        return ClientError(
            f"permission denied opening the daemon's socket {self.socket_path}: only its owner "
            f"and the group {group!r} may connect",
            f"add your user to that group (`sudo usermod -aG {group} $USER`, then log in again "
            f"or run `newgrp {group}`), or run the command as a member of it")

    @staticmethod
    def _raise_for_error(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            message = f"daemon refused the request ({error['code']}): {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"daemon answered HTTP {response.status_code}: {response.text[:200]}"
        retry = response.headers.get("Retry-After")
        raise ClientError(message, f"retry in {retry} s" if retry else None)

    def _get(self, path: str) -> dict[str, Any]:
        self._check_socket()
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if path != "/health":
            self._raise_for_error(response)
        result: dict[str, Any] = response.json()
        return result

    def health(self) -> dict[str, Any]:
        """GET /health (returned even when the daemon reports itself unhealthy)."""
        return self._get("/health")

    def wait_ready(self, timeout: float = 120.0, *, process: subprocess.Popen[Any] | None = None,
                   poll_s: float = 0.05) -> dict[str, Any]:
        """Poll /health until the daemon says "ready"; ClientError if `process` (the daemon
        started by the caller) exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if process is not None and process.poll() is not None:
                raise ClientError(
                    f"the daemon exited with code {process.returncode} before it was ready",
                    "see its log; `edgerunner serve --help` lists the exit codes")
            try:
                health = self.health()
                if health.get("state") == "ready":
                    return health
            except ClientError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise ClientError(f"the daemon at {self.where} was not ready within {timeout:g} s")
            time.sleep(poll_s)

    def models(self) -> list[str]:
        """Names of the served models."""
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """POST /v1/chat/completions and return the `chat.completion` object."""
        self._check_socket()
        try:
            response = self._http.post("/v1/chat/completions",
                                       json={"messages": messages, **params, "stream": False})
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._raise_for_error(response)
        result: dict[str, Any] = response.json()
        self.last_usage = result.get("usage")
        self.last_finish_reason = result["choices"][0]["finish_reason"]
        return result

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        """POST with stream:true and yield text pieces as they arrive (usage on .last_usage)."""
        body = {"messages": messages, **params, "stream": True,
                "stream_options": {"include_usage": True}}
        self.last_usage = self.last_finish_reason = None
        self._check_socket()
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for_error(response)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise ClientError(f"generation failed ({err['code']}): {err['message']}")
                    if chunk.get("usage"):
                        self.last_usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        if choice.get("finish_reason"):
                            self.last_finish_reason = choice["finish_reason"]
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            yield piece
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
