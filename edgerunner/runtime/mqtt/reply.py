"""Turning scheduler events into MQTT reply messages: batching, `seq`, packet-size splitting.

One `ReplyStream` is the scheduler sink of one request. Streamed text is coalesced so a fast model
sends at most one chunk per `interval` seconds (the first chunk goes out at once, for latency);
every chunk is split so that no message exceeds the broker's Maximum Packet Size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgerunner.runtime.protocol import (
    DoneEvent,
    ErrorBody,
    ErrorEvent,
    Event,
    FinishReason,
    RequestError,
    TextEvent,
    ToolDeltaEvent,
    Usage,
    chat_chunk,
    chat_completion,
)
from edgerunner.runtime.tool_protocol import ToolCallDelta

logger = logging.getLogger(__name__)

# Bytes of a PUBLISH packet besides topic, correlation data and payload: fixed header, lengths,
# packet id, content-type and payload-format properties, with room to spare.
PACKET_OVERHEAD = 64
_MIN_CONTENT_ROOM = 16


class ReplyBacklogFull(Exception):
    """The broker is unreachable and the bounded reply backlog is full."""


@dataclass(frozen=True)
class ReplyRoute:
    """Where a request's replies go and how the client recognises them."""

    topic: str
    v5: bool
    correlation: bytes | None = None  # v5 CorrelationData, echoed on every reply
    request_id: str | None = None  # the `id` the client put in the body, echoed as the reply id

    @property
    def client_ref(self) -> str | None:
        """How the client names this request: its `id`, else its CorrelationData as text."""
        if self.request_id is not None:
            return self.request_id
        if self.correlation:
            try:
                return self.correlation.decode()
            except UnicodeDecodeError:
                return self.correlation.hex()
        return None

    def key(self) -> str | None:
        """What identifies this request for duplicate detection (None: not identifiable)."""
        if self.request_id is not None:
            return f"id:{self.topic}:{self.request_id}"
        if self.correlation:
            return f"corr:{self.topic}:{self.correlation.hex()}"
        return None


class Publisher(Protocol):
    """The transport side: publish one reply (QoS 1). Raises ReplyBacklogFull unless final."""

    def __call__(self, topic: str, payload: bytes, properties: Properties | None,
                 *, final: bool) -> None: ...


