"""A real Mosquitto broker on a free loopback port, started and killed by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.settings import MqttConfig
from edgerunner.runtime.engine.core import Engine
from edgerunner.runtime.health import Health, QueueHealth
from edgerunner.runtime.mqtt.session import SessionOptions, connect_async, new_client
from edgerunner.runtime.mqtt.transport import MqttTransport
from edgerunner.runtime.scheduler import Scheduler
from tests.runtime.conftest import loaded_engine

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Broker:
    """One Mosquitto process with a temp config; restartable on the same port and store."""

    def __init__(self, workdir: Path, port: int, extra: str = "") -> None:
        self.workdir = workdir
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.config = workdir / "mosquitto.conf"
        # As root Mosquitto drops to user "mosquitto" unless told otherwise; the temp store and
        # log would then be unwritable.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"{user}listener {port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir}/\n"
            f"log_dest file {workdir}/mosquitto.log\nlog_type all\n{extra}"
        )

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves the persistent store; SIGKILL does not)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _require_mosquitto() -> None:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(
            f"Mosquitto is not installed ({MOSQUITTO} missing): "
            "`apt-get install mosquitto` or `make test`, which installs it"
        )


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[type[Broker] | object]:
    """Make brokers (not started) with extra config lines; all are killed at teardown."""
    _require_mosquitto()
    made: list[Broker] = []

    def make(extra: str = "", start: bool = True) -> Broker:
        workdir = tmp_path / f"broker{len(made)}"
        workdir.mkdir()
        broker = Broker(workdir, free_port(), extra)
        made.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop(signal.SIGKILL)


@pytest.fixture
def broker(broker_factory) -> Broker:  # type: ignore[no-untyped-def]
    """A running broker, killed at teardown."""
    return broker_factory()  # type: ignore[no-any-return]


# -- the daemon side, in process: a real Engine and Scheduler behind an MqttTransport --------


def _engine(bundle: Path) -> Iterator[Engine]:
    manifest = BundleManifest.model_validate_json((bundle / "manifest.json").read_text())
    # the bundle's plan with a smaller window: two loaded engines stay cheap, none needs more
    plan = manifest.plan.model_copy(update={"n_ctx": 1024, "n_threads": 2})
    with loaded_engine(bundle / "model.gguf", plan, name=manifest.name) as engine:
        yield engine


@pytest.fixture(scope="session")
def mqtt_engine(rpi5_bundle: Path) -> Iterator[Engine]:
    """The rpi5 bundle's model, loaded once for the in-process MQTT tests."""
    yield from _engine(rpi5_bundle)


@pytest.fixture(scope="session")
def mqtt_engine_b(rpi5_bundle: Path) -> Iterator[Engine]:
    """A second loaded copy, for a second daemon in the pool tests."""
    yield from _engine(rpi5_bundle)


def _health(scheduler: Scheduler) -> Health:
    """What a daemon serving this scheduler reports (its own memory and CPU parts left out)."""
    return Health(state="ready", model=scheduler.model_name, loaded=scheduler.engine.loaded,
                  queue=QueueHealth(depth=scheduler.depth, max=scheduler.queue_depth,
                                    running=scheduler.running, slots=scheduler.slots))


@pytest.fixture
def serve(mqtt_engine: Engine) -> Iterator[Callable[..., MqttTransport]]:
    """Start MqttTransports over real schedulers; all are stopped at teardown."""
    started: list[tuple[MqttTransport, Scheduler]] = []

    def start(url: str, device_id: str = "dev1", *, engine: Engine | None = None,
              wait: bool = True, **fields: Any) -> MqttTransport:
        scheduler = Scheduler(engine or mqtt_engine, queue_depth=8, default_max_tokens=16)
        scheduler.start()
        fields.setdefault("reconnect_max_delay_s", 1)
        config = MqttConfig(url=url, device_id=device_id, **fields)
        transport = MqttTransport(config, scheduler, partial(_health, scheduler))
        transport.start()
        started.append((transport, scheduler))
        if wait:
            assert transport.device.wait_ready(10), "the transport did not connect"
            assert transport.pool is None or transport.pool.wait_ready(10)
        return transport

    yield start
    for transport, scheduler in started:
        scheduler.shutdown(0)
        transport.stop(1.0)


