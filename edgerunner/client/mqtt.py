"""Asking a device over MQTT: what `edgerunner ask --mqtt` and IoT apps use.

    with MqttChat("mqtt://broker:1883", device_id="kitchen-pi") as chat:
        reply = chat.complete({"messages": [{"role": "user", "content": "hi"}]})
        print(reply["choices"][0]["message"]["content"])

Each request gets its own reply topic under edgerunner/reply/<client>/; v5 requests carry a
ResponseTopic and CorrelationData, 3.1.1 requests put `reply_to` and `id` in the body.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgerunner.errors import ClientError
from edgerunner.runtime.mqtt.session import (
    Protocol,
    SessionOptions,
    connect_async,
    new_client,
    refuses_v5,
)
from edgerunner.runtime.mqtt.topics import (
    DEFAULT_REPLY_PREFIX,
    POOL_TOPIC,
    BrokerAddress,
    DeviceTopics,
    check_device_id,
)

logger = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 16  # v5 PUBACK reason code


class RemoteError(ClientError):
    """The device answered with an error body."""

    def __init__(self, body: dict[str, Any]) -> None:
        detail = body.get("error", {})
        self.code = str(detail.get("code", "unknown"))
        self.body = body
        super().__init__(f"the device refused the request ({self.code}): "
                         f"{detail.get('message', body)}")


class MqttChat:
    """A connection to a broker for sending chat requests to one device (or the pool)."""

    def __init__(
        self,
        url: str,
        device_id: str | None = None,
        *,
        protocol: Protocol = "5",
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        timeout: float = 120.0,
        client_id: str | None = None,
    ) -> None:
        self.client_id = client_id or f"edgerunner-ask-{uuid.uuid4().hex[:12]}"
        self.request_topic = (
            DeviceTopics(check_device_id(device_id)).request if device_id else POOL_TOPIC)
        self.device_id = device_id
        self.reply_root = f"{DEFAULT_REPLY_PREFIX}{self.client_id}"
        self.timeout = timeout
        self._url = url
        self._credentials: dict[str, Any] = {
            "username": username, "password": password, "ca_file": ca_file}
        self._client, self._address = self._new_client(protocol)
        self._published: dict[int, str] = {}  # mid → request id, until the broker acknowledges
        self._early_acks: dict[int, int] = {}  # mid → reason, acknowledged before it was mapped
        self._subscribed = threading.Event()
        self._answered = threading.Event()  # the broker accepted or refused a CONNECT
        self._refused: ReasonCode | None = None
        self._inboxes: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _new_client(self, protocol: Protocol) -> tuple[paho.Client, BrokerAddress]:
        self.v5 = protocol == "5"
        # v5: a session (fresh client id, so nothing stale to resume) that the broker keeps for
        # 5 minutes, so replies sent while a restarted broker waits for us are kept; Mosquitto
        # only persists sessions whose CONNECT did not ask for a clean start
        self._options = SessionOptions(self.client_id, protocol, persistent=self.v5,
                                       session_expiry_s=300)
        client, address = new_client(self._url, self._options, **self._credentials)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.reconnect_delay_set(1, 5)
        return client, address

    def connect(self) -> MqttChat:
        """Connect and subscribe to this client's reply topics; ClientError if that fails.

        With protocol 5, a broker that does not support v5 is asked again with 3.1.1.
        """
        end = time.monotonic() + min(self.timeout, 30.0)
        connect_async(self._client, self._address, self._options)
        self._client.loop_start()
        while not self._subscribed.is_set() and (left := end - time.monotonic()) > 0:
            self._answered.wait(left)
            self._answered.clear()
            if self.v5 and self._refused is not None and refuses_v5(self._refused):
                logger.info("the broker %s does not support MQTT v5; using 3.1.1",
                            self._address.host)
                self._client.loop_stop()
                self._refused = None
                self._client, self._address = self._new_client("3.1.1")
                connect_async(self._client, self._address, self._options)
                self._client.loop_start()
        if not self._subscribed.is_set():
            self._client.loop_stop()
            why = self._refused or "no answer"
            raise ClientError(
                f"cannot connect to the MQTT broker {self._address.host}: {why}",
                hint="check the broker URL, that it is running, and the username/password")
        return self

    def close(self) -> None:
        """Disconnect, ending the session (nothing is left queued for us at the broker)."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    def __enter__(self) -> MqttChat:
        return self.connect()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------

    def send(self, body: dict[str, Any], request_id: str | None = None,
             expiry_s: int | None = None) -> str:
        """Publish a request without waiting; returns its id (use `replies` to read them)."""
        request_id = request_id or uuid.uuid4().hex
        topic = f"{self.reply_root}/{request_id}"
        with self._lock:
            self._inboxes[request_id] = queue.Queue()
        payload = dict(body)
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = topic
            props.CorrelationData = request_id.encode()
            props.ContentType = "application/json"
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        else:
            payload.update(reply_to=topic, id=request_id)
        # not under self._lock: paho calls on_publish holding its own message lock, and
        # on_publish takes self._lock — publishing under it deadlocked against a fast PUBACK
        info = self._client.publish(self.request_topic, json.dumps(payload), qos=1,
                                    properties=props)
        with self._lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._published[info.mid] = request_id
        if early is not None:  # the broker answered before publish() returned
            self._acknowledged(request_id, early)
        return request_id

    def replies(self, request_id: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield reply objects for a request in `seq` order until the final one (or an error)."""
        inbox = self._inboxes[request_id]
        wait = self.timeout if timeout is None else timeout
        held: dict[int, dict[str, Any]] = {}
        expect = 0
        try:
            while True:
                try:
                    reply = inbox.get(timeout=wait)
                except queue.Empty:
                    where = f"device {self.device_id}" if self.device_id else "the pool"
                    raise ClientError(
                        f"no reply from {where} within {wait:g} s",
                        hint=f"is it online? mosquitto_sub -t 'edgerunner/{self.device_id or '+'}"
                        "/status' shows online/offline") from None
                if "error" in reply:
                    raise RemoteError(reply)
                if "seq" not in reply:
                    yield reply
                    return
                # QoS 1 keeps order per publisher, but a redelivery after a reconnect may not
                if int(reply["seq"]) < expect:
                    continue  # a redelivered duplicate
                held[int(reply["seq"])] = reply
                if reply["choices"][0].get("finish_reason") is not None:
                    final_seq = int(reply["seq"])
                    missing = [s for s in range(expect, final_seq) if s not in held]
                    if missing:
                        raise ClientError(
                            f"the reply arrived incomplete: chunks {missing[:10]} of "
                            f"{final_seq + 1} were lost (the broker restarted without them?)",
                            hint="retry the request; a broker with persistence keeps them")
                while expect in held:
                    chunk = held.pop(expect)
                    expect += 1
                    yield chunk
                    if chunk["choices"][0].get("finish_reason") is not None:
                        return
        finally:
            with self._lock:
                self._inboxes.pop(request_id, None)

    def complete(self, body: dict[str, Any], *, on_text: Callable[[str], None] | None = None,
                 expiry_s: int | None = None) -> dict[str, Any]:
        """Send one chat request and return the `chat.completion` (streams are assembled)."""
        request_id = self.send(body, expiry_s=expiry_s)
        parts: list[str] = []
        for reply in self.replies(request_id):
            if reply.get("object") == "chat.completion":
                if on_text is not None:
                    on_text(reply["choices"][0]["message"]["content"])
                return reply
            choice = reply["choices"][0]
            text = choice["delta"].get("content") or ""
            parts.append(text)
            if on_text is not None and text:
                on_text(text)
            if choice.get("finish_reason") is not None:
                return {
                    "id": reply["id"], "object": "chat.completion", "created": reply["created"],
                    "model": reply["model"],
                    "choices": [{"index": 0, "finish_reason": choice["finish_reason"],
                                 "message": {"role": "assistant", "content": "".join(parts)}}],
                    "usage": reply.get("usage"),
                }
        raise ClientError("the reply stream ended without a final chunk")  # pragma: no cover

    def cancel(self, request_id: str) -> None:
        """Ask the device to stop generating `request_id`."""
        if self.device_id is None:
            raise ClientError("cancel needs a device id", hint="pool requests cannot be cancelled")
        self._client.publish(DeviceTopics(self.device_id).cancel,
                             json.dumps({"id": request_id}), qos=1)

    # -- paho callbacks -----------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            if self.v5 and refuses_v5(reason):
                client.loop_stop()  # no v5 retries: connect() asks again with 3.1.1
            self._refused = reason
            self._answered.set()
            return
        client.subscribe(f"{self.reply_root}/#", qos=1)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._subscribed.set()
        self._answered.set()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._lock:
            request_id = self._published.pop(mid, None)
            if request_id is None:
                if len(self._early_acks) > 1024:  # acks of publishes that are not requests
                    self._early_acks.clear()
                self._early_acks[mid] = reason.value
                return
        self._acknowledged(request_id, reason.value)

    def _acknowledged(self, request_id: str, reason: int) -> None:
        with self._lock:
            inbox = self._inboxes.get(request_id)
        # v5 brokers say when nobody subscribes to the request topic: the request is gone
        if inbox is not None and reason == NO_MATCHING_SUBSCRIBERS:
            where = f"device {self.device_id}" if self.device_id else "the pool"
            inbox.put({"error": {
                "type": "not_delivered", "code": "no_subscribers",
                "message": f"no daemon is subscribed to {self.request_topic}: {where} is not "
                           "online; start it, or check the device id"}})

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        request_id = msg.topic[len(self.reply_root) + 1:]
        with self._lock:
            inbox = self._inboxes.get(request_id)
        if inbox is None:
            return
        try:
            inbox.put(json.loads(msg.payload))
        except ValueError:
            logger.warning("unreadable reply on %s (%d bytes)", msg.topic, len(msg.payload))


def wait_for_status(url: str, device_id: str, want: str = "online", timeout: float = 30.0,
                    protocol: Protocol = "5") -> bool:
    """True once the device's retained status topic reads `want` (used by tools and tests)."""
    seen = threading.Event()
    options = SessionOptions(f"edgerunner-status-{uuid.uuid4().hex[:8]}", protocol)
    client, address = new_client(url, options)
    topic = DeviceTopics(device_id).status

    def on_connect(c: paho.Client, *args: Any) -> None:
        c.subscribe(topic, qos=1)

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.payload.decode(errors="replace") == want:
            seen.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.reconnect_delay_set(1, 2)
    connect_async(client, address, options)
    client.loop_start()
    try:
        end = time.monotonic() + timeout
        return seen.wait(max(0.0, end - time.monotonic()))
    finally:
        client.disconnect()
        client.loop_stop()
