"""The health gate an update must pass before it is committed.

Within a window: the daemon reports READY on its socket (a new process, not the one the update
replaced), its plan fits as packed (not shrunk to fit, memory guard not tripped), and every
smoke prompt the bundle carries answers: non-empty, JSON valid against its schema when it has
one, within its latency bound.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgerunner.bundle.manifest import BundleManifest, SmokePrompt
from edgerunner.client.http import Client
from edgerunner.device.service import ServiceController
from edgerunner.errors import ClientError

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 300.0
POLL_S = 0.2


class GateFailed(Exception):
    """A gate step failed: .step names it ('ready', 'fit', 'smoke <name>'), str() says how."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


class GateResult(BaseModel):
    """What the gate saw when it passed."""

    model_config = ConfigDict(extra="forbid")

    pid: int = Field(..., description="Daemon process that answered")
    ready_s: float = Field(..., description="Seconds until /health said ready")
    smoke: dict[str, float] = Field(default_factory=dict, description="Seconds per prompt")


def prove(controller: ServiceController, name: str, manifest: BundleManifest,
          window_s: float = DEFAULT_WINDOW_S, replaced_pid: int | None = None,
          latency: bool = True) -> GateResult:
    """Run the gate; GateFailed naming the first step that failed.

    latency=False skips the smoke prompts' time bounds: a bundle put back after a failed
    update must answer correctly, and a busy device is no reason to leave it stopped.
    """
    start = time.monotonic()
    deadline = start + window_s
    client = Client(controller.socket(name), timeout=max(window_s, 1.0))
    try:
        health = _wait_ready(client, controller, name, deadline, replaced_pid)
        ready_s = time.monotonic() - start
        _check_fit(health, manifest)
        timings = {}
        for prompt in manifest.smoke:
            timings[prompt.name] = _ask(client, prompt, deadline, latency)
    finally:
        client.close()
    return GateResult(pid=int(health.get("pid", 0)), ready_s=round(ready_s, 2), smoke=timings)


def current_pid(controller: ServiceController, name: str) -> int | None:
    """pid /health reports now, None when nothing answers."""
    if not controller.is_running(name):
        return None
    try:
        with Client(controller.socket(name), timeout=5.0) as client:
            pid = client.health().get("pid")
    except ClientError:
        return None
    return int(pid) if isinstance(pid, int) else None


def _wait_ready(client: Client, controller: ServiceController, name: str, deadline: float,
                replaced_pid: int | None) -> dict[str, Any]:
    last = "no answer on the socket yet"
    while True:
        why = controller.exited(name)
        if why is not None:
            raise GateFailed("ready", f"the service stopped before it was ready: {why}")
        try:
            health = client.health()
            state = health.get("state")
            if state == "ready" and health.get("pid") != replaced_pid:
                return health
            last = f"/health says state {state!r}"
        except ClientError as exc:
            last = exc.message
        if time.monotonic() >= deadline:
            raise GateFailed("ready", f"not ready within the window ({last})")
        time.sleep(POLL_S)


def _check_fit(health: dict[str, Any], manifest: BundleManifest) -> None:
    if health.get("plan_shrunk"):
        n_ctx = (health.get("plan") or {}).get("n_ctx")
        raise GateFailed("fit", f"the plan does not fit: the daemon shrank n_ctx from "
                         f"{manifest.plan.n_ctx} to {n_ctx} to start")
    memory = health.get("memory") or {}
    if memory.get("guard") not in (None, "ok"):
        raise GateFailed("fit", f"memory guard is {memory.get('guard')!r}: "
                         f"{memory.get('guard_reason') or 'no reason given'}")


def _ask(client: Client, prompt: SmokePrompt, deadline: float, latency: bool = True) -> float:
    step = f"smoke {prompt.name}"
    params: dict[str, Any] = {"max_tokens": prompt.max_tokens, "temperature": 0.0}
    if prompt.json_schema is not None:
        params["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": prompt.name,
                                                     "schema": prompt.json_schema}}
    start = time.monotonic()
    try:
        answer = client.chat([{"role": "user", "content": prompt.prompt}], **params)
    except ClientError as exc:
        raise GateFailed(step, f"request failed: {exc.message}") from exc
    took = time.monotonic() - start
    text = (answer["choices"][0]["message"].get("content") or "").strip()
    if not text:
        raise GateFailed(step, "empty answer")
    if prompt.json_schema is not None:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise GateFailed(step, f"answer is not JSON ({exc}): {text[:120]!r}") from exc
        problem = schema_problem(value, prompt.json_schema)
        if problem:
            raise GateFailed(step, f"answer does not match its schema: {problem}")
    if latency and took > prompt.max_seconds:
        raise GateFailed(step, f"answered in {took:.1f} s, over its bound of "
                         f"{prompt.max_seconds:g} s")
    if time.monotonic() > deadline:
        raise GateFailed(step, "the window ran out")
    logger.info("smoke %s answered in %.2f s: %r", prompt.name, took, text[:80])
    return round(took, 2)


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def schema_problem(value: Any, schema: dict[str, Any], where: str = "$") -> str | None:
    """The first way value breaks schema, or None (the subset smoke prompts use: type,
    properties, required, additionalProperties, items, enum)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        ok = isinstance(value, _TYPES.get(kind, (object,)))
        if kind in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            return f"{where} is {type(value).__name__}, schema wants {kind}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is {value!r}, not one of {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"{where} lacks required {key!r}"
        for key, item in value.items():
            if key in properties:
                problem = schema_problem(item, properties[key], f"{where}.{key}")
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{where} has {key!r}, which the schema does not allow"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problem = schema_problem(item, schema["items"], f"{where}[{index}]")
            if problem:
                return problem
    return None
