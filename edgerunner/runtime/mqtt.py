"""The MQTT transport: IoT apps send prompts through a broker, a fleet shares a pool topic.

    edgerunner/<device>/request   device-addressed (persistent session, fixed client id, QoS 1)
    edgerunner/pool/request       $share/edgerunner/... on a second, clean short-expiry session
    edgerunner/<device>/cancel    {"id": ...}: the request id, its CorrelationData, or reply id
    edgerunner/<device>/status    retained online/offline (Last Will)
    edgerunner/<device>/info      retained JSON, re-published on every connect and periodically

Requests go through `protocol.parse_request` and `Scheduler.submit`, like HTTP; replies are
built by `mqtt_reply`. Transports never touch llama.cpp.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from edgerunner import __version__
from edgerunner.runtime.config import MqttConfig
from edgerunner.runtime.mqtt_link import Link
from edgerunner.runtime.mqtt_reply import Replier, ReplyRoute, ReplyStream, encode
from edgerunner.runtime.mqtt_request import read_request
from edgerunner.runtime.mqtt_session import SessionOptions
from edgerunner.runtime.mqtt_topics import (
    POOL_SUBSCRIPTION,
    DeviceTopics,
    SeenIds,
    check_device_id,
)
from edgerunner.runtime.protocol import RequestError
from edgerunner.runtime.scheduler import Job, Scheduler

logger = logging.getLogger(__name__)

InfoProvider = Callable[[], dict[str, Any]]


def default_device_id() -> str:
    """The host name, made safe for a topic level."""
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64] or "edgerunner"


class MqttTransport:
    """Serves the scheduler over MQTT: two broker sessions, replies, cancel, status and info."""

    def __init__(
        self, config: MqttConfig, scheduler: Scheduler, info_provider: InfoProvider
    ) -> None:
        if not config.url:
            raise ValueError("MqttTransport needs config.url")
        self.config = config
        self.scheduler = scheduler
        self.info_provider = info_provider
        self.device_id = check_device_id(config.device_id or default_device_id())
        self.topics = DeviceTopics(self.device_id)
        self._seen = SeenIds()
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self._stop = threading.Event()
        self._info_thread: threading.Thread | None = None

        client_id = config.client_id or f"edgerunner-{self.device_id}"
        common: dict[str, Any] = {
            "username": config.username, "password": config.password, "ca_file": config.ca_file,
            "on_message": self._on_message, "backlog_limit": config.reply_backlog,
            "reconnect_delay": (1, config.reconnect_max_delay_s),
        }
        device_options = SessionOptions(
            client_id=client_id, protocol=config.protocol, persistent=True,
            session_expiry_s=config.session_expiry_s, keepalive_s=config.keepalive_s)
        self.device = Link(
            "device", config.url, device_options,
            subscriptions=[self.topics.request, self.topics.cancel], on_up=self._announce,
            will=(self.topics.status, b"offline"), **common)
        self.pool: Link | None = None
        if config.pool:
            pool_options = SessionOptions(
                client_id=f"{client_id}-pool", protocol=config.protocol, persistent=False,
                session_expiry_s=config.pool_session_expiry_s, keepalive_s=config.keepalive_s)
            self.pool = Link("pool", config.url, pool_options,
                             subscriptions=[POOL_SUBSCRIPTION], on_up=self._announce, **common)

    @property
    def connected(self) -> bool:
        """True while the device session is up and subscribed (and the pool one, if any)."""
        return self.device.subscribed and (self.pool is None or self.pool.subscribed)

    def start(self) -> None:
        """Connect in the background (the broker may still be down) and return at once."""
        logger.info("mqtt: serving device %s via %s", self.device_id, self.config.url)
        self.device.start()
        if self.pool is not None:
            self.pool.start()
        self._info_thread = threading.Thread(target=self._info_loop, name="edgerunner-mqtt-info",
                                             daemon=True)
        self._info_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline`, let queued replies reach the broker, disconnect without the Will."""
        self._stop.set()
        end = time.monotonic() + timeout
        if self.pool is not None:
            self.pool.drain(max(0.0, end - time.monotonic()))
            self.pool.stop(end_session=True)
        if self.device.connected:
            info = self.device.publish(self.topics.status, b"offline", retain=True)
            try:
                info.wait_for_publish(max(0.1, end - time.monotonic()))
            except (RuntimeError, ValueError):
                logger.warning("mqtt: could not publish offline status before stopping")
        self.device.drain(max(0.0, end - time.monotonic()))
        self.device.stop()
        if self._info_thread is not None:
            self._info_thread.join(timeout=1.0)

    # -- status and info ----------------------------------------------------------------------

    def _announce(self, link: Link) -> None:
        # "online" means ready for work: both sessions connected and subscribed, so a client
        # that waits for it does not publish to a pool nobody subscribes to yet
        if not (self.device.subscribed and (self.pool is None or self.pool.subscribed)):
            return
        self.device.publish(self.topics.status, b"online", retain=True)
        self._publish_info()

    def _publish_info(self) -> None:
        try:
            info = dict(self.info_provider())
        except Exception:
            logger.exception("mqtt: the info provider failed; info not published")
            return
        info.setdefault("version", __version__)
        info.setdefault("model", self.scheduler.model_name)
        info.setdefault("queue_depth", self.scheduler.depth)
        info["device_id"] = self.device_id
        # the protocol in use: a v5 configuration may have fallen back to 3.1.1
        info["mqtt"] = {"protocol": self.device.options.protocol, "pool": self.pool is not None}
        self.device.publish(self.topics.info, encode(info), retain=True)

    def _info_loop(self) -> None:
        while not self._stop.wait(self.config.info_interval_s):
            if self.device.connected:
                self._publish_info()

    # -- requests -----------------------------------------------------------------------------

    def _on_message(self, link: Link, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics.cancel:
            self._cancel(bytes(msg.payload))
            return
        incoming = read_request(
            bytes(msg.payload), getattr(msg, "properties", None), v5=link.v5,
            max_payload_bytes=self.config.max_payload_bytes,
            allowed_prefixes=self.config.allowed_reply_prefixes)
        if incoming.route is None:
            logger.warning("mqtt: request on %s dropped: %s", msg.topic, incoming.dropped)
            return
        route = incoming.route
        key = route.key()
        if key is not None and not self._seen.first_time(key):
            logger.info("mqtt: duplicate delivery of %s ignored", key)
            return
        replier = Replier(link.publish_reply, lambda: link.max_packet,
                          self.config.max_payload_bytes)
        if incoming.error is not None:
            replier.send_error(route, incoming.error)
            return
        assert incoming.request is not None
        self._submit(replier, route, incoming.request, incoming.expiry_s)

    def _submit(self, replier: Replier, route: ReplyRoute, request: Any,
                expiry_s: float | None) -> None:
        keys: list[str] = []
        done = threading.Event()

        def forget() -> None:
            done.set()
            with self._jobs_lock:
                for k in keys:
                    self._jobs.pop(k, None)

        sink = ReplyStream(replier, route, model=self.scheduler.model_name, stream=request.stream,
                           interval=self.config.stream_interval_s, on_final=forget)
        # Message Expiry: a request that expires while queued is answered, not generated
        deadline = time.monotonic() + expiry_s if expiry_s is not None else None
        try:
            job = self.scheduler.submit(request, sink=sink, deadline=deadline)
        except RequestError as exc:
            replier.send_error(route, exc)
            return
        except Exception as exc:  # never leave a request unanswered
            logger.exception("mqtt: submitting a request failed")
            replier.send_error(route, RequestError(
                "internal_error", f"the daemon could not queue the request: {exc}"))
            return
        with self._jobs_lock:
            if not done.is_set():
                keys.extend(k for k in (route.client_ref, sink.id, job.id) if k)
                for k in keys:
                    self._jobs[k] = job

    def _cancel(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
            target = str(body["id"])
        except (ValueError, TypeError, KeyError):
            logger.warning("mqtt: cancel payload must be {\"id\": ...}; got %r", payload[:200])
            return
        with self._jobs_lock:
            job = self._jobs.get(target)
        if job is None:
            logger.info("mqtt: cancel for unknown or finished request %s", target)
            return
        logger.info("mqtt: cancelling %s", target)
        job.cancel()