def encode(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as every reply is sent."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def reply_properties(route: ReplyRoute) -> Properties | None:
    """v5 properties of a reply: the request's CorrelationData, and that the payload is JSON."""
    if not route.v5:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json"
    if route.correlation is not None:
        props.CorrelationData = route.correlation
    return props


def error_payload(route: ReplyRoute, error: RequestError) -> bytes:
    """The HTTP error body, plus the request's `id` when the client sent one (for 3.1.1)."""
    body: dict[str, Any] = ErrorBody.of(error).model_dump()
    if route.request_id is not None:
        body = {"id": route.request_id, **body}
    return encode(body)


class Replier:
    """Publishes whole reply objects on a route within the size the broker accepts."""

    def __init__(self, publish: Publisher, max_packet: Callable[[], int], max_payload: int,
                 *, log_messages: bool = False) -> None:
        self._publish = publish
        self._max_packet = max_packet
        self._max_payload = max_payload
        # error messages can quote the request (a model name, a field's value): logged only
        # when prompts are
        self._log_messages = log_messages

    def budget(self, route: ReplyRoute) -> int:
        """Largest payload (bytes) one reply on this route may have."""
        overhead = PACKET_OVERHEAD + len(route.topic.encode()) + len(route.correlation or b"")
        return min(self._max_packet() - overhead, self._max_payload)

    def send(self, route: ReplyRoute, payload: bytes, *, final: bool) -> None:
        """Publish one payload that is known to fit."""
        self._publish(route.topic, payload, reply_properties(route), final=final)

    def send_error(self, route: ReplyRoute, error: RequestError) -> None:
        """Publish an error body as the request's final reply."""
        if self._log_messages:
            logger.info("mqtt reply error %s to %s: %s", error.code, route.topic, error.message)
        else:
            logger.info("mqtt reply error %s to %s", error.code, route.topic)
        self.send(route, error_payload(route, error), final=True)


class ReplyStream:
    """The scheduler sink of one MQTT request (called from the worker thread)."""

    def __init__(
        self,
        replier: Replier,
        route: ReplyRoute,
        *,
        model: str,
        stream: bool,
        interval: float,
        on_final: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replier = replier
        self.route = route
        self.model = model
        self.stream = stream
        self.interval = interval
        self.id = route.request_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.seq = 0  # chunks published so far
        self._on_final = on_final
        self._clock = clock
        self._pending = ""
        self._pending_calls: list[ToolCallDelta] = []  # call deltas, after the pending text
        self._last_sent = float("-inf")
        self._backlog_cut = False
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, (TextEvent, ToolDeltaEvent)):
                if isinstance(event, TextEvent):
                    self._pending += event.text
                else:
                    self._pending_calls.append(event.delta)
                if self._clock() - self._last_sent >= self.interval:
                    self._flush(final=False)
                return
            if not isinstance(event, (DoneEvent, ErrorEvent)):
                return  # whole calls: the deltas carried them already
            try:
                if isinstance(event, DoneEvent):
                    self._done(event)
                else:
                    self._failed(event.error)
            except RequestError as exc:  # the reply itself cannot be sent as it is
                self.replier.send_error(self.route, exc)
            finally:
                self._on_final()

    def _done(self, done: DoneEvent) -> None:
        if self.stream:
            self._flush(final=True, finish_reason=done.finish_reason, usage=done.usage)
            return
        payload = encode(chat_completion(self.id, self.model, self.created, done))
        if len(payload) > self.replier.budget(self.route):
            self.replier.send_error(self.route, RequestError(
                "invalid_request",
                f"the reply is {len(payload)} bytes, more than one MQTT message may carry here "
                f"({self.replier.budget(self.route)}); send the request with \"stream\": true "
                "to receive it in chunks, or lower max_tokens"))
            return
        self.replier.send(self.route, payload, final=True)

    def _failed(self, error: RequestError) -> None:
        if self._backlog_cut:
            error = RequestError(
                "cancelled",
                "generation stopped: the broker was unreachable and the reply backlog filled up; "
                "retry the request")
        elif self.stream and (self._pending or self._pending_calls):
            # text generated before the failure is still delivered, then the error
            with contextlib.suppress(ReplyBacklogFull):
                self._flush(final=False, force=True)
        self.replier.send_error(self.route, error)

    def _flush(
        self,
        *,
        final: bool,
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
        force: bool = False,
    ) -> None:
        text, self._pending = self._pending, ""
        calls, self._pending_calls = _merged(self._pending_calls), []
        if not text and not calls and not final:
            return
        # content first (a call never precedes text), each call's arguments split to fit
        parts: list[tuple[str | None, ToolCallDelta | None]] = []
        if text or not calls:
            parts = [(piece, None) for piece in self._split(text, usage)]
        for delta in calls:
            for i, args in enumerate(self._split(delta.arguments, usage, delta)):
                head = (delta.id, delta.name) if i == 0 else (None, None)
                parts.append((None, ToolCallDelta(delta.index, *head, arguments=args)))
        for i, (piece, call) in enumerate(parts):
            last = final and i == len(parts) - 1
            chunk = chat_chunk(
                self.id, self.model, self.created,
                content=piece if piece or (call is None and not last) else None,
                role=self.seq == 0,
                finish_reason=finish_reason if last else None,
                usage=(usage if last else None),
                tool_calls=None if call is None else [call],
            )
            chunk["seq"] = self.seq
            try:
                self.replier.send(self.route, encode(chunk), final=final or force)
            except ReplyBacklogFull:
                self._backlog_cut = True
                raise
            self.seq += 1
        self._last_sent = self._clock()

    def _split(self, text: str, usage: Usage | None,
               call: ToolCallDelta | None = None) -> list[str]:
        """Pieces of `text` (content, or `call`'s arguments) such that each chunk carrying one
        fits the packet budget."""
        head = None if call is None else [ToolCallDelta(call.index, call.id, call.name)]
        empty = chat_chunk(self.id, self.model, self.created, content="", role=True,
                           finish_reason="length", usage=usage or Usage(), tool_calls=head)
        empty["seq"] = self.seq + len(text)  # a seq at least as long as any this flush uses
        room = self.replier.budget(self.route) - len(encode(empty))
        if len(encode(text)) - 2 <= room:
            return [text]
        if room < _MIN_CONTENT_ROOM:
            raise RequestError(
                "internal_error",
                f"the broker's maximum packet size leaves {room} bytes per chunk; "
                "raise max_packet_size on the broker")
        pieces: list[str] = []
        start, size = 0, 0
        for i, char in enumerate(text):
            cost = len(encode(char)) - 2  # JSON-escaped UTF-8 bytes, without the quotes
            if size + cost > room:
                pieces.append(text[start:i])
                start, size = i, 0
            size += cost
        pieces.append(text[start:])
        return pieces


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive deltas of one call as one (the openai client concatenates the pieces)."""
    out: list[ToolCallDelta] = []
    for delta in deltas:
        if out and out[-1].index == delta.index and delta.id is None:
            last = out[-1]
            out[-1] = ToolCallDelta(last.index, last.id, last.name,
                                    last.arguments + delta.arguments)
        else:
            out.append(delta)
    return out
