"""The MQTT transport: IoT apps send prompts through a broker, a fleet shares a pool topic.

    edgerunner/<device>/request   device-addressed (persistent session, fixed client id, QoS 1)
    edgerunner/pool/request       $share/edgerunner/... on a second, clean short-expiry session
    edgerunner/<device>/cancel    {"id": ...}: the request id, its CorrelationData, or reply id
    edgerunner/<device>/status    retained online/offline (Last Will)
    edgerunner/<device>/info      retained JSON, re-published on every connect and periodically

Requests go through `protocol.parse_request` and `Scheduler.submit`, like HTTP; replies are
built by `mqtt_reply`. Transports never touch llama.cpp.

`Scheduler.submit` renders the chat template, tokenizes and compiles json_schema grammars, which
can take a while; paho's network thread only reads and enqueues, and one admission thread
submits in arrival order, so keep-alives, PUBACKs and cancels keep flowing meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from pydantic import BaseModel, ConfigDict, Field

from edgerunner.bundle.settings import MqttConfig
from edgerunner.runtime.health import Health, InfoProvider, ServedModel
from edgerunner.runtime.mqtt import homeassistant
from edgerunner.runtime.mqtt.link import Link
from edgerunner.runtime.mqtt.reply import (
    PACKET_OVERHEAD,
    Replier,
    ReplyRoute,
    ReplyStream,
    encode,
)
from edgerunner.runtime.mqtt.request import read_request
from edgerunner.runtime.mqtt.session import SessionOptions
from edgerunner.runtime.mqtt.topics import (
    POOL_SUBSCRIPTION,
    DeviceTopics,
    SeenIds,
    check_device_id,
    parse_broker_url,
    redact_url,
)
from edgerunner.runtime.protocol import (
    ChatCompletionRequest,
    RequestError,
    decode_json,
)
from edgerunner.runtime.scheduler import Job, Scheduler

logger = logging.getLogger(__name__)

ADMISSION_STOP_S = 5.0  # how long stop() waits for a submit already in progress
_MAX_CANCEL_BYTES = 4096
_OVERSIZE_FACTOR = 16  # v5 Maximum Packet Size = this many times mqtt.max_payload_bytes
_SHUTTING_DOWN = "the daemon is shutting down; retry on another device"


@dataclass
class _Ticket:
    """One request from arrival until its final reply: waiting for admission, then a job."""

    replier: Replier
    route: ReplyRoute
    request: ChatCompletionRequest
    sink: ReplyStream
    deadline: float | None  # from Message Expiry, counted from arrival, not from admission
    keys: list[str] = field(default_factory=list)  # names a cancel may use
    seen_key: str = ""  # what a redelivery of its message is recognised by
    # acknowledge its message(s) to the broker: only once answered, so a request the daemon
    # dies with is delivered again after the restart
    acks: list[Callable[[], None]] = field(default_factory=list)
    claimed: bool = False  # the admission thread has taken it
    cancelled: bool = False
    finished: bool = False  # its final reply was handed to the broker session
    job: Job | None = None


class MqttInfo(BaseModel):
    """The broker sessions in use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: str = Field("5", description="MQTT protocol in use (5 or 3.1.1)")
    pool: bool = Field(False, description="Also serving the pool topic")


class DeviceInfo(Health):
    """The retained info topic: the daemon's Health, and who and how on the broker."""

    queue_depth: int = Field(0, ge=0, description="Requests waiting (queue.depth)")
    device_id: str = Field("", description="This device's topic level")
    mqtt: MqttInfo = Field(default_factory=MqttInfo)


def default_device_id() -> str:
    """The host name, made safe for a topic level."""
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64] or "edgerunner"


