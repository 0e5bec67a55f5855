"""What stands between the network and the HTTP app: the connection cap and idle timeout, the
API key and Host/Origin checks for TCP, and the last-resort 500.

- Connections beyond `max_connections` get a 503 with `Connection: close` at once, so open
  sockets stay below the file limit (accept() then never fails with EMFILE) and a flood of idle
  connections cannot starve real requests for longer than `idle_timeout_s`.
- A connection that has not sent a whole request head within `idle_timeout_s` is closed (uvicorn
  itself only times out keep-alive connections between requests).
- Over TCP, a browser can be made to POST to a loopback or LAN address (CSRF with text/plain) or
  to reach it under an attacker's host name (DNS rebinding): both are refused by the Origin and
  Host checks. The optional API key is checked on TCP too; the unix socket's authentication is
  its file mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import resource
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgerunner.runtime.protocol import ErrorCode, RequestError

logger = logging.getLogger(__name__)

# a refused connection waits this long for its client to read the 503 and close, and at most
# this many wait at once (more are closed as soon as they are accepted)
LINGER_S = 1.0
LINGER_MAX = 16
# file descriptors kept free beyond the connection cap: the daemon's own (model, listeners,
# MQTT, logs: ~30) and the refused connections lingering
FD_BASELINE = 48
FD_RESERVE = FD_BASELINE + LINGER_MAX
# endpoints a load balancer or `Client.wait_ready` polls without credentials
OPEN_PATHS = frozenset({"/health"})


def raise_nofile_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            logger.debug("could not raise RLIMIT_NOFILE to %d", hard, exc_info=True)
    return soft


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to stay FD_RESERVE below the current open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class Gate:
    """Open connections of one server, counted from accept() to connection_lost."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.shed = 0  # closed straight after accept(): even the polite refusals were full


class GatedSocket(socket.socket):
    """A listening socket whose accept() closes connections at once when the gate is full.

    asyncio accepts many connections per loop tick before any protocol sees them; counting at
    accept() is what keeps descriptors bounded under a flood.
    """

    gate: Gate

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            conn, address = super().accept()  # BlockingIOError ends asyncio's accept loop
            gate = self.gate
            if gate.open < gate.cap + LINGER_MAX:
                gate.open += 1
                return conn, address
            gate.shed += 1
            _over_cap_log.hit(gate.cap)
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(_busy_response("too many open connections; retry later"))
            conn.close()


def gated(sock: socket.socket, gate: Gate) -> GatedSocket:
    """`sock` (listening) as a GatedSocket counting into `gate`."""
    wrapped = GatedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    wrapped.gate = gate
    wrapped.setblocking(False)
    return wrapped


