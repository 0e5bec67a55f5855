"""A minimal IoT app: ask an edgerunner device for structured JSON over MQTT, print it.

Copy this file into your project; it needs only paho-mqtt 2.x (no edgerunner import).

    python tools/examples/iot_client_example.py --broker localhost --device kitchen-pi \\
        "The living room is 22.5 C and the window is open."

The device answers on the v5 ResponseTopic we set, echoing our CorrelationData; the JSON schema
in `response_format` makes the model's answer parse as that schema.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCHEMA = {
    "type": "object",
    "properties": {
        "room": {"type": "string"},
        "temperature_c": {"type": "number"},
        "window_open": {"type": "boolean"},
    },
    "required": ["room", "temperature_c", "window_open"],
}


def ask(broker: str, port: int, device: str, text: str, timeout: float = 60.0) -> dict:
    """Send one request to `device` and return the parsed JSON answer."""
    request_id = uuid.uuid4().hex
    reply_topic = f"edgerunner/reply/example/{request_id}"
    replies: queue.Queue[bytes] = queue.Queue()
    subscribed = queue.Queue[bool]()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"example-{request_id[:8]}",
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe(reply_topic, qos=1)
    client.on_subscribe = lambda *a: subscribed.put(True)
    client.on_message = lambda c, u, msg: replies.put(msg.payload)
    client.connect(broker, port)
    client.loop_start()
    try:
        subscribed.get(timeout=10)  # subscribe before asking, or a fast reply is missed
        body = {
            "messages": [
                {"role": "system", "content": "Extract the reading as JSON."},
                {"role": "user", "content": text},
            ],
            "max_tokens": 96,
            "temperature": 0,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "reading", "schema": SCHEMA}},
        }
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = request_id.encode()
        props.MessageExpiryInterval = int(timeout)  # don't run it if it waited too long
        client.publish(f"edgerunner/{device}/request", json.dumps(body), qos=1, properties=props)
        reply = json.loads(replies.get(timeout=timeout))
    finally:
        client.disconnect()
        client.loop_stop()
    if "error" in reply:
        raise RuntimeError(f"{reply['error']['code']}: {reply['error']['message']}")
    return json.loads(reply["choices"][0]["message"]["content"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default="The kitchen is 21 C, window closed.")
    parser.add_argument("--broker", default="localhost")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--device", required=True, help="the device id the daemon serves as")
    args = parser.parse_args()
    try:
        reading = ask(args.broker, args.port, args.device, args.text)
    except (OSError, RuntimeError, queue.Empty) as exc:
        print(f"no answer: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(reading, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
