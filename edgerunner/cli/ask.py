"""`edgerunner ask PROMPT`: send one prompt to a running daemon and stream the answer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from edgerunner.cli.output import json_option, print_json


def build_request(prompt: str, system: str | None, json_schema: Path | None,
                  max_tokens: int | None, temperature: float | None) -> dict[str, Any]:
    """The chat request body `ask` sends, over any transport."""
    from edgerunner.errors import ClientError

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    body: dict[str, Any] = {"messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text())
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read JSON schema {json_schema}: {exc}",
                              "pass a file holding one JSON Schema object") from exc
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": json_schema.stem, "schema": schema}}
    return body


@click.command("ask")
@click.argument("prompt")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Daemon socket [default: your own daemon's socket, else the one installed "
              "service's /run/edgerunner/<bundle>/api.sock].")
@click.option("--mqtt", "mqtt_url", metavar="URL",
              help="Ask through an MQTT broker instead of the socket (needs --device-id); "
              "credentials from EDGERUNNER_MQTT__USERNAME / EDGERUNNER_MQTT__PASSWORD.")
@click.option("--device-id", help="The device to ask over MQTT (`pool`: any device of the fleet).")
@click.option("--mqtt-protocol", type=click.Choice(["5", "3.1.1"]), default="5",
              show_default=True,
              help="MQTT version (5 falls back to 3.1.1 if the broker lacks v5).")
@click.option("--system", help="System message.")
@click.option("--json-schema", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Constrain the answer to this JSON Schema.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="0 = greedy.")
@json_option
def ask_cmd(prompt: str, socket_path: Path | None, mqtt_url: str | None, device_id: str | None,
            mqtt_protocol: str, system: str | None, json_schema: Path | None,
            max_tokens: int | None, temperature: float | None, as_json: bool) -> None:
    """Ask the daemon PROMPT; the answer streams to the terminal (--json: the whole object)."""
    from edgerunner.client.http import Client

    body = build_request(prompt, system, json_schema, max_tokens, temperature)
    if mqtt_url or device_id:
        _ask_mqtt(mqtt_url, device_id, mqtt_protocol, body, as_json)
        return
    messages = body.pop("messages")
    with Client(socket_path) as client:
        if as_json:
            print_json(client.chat(messages, **body))
            return
        for piece in client.stream_chat(messages, **body):
            click.echo(piece, nl=False)
        click.echo()
        if client.last_finish_reason == "length":
            click.echo("[stopped at max_tokens]", err=True)


def _ask_mqtt(url: str | None, device_id: str | None, protocol: str, body: dict[str, Any],
              as_json: bool) -> None:
    from edgerunner.client.mqtt import MqttChat

    if not url or not device_id:
        raise click.UsageError("--mqtt URL and --device-id ID go together")
    target = None if device_id == "pool" else device_id
    # credentials as the daemon takes them, so none need be on the command line
    username = os.environ.get("EDGERUNNER_MQTT__USERNAME")
    password = os.environ.get("EDGERUNNER_MQTT__PASSWORD")
    with MqttChat(url, target, protocol="3.1.1" if protocol == "3.1.1" else "5",
                  username=username, password=password) as chat:
        if as_json:
            print_json(chat.complete(body))
            return
        reply = chat.complete({**body, "stream": True},
                              on_text=lambda text: click.echo(text, nl=False))
        click.echo()
        if reply["choices"][0]["finish_reason"] == "length":
            click.echo("[stopped at max_tokens]", err=True)
