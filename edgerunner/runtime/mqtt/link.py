"""One broker connection of the daemon: connect in the background, resubscribe on every connect,
and publish replies with a bounded backlog while the broker is away.

paho keeps unacknowledged QoS 1 messages and sends them again after it reconnects, so a reply
produced during a broker restart is delivered afterwards; the backlog bound keeps a long outage
from growing memory without limit (the transport then answers with an explicit error).

Incoming QoS 1 messages are acknowledged by hand: a request only once it was answered, so a
request in flight when the daemon dies is delivered again after the restart (the persistent
session keeps it). v5 subscriptions keep the retain flag as published, so the transport can
tell a retained request from a live one.

A v5 link whose broker answers CONNECT with "unsupported protocol version" (a 3.1.1-only
broker) replaces its client with a 3.1.1 one, once, and stays on 3.1.1 from then on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgerunner.runtime.mqtt.reply import ReplyBacklogFull
from edgerunner.runtime.mqtt.session import (
    PROTOCOL_MAX_PACKET,
    SessionOptions,
    announced_max_packet,
    connect_async,
    new_client,
    refuses_v5,
)
from edgerunner.runtime.mqtt.topics import BrokerAddress

logger = logging.getLogger(__name__)

# returns True when it keeps the message to acknowledge later (Link.ack, once answered)
OnMessage = Callable[["Link", paho.MQTTMessage], bool]


class Link:
    """A paho client that keeps itself connected and subscribed."""

    def __init__(
        self,
        name: str,
        url: str,
        options: SessionOptions,
        *,
        subscriptions: list[str],
        on_message: OnMessage,
        on_up: Callable[[Link], None] = lambda link: None,  # connected and subscribed
        will: tuple[str, bytes] | None = None,  # retained QoS 1 Last Will (topic, payload)
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        backlog_limit: int = 1000,
        reconnect_delay: tuple[int, int] = (1, 30),
    ) -> None:
        self.name = name
        self.url = url
        self._credentials: dict[str, Any] = {
            "username": username, "password": password, "ca_file": ca_file}
        self._will = will
        self._reconnect_delay = reconnect_delay
        self.options = options
        self.v5 = options.protocol == "5"
        self.max_packet = PROTOCOL_MAX_PACKET
        self.connects = 0
        self._subscriptions = subscriptions
        self._on_up = on_up
        self._on_message_cb = on_message
        self._backlog_limit = backlog_limit
        self._outstanding = 0  # QoS 1 replies published but not yet acknowledged
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None
        self._stopping = False
        self.client, self.address = self._new_client()

    def _new_client(self) -> tuple[paho.Client, BrokerAddress]:
        client, address = new_client(self.url, self.options, **self._credentials)
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(*self._reconnect_delay)
        return client, address

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """Block until connected and subscribed (True) or `timeout` passed (False)."""
        return self._subscribed.wait(timeout)

    @property
    def subscribed(self) -> bool:
        """True once the broker acknowledged this connection's subscriptions."""
        return self._subscribed.is_set()

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def start(self) -> None:
        """Connect in the background; returns at once even if the broker is down."""
        connect_async(self.client, self.address, self.options)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None,
                *, final: bool = True, retain: bool = False) -> paho.MQTTMessageInfo:
        """Publish at QoS 1; a non-final message raises ReplyBacklogFull if the backlog is full."""
        with self._lock:
            if not final and self._outstanding >= self._backlog_limit:
                raise ReplyBacklogFull(f"{self._outstanding} replies wait for the broker")
            self._outstanding += 1
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            with self._lock:
                self._outstanding -= 1
            logger.warning("mqtt %s: publish to %s failed: %s", self.name, topic,
                           paho.error_string(info.rc))
        return info

    def publish_reply(self, topic: str, payload: bytes, properties: Properties | None,
                      *, final: bool) -> None:
        """The `mqtt_reply.Publisher` of this link."""
        self.publish(topic, payload, properties, final=final)

    def drain(self, timeout: float) -> bool:
        """Wait until every published message was acknowledged (True) or `timeout` passed."""
        end = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < end and self.connected:
            time.sleep(0.02)
        return self.outstanding == 0

    def stop(self, end_session: bool = False) -> None:
        """Disconnect cleanly (no Last Will); `end_session` drops a v5 session at once."""
        with self._lock:  # no protocol fallback swaps the client from here on
            self._stopping = True
            client, v5 = self.client, self.v5
        props = None
        if end_session and v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        client.disconnect(properties=props)
        client.loop_stop()
        self._connected.clear()

    def _fall_back_to_311(self, refused: paho.Client) -> None:
        # runs on the refused client's network thread: that loop closes its socket and ends
        # once this callback returns, so only flag it; the new client gets its own thread
        refused.loop_stop()
        with self._lock:
            if self._stopping:
                return
            self.options = dataclasses.replace(self.options, protocol="3.1.1")
            self.v5 = False
            self.client, self.address = self._new_client()
            connect_async(self.client, self.address, self.options)
            self.client.loop_start()
        logger.warning("mqtt %s: broker %s does not support MQTT v5; reconnecting with MQTT "
                       "3.1.1 (set mqtt.protocol = \"3.1.1\" to skip the v5 attempt)",
                       self.name, self.address.host)

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            if refuses_v5(reason) and client is self.client and self.v5:
                self._fall_back_to_311(client)
                return
            logger.error("mqtt %s: broker %s refused the connection: %s", self.name,
                         self.address.host, reason)
            return
        self.connects += 1
        self.max_packet = announced_max_packet(properties) if self.v5 else PROTOCOL_MAX_PACKET
        logger.info("mqtt %s: connected to %s (session present: %s, max packet %d)", self.name,
                    self.address.host, flags.session_present, self.max_packet)
        self._connected.set()
        if self._subscriptions:
            qos: Any = SubscribeOptions(qos=1, retainAsPublished=True) if self.v5 else 1
            _, self._sub_mid = client.subscribe([(topic, qos) for topic in self._subscriptions])
        else:
            self._subscribed.set()
            self._on_up(self)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        if mid != self._sub_mid:
            return
        refused = [r for r in reasons if r.is_failure]
        if refused:
            logger.error("mqtt %s: the broker refused subscriptions %s: %s", self.name,
                         self._subscriptions, refused)
            return
        self._subscribed.set()
        self._on_up(self)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Properties | None) -> None:
        if client is not self.client:
            return  # the client a protocol fallback replaced, closing its socket
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was and not self._stopping:
            logger.warning("mqtt %s: disconnected (%s); reconnecting with backoff",
                           self.name, reason)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._outstanding = max(0, self._outstanding - 1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        held = False
        try:
            held = self._on_message_cb(self, msg)
        except Exception:  # a bad message must never stop the network loop
            logger.exception("mqtt %s: handling a message on %s failed", self.name, msg.topic)
        finally:
            if not held:
                client.ack(msg.mid, msg.qos)

    def ack(self, msg: paho.MQTTMessage) -> None:
        """Acknowledge a message the transport kept (a no-op for QoS 0)."""
        if msg.qos:
            with self._lock:
                client = self.client
            client.ack(msg.mid, msg.qos)