class Probe:
    """A plain paho v5 client that records what it receives (not its own publishes)."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.seen: list[paho.MQTTMessage] = []
        self._ready = threading.Event()
        self._client, address = new_client(url, SessionOptions(f"probe-{uuid.uuid4().hex[:8]}"))

        def on_connect(client: paho.Client, *args: Any) -> None:
            client.subscribe([(t, SubscribeOptions(qos=1, noLocal=True)) for t in topics])

        self._client.on_connect = on_connect
        self._client.on_subscribe = lambda *args: self._ready.set()
        self._client.on_message = lambda c, u, msg: self.messages.put(msg)
        connect_async(self._client, address, SessionOptions("unused"))
        self._client.loop_start()
        assert self._ready.wait(10), "probe could not subscribe"

    def publish(self, topic: str, payload: bytes | str, *, response_topic: str | None = None,
                correlation: bytes | None = None, expiry: int | None = None,
                retain: bool = False) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        self._client.publish(topic, payload, qos=1, retain=retain,
                             properties=props).wait_for_publish(5)

    def next(self, timeout: float = 60.0) -> paho.MQTTMessage:
        """The next message; fails the test if none arrives in time."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no MQTT message within {timeout} s")
        self.seen.append(msg)
        return msg

    def json(self, timeout: float = 60.0) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self.next(timeout).payload)
        return reply

    def quiet(self, seconds: float) -> list[paho.MQTTMessage]:
        """Whatever arrives within `seconds` (for asserting that nothing does)."""
        got = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def probe() -> Iterator[Callable[..., Probe]]:
    """Make Probes subscribed to topics; closed at teardown."""
    made: list[Probe] = []

    def make(url: str, *topics: str) -> Probe:
        made.append(Probe(url, list(topics)))
        return made[-1]

    yield make
    for p in made:
        p.close()


# -- a broker that does not speak v5, at the TCP boundary ---------------------------------------

# what a broker answers a v5 CONNECT it cannot serve with
REFUSALS = {
    "3.1.1 broker": b"\x20\x02\x00\x01",  # CONNACK, return code 1: unacceptable protocol version
    "v5 broker": b"\x20\x03\x00\x84\x00",  # CONNACK, reason 0x84, no properties
}


def _read_packet(sock: socket.socket) -> bytes:
    """One whole MQTT packet (fixed header, variable remaining length, body)."""
    head = sock.recv(1)
    if not head:
        return b""
    length, shift, raw = 0, 0, b""
    while True:
        byte = sock.recv(1)
        raw += byte
        length += (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        more = sock.recv(length - len(body))
        if not more:
            break
        body += more
    return head + raw + body


class V311Gate:
    """A TCP listener in front of Mosquitto that refuses MQTT v5 CONNECTs the way a 3.1.1-only
    broker (or a v5 broker refusing v5) does, and passes every other connection through."""

    def __init__(self, upstream_port: int, refusal: bytes) -> None:
        self.refusal = refusal
        self.upstream_port = upstream_port
        self.levels: list[int] = []  # protocol level of every CONNECT seen, in order
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _keep(self, sock: socket.socket) -> bool:
        """Track a socket for close(); False (and closed) if the gate is already closed."""
        with self._lock:
            if not self._closed:
                self._sockets.append(sock)
                return True
        sock.close()
        return False

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._keep(conn):
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            connect = _read_packet(conn)
            if not connect:
                return
            # after the fixed header: protocol name (2-byte length + "MQTT"), then the level
            body = connect[1:]
            while body[0] & 0x80:
                body = body[1:]
            level = body[1 + 2 + 4]
            self.levels.append(level)
            if level == 5:
                conn.sendall(self.refusal)
                conn.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            if not self._keep(upstream):
                return
            upstream.sendall(connect)
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
            self._pipe(conn, upstream)
        except OSError:
            pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        # shutdown wakes the thread blocked in accept(); close alone would not
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def v311_gate(broker: Broker) -> Iterator[Callable[[bytes], V311Gate]]:
    """Make gates in front of the running broker; closed at teardown."""
    made: list[V311Gate] = []

    def make(refusal: bytes) -> V311Gate:
        made.append(V311Gate(broker.port, refusal))
        return made[-1]

    yield make
    for gate in made:
        gate.close()
