"""Building paho clients: protocol version, TLS, credentials, unix sockets, session options.

The daemon's transport and `edgerunner ask --mqtt` build their clients here, so a broker URL
means the same thing on both sides.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgerunner.errors import ConfigError
from edgerunner.runtime.mqtt.topics import BrokerAddress, parse_broker_url, redact_url

logger = logging.getLogger(__name__)

# MQTT's own ceiling for a packet, used when the broker announces none (always so in 3.1.1)
PROTOCOL_MAX_PACKET = 268_435_455
# CONNACK "Unsupported Protocol Version": v5 reason 0x84; paho 2.x also reports a 3.1.1 broker's
# return code 1 to a v5 CONNECT as this reason (paho.mqtt._packet.decode_connack)
UNSUPPORTED_PROTOCOL_VERSION = 0x84

Protocol = Literal["5", "3.1.1"]


@dataclass(frozen=True)
class SessionOptions:
    """How one client connects: who it is and how long the broker keeps its session."""

    client_id: str
    protocol: Protocol = "5"
    persistent: bool = False  # keep subscriptions and queued QoS 1 messages while offline
    session_expiry_s: int = 0  # v5: how long the broker keeps the session after a disconnect
    keepalive_s: int = 60
    # acknowledge QoS 1 messages by hand (Client.ack), not when on_message returns
    manual_ack: bool = False
    # v5: the broker must not send this client packets larger than this (None: no limit)
    max_packet_in: int | None = None


def new_client(
    url: str,
    options: SessionOptions,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
) -> tuple[paho.Client, BrokerAddress]:
    """A configured, unconnected paho client for `url` (call connect_async + loop_start)."""
    address = parse_broker_url(url)
    v5 = options.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=options.client_id,
        # 3.1.1 has one flag for "keep my session"; v5 says it in connect() instead
        clean_session=None if v5 else not options.persistent,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        transport=address.transport,
        manual_ack=options.manual_ack,
    )
    client.on_socket_open = _no_delay
    user = username if username is not None else address.username
    secret = password if password is not None else address.password
    if user is not None:
        client.username_pw_set(user, secret)
    if address.tls:
        try:
            client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot set up TLS for {redact_url(url)}: {exc}",
                hint="check mqtt.ca_file points to a readable PEM CA certificate",
            ) from exc
    elif ca_file is not None:
        logger.warning("mqtt.ca_file is set but %s is not mqtts://; TLS stays off",
                       redact_url(url))
    return client, address


def _no_delay(client: paho.Client, userdata: object, sock: object) -> None:
    # paho leaves Nagle on: a request published right after the PUBACK of a reply then waits
    # for the broker's delayed ACK (40 ms on Linux) before it leaves
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_async(client: paho.Client, address: BrokerAddress, options: SessionOptions) -> None:
    """Start connecting in the background; paho's loop retries until the broker answers."""
    if options.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = options.session_expiry_s
        if options.max_packet_in is not None:
            props.MaximumPacketSize = min(options.max_packet_in, PROTOCOL_MAX_PACKET)
        # persistent: resume the session on every connect; otherwise clean on the first
        # connect only, so a short broker blip does not lose the short-lived session
        clean: bool | Literal[3] = (
            False if options.persistent else paho.MQTT_CLEAN_START_FIRST_ONLY)
        client.connect_async(address.host, address.port, options.keepalive_s,
                             clean_start=clean, properties=props)
    else:
        client.connect_async(address.host, address.port, options.keepalive_s)


def refuses_v5(reason: ReasonCode) -> bool:
    """True when a CONNACK says the broker does not speak MQTT v5 (retry with 3.1.1)."""
    return reason.is_failure and reason.value == UNSUPPORTED_PROTOCOL_VERSION


def announced_max_packet(properties: Properties | None) -> int:
    """The broker's Maximum Packet Size from CONNACK properties (protocol maximum if absent)."""
    value = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
    return int(value) if value else PROTOCOL_MAX_PACKET