class MqttTransport:
    """Serves the scheduler over MQTT: two broker sessions, replies, cancel, status and info."""

    def __init__(
        self, config: MqttConfig, scheduler: Scheduler, info_provider: InfoProvider,
        served: ServedModel | None = None,
    ) -> None:
        if not config.url:
            raise ValueError("MqttTransport needs config.url")
        self.config = config
        self.scheduler = scheduler
        self.info_provider = info_provider
        self.device_id = check_device_id(config.device_id or default_device_id())
        self.topics = DeviceTopics(self.device_id)
        self.homeassistant = homeassistant.discovery_for(config, self.device_id, scheduler,
                                                          served)
        self._seen = SeenIds()
        # every unanswered request by each name a cancel may use; the lock also orders
        # enqueueing against stop() closing the admission queue
        self._tickets: dict[str, _Ticket] = {}
        self._jobs_lock = threading.Lock()
        self._admission: queue.Queue[_Ticket | None] = queue.Queue()
        # bounded by hand (queue.Queue(maxsize) would block stop()'s end marker); waiting
        # beyond the scheduler's own queue depth would only end in `busy` there
        self.admission_limit = scheduler.queue_depth
        self._closed = False
        self._admission_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._info_thread: threading.Thread | None = None

        client_id = config.client_id or f"edgerunner-{self.device_id}"
        common: dict[str, Any] = {
            "username": config.username, "password": config.secret(), "ca_file": config.ca_file,
            "on_message": self._on_message, "backlog_limit": config.reply_backlog,
            "reconnect_delay": (1, config.reconnect_max_delay_s),
        }
        # v5: the broker drops (for us) anything far over the payload limit, so a huge message
        # is never read into memory; up to that, an oversized request gets an error reply
        limits: dict[str, Any] = {
            "manual_ack": True,
            "max_packet_in": _OVERSIZE_FACTOR * config.max_payload_bytes + 65_536,
        }
        device_options = SessionOptions(
            client_id=client_id, protocol=config.protocol, persistent=True,
            session_expiry_s=config.session_expiry_s, keepalive_s=config.keepalive_s, **limits)
        self.device = Link(
            "device", config.url, device_options,
            subscriptions=[self.topics.request, self.topics.cancel], on_up=self._announce,
            will=(self.topics.status, b"offline"), **common)
        self.pool: Link | None = None
        if config.pool:
            pool_options = SessionOptions(
                client_id=f"{client_id}-pool", protocol=config.protocol, persistent=False,
                session_expiry_s=config.pool_session_expiry_s, keepalive_s=config.keepalive_s,
                **limits)
            self.pool = Link("pool", config.url, pool_options,
                             subscriptions=[POOL_SUBSCRIPTION], on_up=self._announce, **common)

    @property
    def connected(self) -> bool:
        """True while the device session is up and subscribed (and the pool one, if any)."""
        return self.device.subscribed and (self.pool is None or self.pool.subscribed)

    def start(self) -> None:
        """Connect in the background (the broker may still be down) and return at once."""
        logger.info("mqtt: serving device %s via %s", self.device_id,
                    redact_url(self.config.url or ""))
        if parse_broker_url(self.config.url or "").password is not None:
            logger.warning("mqtt: the broker URL carries a password, which the process list "
                           "shows to every user; use mqtt.password_file or "
                           "EDGERUNNER_MQTT__PASSWORD instead")
        self._admission_thread = threading.Thread(
            target=self._admit_loop, name="edgerunner-mqtt-admission", daemon=True)
        self._admission_thread.start()
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
        # requests still waiting for admission are answered `cancelled` before the links drain
        with self._jobs_lock:
            self._closed = True
            self._admission.put(None)
        if self._admission_thread is not None:
            self._admission_thread.join(min(ADMISSION_STOP_S, max(0.1, end - time.monotonic())))
            if self._admission_thread.is_alive():
                logger.warning("mqtt: a request was still being admitted when stopping")
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
        if self.homeassistant is not None:
            self.homeassistant.announce(self.device.publish)
        self.device.publish(self.topics.status, b"online", retain=True)
        self._publish_info()

    def _publish_info(self) -> None:
        try:
            health = self.info_provider()
        except Exception:
            logger.exception("mqtt: the info provider failed; info not published")
            return
        info = DeviceInfo(
            **health.model_dump(), queue_depth=health.queue.depth, device_id=self.device_id,
            # the protocol in use: a v5 configuration may have fallen back to 3.1.1
            mqtt=MqttInfo(protocol=self.device.options.protocol, pool=self.pool is not None))
        payload = encode(info.model_dump(mode="json"))
        if len(payload) + len(self.topics.info) + PACKET_OVERHEAD > self.device.max_packet:
            # the broker would end the session for it, and again after every reconnect
            logger.warning("mqtt: info (%d bytes) is over the broker's maximum packet size "
                           "(%d); not published", len(payload), self.device.max_packet)
        else:
            self.device.publish(self.topics.info, payload, retain=True)
        if self.homeassistant is not None:
            homeassistant.publish_state(self.homeassistant, self.device.publish, health,
                                        self.scheduler)

    def _info_loop(self) -> None:
        while not self._stop.wait(self.config.info_interval_s):
            if self.device.connected:
                self._publish_info()

    # -- requests -----------------------------------------------------------------------------

    def _on_message(self, link: Link, msg: paho.MQTTMessage) -> bool:
        """Handle one message; True when its acknowledgement waits for the final reply."""
        payload = bytes(msg.payload)
        if msg.topic == self.topics.cancel:
            self._cancel(payload)
            return False
        if not payload and getattr(getattr(msg, "properties", None), "ResponseTopic",
                                   None) is None:
            # a retained request being cleared (ours too) reaches subscribers as an empty
            # message; one with a reply topic is a request, and is answered invalid below
            logger.debug("mqtt: empty message on %s ignored", msg.topic)
            return False
        incoming = read_request(
            payload, getattr(msg, "properties", None), v5=link.v5,
            max_payload_bytes=self.config.max_payload_bytes,
            allowed_prefixes=self.config.allowed_reply_prefixes)
        replier = Replier(link.publish_reply, lambda: link.max_packet,
                          self.config.max_payload_bytes, log_messages=self.scheduler.log_prompts)
        if msg.retain:
            # the broker keeps it and hands it over on every (re)subscribe: running it would
            # repeat its action on every restart. Refused, and cleared from our own topic
            self._refuse_retained(link, msg, replier, incoming.route)
            return False
        if incoming.route is None:
            logger.warning("mqtt: request on %s dropped: %s", msg.topic, incoming.dropped)
            return False
        route = incoming.route
        seen_key = self._redelivery_key(route, payload)
        if msg.dup and seen_key in self._seen:
            self._redelivered(link, msg, seen_key)
            return True
        self._seen.first_time(seen_key)
        if incoming.error is not None:
            replier.send_error(route, incoming.error)
            return False
        assert incoming.request is not None
        self._enqueue(replier, route, incoming.request, incoming.expiry_s,
                      seen_key, lambda: link.ack(msg))
        return True

    @staticmethod
    def _redelivery_key(route: ReplyRoute, payload: bytes) -> str:
        # a redelivery repeats the message exactly: reply route and payload
        digest = hashlib.sha256(payload).hexdigest()[:32]
        return f"{route.key() or route.topic}:{digest}"

    def _redelivered(self, link: Link, msg: paho.MQTTMessage, seen_key: str) -> None:
        """A DUP redelivery of a request already taken: acknowledged once that one is answered."""
        with self._jobs_lock:
            ticket = next((t for t in self._tickets.values()
                           if t.seen_key == seen_key and not t.finished), None)
            if ticket is not None:
                ticket.acks.append(lambda: link.ack(msg))
        logger.info("mqtt: redelivery of a request already %s ignored",
                    "in progress" if ticket is not None else "answered")
        if ticket is None:
            link.ack(msg)

    def _refuse_retained(self, link: Link, msg: paho.MQTTMessage, replier: Replier,
                         route: ReplyRoute | None) -> None:
        error = RequestError(
            "invalid_request",
            "retained request messages are refused (the broker would replay them on every "
            "restart); publish requests with retain=false")
        if route is not None:
            replier.send_error(route, error)
        else:
            logger.warning("mqtt: retained request on %s refused (no reply topic)", msg.topic)
        if msg.topic == self.topics.request:  # ours to clean; other topics are not
            link.publish(msg.topic, b"", retain=True)  # an empty retained message clears it

    def _enqueue(self, replier: Replier, route: ReplyRoute, request: ChatCompletionRequest,
                 expiry_s: float | None, seen_key: str = "",
                 ack: Callable[[], None] | None = None) -> None:
        # Message Expiry: a request that expires while waiting is answered, not generated
        deadline = time.monotonic() + expiry_s if expiry_s is not None else None
        ticket: _Ticket
        sink = ReplyStream(replier, route, model=self.scheduler.model_name, stream=request.stream,
                           interval=self.config.stream_interval_s,
                           on_final=lambda: self._answered(ticket))
        ticket = _Ticket(replier, route, request, sink, deadline,
                         keys=[k for k in (route.client_ref, sink.id) if k], seen_key=seen_key,
                         acks=[ack] if ack is not None else [])
        refusal: RequestError | None = None
        with self._jobs_lock:
            waiting = self._admission.qsize()
            if self._closed:
                refusal = RequestError("cancelled", _SHUTTING_DOWN)
            elif waiting >= self.admission_limit:
                refusal = self.scheduler.busy_error(waiting)
            else:
                for k in ticket.keys:
                    self._tickets[k] = ticket
                self._admission.put(ticket)
        if refusal is not None:
            self._fail(ticket, refusal)

    def _admit_loop(self) -> None:
        while (ticket := self._admission.get()) is not None:
            with self._jobs_lock:
                if ticket.cancelled:  # already answered by _cancel
                    continue
                ticket.claimed = True
                closed = self._closed
            if closed:
                self._fail(ticket, RequestError("cancelled", _SHUTTING_DOWN))
                continue
            try:
                self._admit(ticket)
            except Exception:  # the admission thread must outlive any one request
                logger.exception("mqtt: admitting a request failed")

    def _admit(self, ticket: _Ticket) -> None:
        try:
            job = self.scheduler.submit(ticket.request, sink=ticket.sink,
                                        deadline=ticket.deadline, job_id=ticket.sink.id)
        except RequestError as exc:
            self._fail(ticket, exc)
            return
        except Exception as exc:  # never leave a request unanswered
            logger.exception("mqtt: submitting a request failed")
            self._fail(ticket, RequestError(
                "internal_error",
                f"the daemon could not queue the request ({type(exc).__name__})"))
            return
        with self._jobs_lock:
            cancel_now = ticket.cancelled
            if not ticket.finished:
                ticket.job = job
        if cancel_now:  # the cancel came while the request was being admitted
            job.cancel()

    def _forget(self, ticket: _Ticket, *, ack: bool = True) -> list[Callable[[], None]]:
        """The ticket got its final reply: drop its names and acknowledge its message(s)
        (or, with ack=False, return the acknowledgements for the caller to send)."""
        with self._jobs_lock:
            ticket.finished = True
            for k in ticket.keys:
                if self._tickets.get(k) is ticket:
                    del self._tickets[k]
            acks, ticket.acks = ticket.acks, []
        if not ack:
            return acks
        for send_ack in acks:
            send_ack()
        return []

    def _answered(self, ticket: _Ticket) -> None:
        self._forget(ticket)

    def _fail(self, ticket: _Ticket, error: RequestError) -> None:
        """Answer the ticket with an error, then acknowledge its message."""
        acks = self._forget(ticket, ack=False)
        ticket.replier.send_error(ticket.route, error)
        for send_ack in acks:
            send_ack()

    def _cancel(self, payload: bytes) -> None:
        try:
            if len(payload) > _MAX_CANCEL_BYTES:
                raise ValueError("too long")
            body = decode_json(payload, "cancel payload")
            target = str(body["id"])
        except (RequestError, ValueError, TypeError, KeyError):
            logger.warning("mqtt: cancel payload (%d bytes) is not {\"id\": ...}; ignored",
                           len(payload))
            return
        with self._jobs_lock:
            ticket = self._tickets.get(target)
            if ticket is None or ticket.cancelled:
                ticket = None
            else:
                ticket.cancelled = True
                job = ticket.job
                unadmitted = not ticket.claimed
        if ticket is None:
            logger.info("mqtt: cancel for an unknown or finished request")
            return
        logger.info("mqtt: cancelling %s", ticket.sink.id)
        if job is not None:
            job.cancel()
        elif unadmitted:  # still waiting for admission: answered here, never submitted
            self._fail(ticket, RequestError(
                "cancelled", "the request was cancelled before it started"))
        # otherwise it is being admitted right now; _admit cancels the job it gets
