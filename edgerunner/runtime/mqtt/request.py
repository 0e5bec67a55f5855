"""Reading one incoming MQTT request: where to reply, size and encoding checks, the body model.

Validation of the body itself is `protocol.parse_request`, the same as HTTP; this module only
peels off what is MQTT-specific (reply topic, correlation, `reply_to`/`id`, message expiry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paho.mqtt.properties import Properties

from edgerunner.runtime.mqtt.reply import ReplyRoute
from edgerunner.runtime.mqtt.topics import reply_topic_problem
from edgerunner.runtime.protocol import (
    ChatCompletionRequest,
    RequestError,
    decode_json,
    parse_request,
)

# An oversized 3.1.1 request is still parsed (up to this many times the limit) to find where to
# send the refusal; anything larger is dropped unread.
_OVERSIZE_PARSE_FACTOR = 16


@dataclass(frozen=True)
class Incoming:
    """An incoming request: where to answer, and either the request or why it is refused."""

    route: ReplyRoute | None  # None: nowhere (safe) to answer; `dropped` says why
    request: ChatCompletionRequest | None = None
    error: RequestError | None = None
    expiry_s: float | None = None  # v5 Message Expiry left when the broker delivered it
    dropped: str | None = None


def _loads(payload: bytes) -> Any:
    return decode_json(payload, "payload")


def _take_route_fields(body: dict[str, Any]) -> tuple[Any, Any]:
    """Remove `reply_to` and `id` (MQTT envelope, not part of the OpenAI body)."""
    return body.pop("reply_to", None), body.pop("id", None)


def read_request(
    payload: bytes,
    properties: Properties | None,
    *,
    v5: bool,
    max_payload_bytes: int,
    allowed_prefixes: list[str],
) -> Incoming:
    """Decode, route and validate one request message (never raises for bad input)."""
    response_topic = getattr(properties, "ResponseTopic", None) if properties else None
    correlation = getattr(properties, "CorrelationData", None) if properties else None
    expiry = getattr(properties, "MessageExpiryInterval", None) if properties else None

    body: Any = None
    error: RequestError | None = None
    if len(payload) > max_payload_bytes:
        error = RequestError(
            "invalid_request",
            f"the request is {len(payload)} bytes, over this device's limit of "
            f"{max_payload_bytes} (mqtt.max_payload_bytes); shorten the prompt")
        if response_topic is None and len(payload) <= _OVERSIZE_PARSE_FACTOR * max_payload_bytes:
            try:
                body = _loads(payload)
            except RequestError:
                body = None
    else:
        try:
            body = _loads(payload)
        except RequestError as exc:
            error = exc

    reply_to: Any = None
    request_id: Any = None
    if isinstance(body, dict):
        reply_to, request_id = _take_route_fields(body)
    elif error is None:
        error = RequestError("invalid_request", "the request must be a JSON object")

    topic = response_topic if response_topic else reply_to
    if not isinstance(topic, str) or not topic:
        return Incoming(None, dropped="no reply topic: set the v5 ResponseTopic or `reply_to`")
    problem = reply_topic_problem(topic, allowed_prefixes)
    if problem is not None:
        return Incoming(None, dropped=f"reply topic {topic[:200]!r} refused: {problem}")
    if request_id is not None and not isinstance(request_id, (str, int)):
        route = ReplyRoute(topic, v5=v5, correlation=correlation)
        return Incoming(route, error=RequestError(
            "invalid_request", "`id` must be a string or an integer"))
    rid = None if request_id is None else str(request_id)[:256]
    route = ReplyRoute(topic, v5=v5, correlation=correlation, request_id=rid)
    if error is not None:
        return Incoming(route, error=error)
    try:
        request = parse_request("chat", body)
    except RequestError as exc:
        return Incoming(route, error=exc)
    assert isinstance(request, ChatCompletionRequest)
    return Incoming(route, request=request, expiry_s=float(expiry) if expiry else None)
