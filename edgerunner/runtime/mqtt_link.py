"""One broker connection of the daemon: connect in the background, resubscribe on every connect,
and publish replies with a bounded backlog while the broker is away.

paho keeps unacknowledged QoS 1 messages and sends them again after it reconnects, so a reply
produced during a broker restart is delivered afterwards; the backlog bound keeps a long outage
from growing memory without limit (the transport then answers with an explicit error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgerunner.runtime.mqtt_reply import ReplyBacklogFull
from edgerunner.runtime.mqtt_session import (
    PROTOCOL_MAX_PACKET,
    SessionOptions,
    announced_max_packet,
    connect_async,
    new_client,
)
from edgerunner.runtime.mqtt_topics import BrokerAddress

logger = logging.getLogger(__name__)

OnMessage = Callable[["Link", paho.MQTTMessage], None]


class Link:
    """A paho client that keeps itself connected and subscribed."""

    def __init__(
        self,
        name: str,
        client: paho.Client,
        address: BrokerAddress,
        options: SessionOptions,
        *,
        subscriptions: list[str],
        on_message: OnMessage,
        on_up: Callable[[Link], None] = lambda link: None,  # connected and subscribed
        backlog_limit: int = 1000,
        reconnect_delay: tuple[int, int] = (1, 30),
    ) -> None:
        self.name = name
        self.client = client
        self.address = address
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
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(*reconnect_delay)

    @classmethod
    def build(cls, name: str, url: str, options: SessionOptions, **kwargs: Any) -> Link:
        """Construct the client for `url` with credentials/TLS from kwargs, then the Link."""
        creds = {k: kwargs.pop(k) for k in ("username", "password", "ca_file") if k in kwargs}
        client, address = new_client(url, options, **creds)
        return cls(name, client, address, options, **kwargs)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or `timeout` passed (False)."""
        return self._connected.wait(timeout)

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
        self._stopping = True
        props = None
        if end_session and self.v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self._connected.clear()

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            logger.error("mqtt %s: broker %s refused the connection: %s", self.name,
                         self.address.host, reason)
            return
        self.connects += 1
        self.max_packet = announced_max_packet(properties) if self.v5 else PROTOCOL_MAX_PACKET
        logger.info("mqtt %s: connected to %s (session present: %s, max packet %d)", self.name,
                    self.address.host, flags.session_present, self.max_packet)
        self._connected.set()
        if self._subscriptions:
            _, self._sub_mid = client.subscribe([(topic, 1) for topic in self._subscriptions])
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
        try:
            self._on_message_cb(self, msg)
        except Exception:  # a bad message must never stop the network loop
            logger.exception("mqtt %s: handling a message on %s failed", self.name, msg.topic)