def _busy_response(message: str) -> bytes:
    """A whole 503 `busy` response, written before the request is even read."""
    payload = JSONResponse(RequestError("busy", message).body()).body
    head = ["HTTP/1.1 503 Service Unavailable", "content-type: application/json",
            f"content-length: {len(payload)}", "connection: close", "retry-after: 1"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for the request head.

    `max_connections` and `head_timeout_s` are set on the subclass `protocol_class` makes.
    """

    max_connections = 256
    head_timeout_s = 10.0
    gate = Gate(256)
    refused = 0  # connections turned away at the cap (shared by one subclass)
    lingering = 0  # refused connections waiting for their client to read the 503

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if len(self.server_state.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_timeout_s, self._head_timed_out)

    def _refuse(self, transport: asyncio.Transport) -> None:
        cls = type(self)
        cls.refused += 1
        _over_cap_log.hit(self.max_connections)
        self.transport = transport
        transport.write(_busy_response(
            f"too many open connections (the cap is {self.max_connections}); retry later"))
        # closing with the client's request unread would reset the connection and lose the
        # answer: send it, half-close, read and drop until the client closes (briefly; when
        # many linger, at once)
        if cls.lingering >= LINGER_MAX or not transport.can_write_eof():
            transport.close()
            return
        cls.lingering += 1
        self._lingering = True
        transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.open -= 1
        if self.flow is None:  # refused at the cap: never registered
            if getattr(self, "_lingering", False):
                type(self).lingering -= 1
                self._linger_timer.cancel()
            return
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.flow is None:  # refused at the cap
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # a whole request head arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request head gets the same deadline (a pipelined one may already be here)
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _RepeatLog:
    """One warning per `every` seconds for a repeated event, with how many it stands for."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._count = 0
        self._last = float("-inf")

    def hit(self, cap: int) -> None:
        loop = asyncio.get_running_loop()
        self._count += 1
        now = loop.time()
        if now - self._last >= self.every:
            logger.warning("http: refused %d connection(s) over the cap of %d open connections",
                           self._count, cap)
            self._count = 0
            self._last = now


_over_cap_log = _RepeatLog()


def protocol_class(gate: Gate, head_timeout_s: float) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol subclass with these limits (uvicorn takes a class, not an object)."""
    return type("EdgerunnerH11Protocol", (GuardedH11Protocol,),
                {"max_connections": gate.cap, "head_timeout_s": head_timeout_s, "gate": gate})


# ------------------------------------------------------------------------- ASGI middleware


@dataclass(frozen=True)
class Access:
    """Who may talk to the app over TCP."""

    api_key: str | None = None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allowed_origins: frozenset[str] = field(default_factory=frozenset)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _host_name(host: str) -> str:
    """`example.com:8080` → `example.com`; `[::1]:8080` → `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def local_names() -> frozenset[str]:
    """Host names this machine answers to without any DNS an attacker controls."""
    names = {"localhost"}
    hostname = socket.gethostname().lower()
    if hostname:
        names |= {hostname, f"{hostname.split('.')[0]}.local"}
    return frozenset(names)


class AccessMiddleware:
    """Refuses cross-origin browser requests, foreign Host names (TCP) and a missing API key."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self.hosts = local_names() | {h.lower() for h in access.allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, code, message = problem
        # the body (possibly large, unauthenticated) is not read: close instead of draining it
        headers = {"Connection": "close"}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="edgerunner"'
        response = JSONResponse(RequestError(code, message).body(), status_code=status,
                                headers=headers)
        await response(scope, receive, send)

    def problem(self, scope: Scope) -> tuple[int, ErrorCode, str] | None:
        server = scope.get("server")
        tcp = server is not None and server[1] is not None
        origin = _header(scope, b"origin")
        if origin is not None and not self._origin_ok(origin, _header(scope, b"host")):
            return (403, "forbidden",
                    f"requests from web pages of another origin ({origin[:100]}) are refused; "
                    "add it to http_allowed_origins if a browser app should call this API")
        if not tcp:
            return None  # the unix socket: its file mode decides who may connect
        host = _header(scope, b"host")
        if host is None or not self._host_ok(host):
            return (403, "forbidden",
                    f"Host {str(host)[:100]!r} is not a name of this device; use its IP "
                    "address, localhost, or add the name to http_allowed_hosts")
        key = self.access.api_key
        if key is not None and scope["path"] not in OPEN_PATHS:
            given = _header(scope, b"authorization") or ""
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), key.encode()):
                return (401, "unauthorized",
                        "this API needs a key: send `Authorization: Bearer <key>` (the key is "
                        "in the daemon's api_key_file or EDGERUNNER_API_KEY)")
        return None

    def _host_ok(self, host: str) -> bool:
        name = _host_name(host.strip().lower())
        # an IP literal cannot be rebound: DNS rebinding needs a name the attacker controls
        return _is_ip(name) or name in self.hosts or name.endswith(".localhost")

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().lower()
        if origin in {o.lower().rstrip("/") for o in self.access.allowed_origins}:
            return True
        parts = urlsplit(origin)
        # same origin: a page served from this very host:port
        return bool(parts.netloc) and host is not None and parts.netloc == host.strip().lower()


class CatchAllMiddleware:
    """An exception no handler took becomes a 500 `internal_error` with `Connection: close`,
    instead of uvicorn dropping the connection without a word (and a pipelined request with it).

    Only the exception's type and stack reach the log, never its message: messages can quote
    request content.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            stack = "".join(traceback.format_tb(exc.__traceback__))
            logger.error("unhandled %s on %s\n%s", type(exc).__name__, scope.get("path"), stack)
            if started:
                raise  # uvicorn closes a connection whose response broke off half-way
            error = RequestError("internal_error", f"internal error ({type(exc).__name__}); "
                                 "the daemon's log has the details")
            response = JSONResponse(error.body(), status_code=500,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)

