"""Home Assistant's Assist request, as its Ollama integration builds it ("Control Home
Assistant" → Assist): the intent tools with their parameter schemas, and the system prompt
(the instructions, the Assist API prompt and the exposed entities as YAML) for N entities.
Shared by the tests and tools/bench (which put the checkout on sys.path).

Where each piece comes from (home-assistant/core):
- homeassistant/helpers/llm.py @004be187: AssistAPI — the prompt parts
  (DEFAULT_INSTRUCTIONS_PROMPT, DEVICE_CONTROL_TOOL_USAGE_PROMPT, the no-device area prompt, the
  no-timer prompt, DYNAMIC_CONTEXT_PROMPT, "Static Context" + yaml of the exposed entities
  without state), which intents become tools (IGNORE_INTENTS, timer intents dropped without a
  device, `platforms` filtered by the exposed domains), IntentTool dropping
  preferred_area_id/preferred_floor_id, GetDateTime and GetLiveContext.
- homeassistant/helpers/intent.py (DynamicServiceIntentHandler.slot_schema): the name/area/floor,
  domain and device_class slots; homeassistant/components/intent/__init__.py @02c28258 (HassTurnOn,
  HassTurnOff, the lock/open/close/press aliases, HassSetPosition, HassStopMoving),
  components/media_player/intent.py @02d12de8, components/climate/intent.py
  (HassClimateSetTemperature), components/light/intent.py (HassLightSet), components/fan/intent.py
  (HassFanSetSpeed), components/intent/timers.py (HassCancelAllTimers).
- homeassistant/components/conversation/chat_log.py (where it sets SystemContent): the system
  message is the instructions, the API prompt and (without GetDateTime) the time, by "\n".
- homeassistant/components/ollama/entity.py @0d0db908: `_format_tool` ({"type": "function",
  "function": {name, parameters, description}}), messages, `tools` on every streamed /api/chat,
  MAX_TOOL_ITERATIONS = 10; num_ctx from const.DEFAULT_NUM_CTX (8192).

The schemas are what voluptuous_openapi 0.4.1 `convert` gives for those voluptuous slot schemas
(cv.string and cv.ensure_list converted by their type hints, as in HA): run once on the
transcribed schemas and written out here through small builders. The one thing HA does not fix
is the order of a device_class enum (it flattens a set of StrEnum classes); here it follows
ONOFF_DEVICE_CLASSES as written.
"""

from __future__ import annotations

import json
from typing import Any

# -- the tools --------------------------------------------------------------------------------

BUTTON_CLASSES = ["identify", "restart", "update"]
COVER_CLASSES = ["awning", "blind", "curtain", "damper", "door", "garage", "gate", "shade",
                 "shutter", "window"]
VALVE_CLASSES = ["water", "gas"]
SWITCH_CLASSES = ["outlet", "switch"]
MEDIA_CLASSES = ["tv", "speaker", "receiver"]
ONOFF_CLASSES = BUTTON_CLASSES + COVER_CLASSES + VALVE_CLASSES + SWITCH_CLASSES + MEDIA_CLASSES

STRING: dict[str, Any] = {"type": "string"}


def _strings(enum: list[str] | None = None) -> dict[str, Any]:
    items: dict[str, Any] = {"type": "string", **({"enum": enum} if enum else {})}
    return {"type": "array", "items": items}


def _percent(low: int = 0, high: int = 100) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _target(domains: list[str] | None = None, device_classes: list[str] | None = None,
            required: dict[str, Any] | None = None,
            optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """DynamicServiceIntentHandler's slot schema, converted."""
    properties: dict[str, Any] = {"name": STRING, "area": STRING, "floor": STRING,
                                  "domain": _strings(domains)}
    if device_classes:
        properties["device_class"] = _strings(device_classes)
    properties.update(required or {})
    properties.update(optional or {})
    return {"type": "object", "properties": properties, "required": list(required or {})}


NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
MEDIA = ["media_player"]

# (name, the domains that must be exposed for HA to offer it (None: always), description,
# parameters), in HA's registration order
INTENT_TOOLS: list[tuple[str, frozenset[str] | None, str, dict[str, Any]]] = [
    ("HassTurnOn", None,
     "Turns on/opens/presses a device or entity. For locks, this performs a 'lock' action. "
     "Use for requests like 'turn on', 'activate', 'enable', or 'lock'.",
     _target(device_classes=ONOFF_CLASSES)),
    ("HassTurnOff", None,
     "Turns off/closes a device or entity. For locks, this performs an 'unlock' action. "
     "Use for requests like 'turn off', 'deactivate', 'disable', or 'unlock'.",
     _target(device_classes=ONOFF_CLASSES)),
    ("HassLock", frozenset({"lock"}),
     "Locks a lock. Use for requests like 'lock the front door'.", _target(["lock"])),
    ("HassUnlock", frozenset({"lock"}),
     "Unlocks a lock. Use for requests like 'unlock the back door'.", _target(["lock"])),
    ("HassOpen", frozenset({"cover", "valve"}),
     "Opens a cover or valve, such as a blind, curtain, garage door or water valve.",
     _target(["cover", "valve"], COVER_CLASSES + VALVE_CLASSES)),
    ("HassClose", frozenset({"cover", "valve"}),
     "Closes a cover or valve, such as a blind, curtain, garage door or water valve.",
     _target(["cover", "valve"], COVER_CLASSES + VALVE_CLASSES)),
    ("HassPress", frozenset({"button", "input_button"}),
     "Presses a button. Use for requests like 'press the doorbell'.",
     _target(["button", "input_button"], BUTTON_CLASSES)),
    ("HassSetPosition", frozenset({"cover", "valve"}), "Sets the position of a device or entity",
     _target(None, COVER_CLASSES + VALVE_CLASSES, required={"position": _percent()})),
    ("HassStopMoving", frozenset({"cover", "valve"}), "Stops a moving device or entity",
     _target(None, COVER_CLASSES + VALVE_CLASSES)),
    ("HassCancelAllTimers", None, "Cancels all timers",
     {"type": "object", "properties": {"area": STRING}, "required": []}),
    ("HassLightSet", frozenset({"light"}), "Sets the brightness percentage or color of a light",
     _target(optional={"color": STRING, "temperature": {"type": "integer", "minimum": 0},
                       "brightness": _percent()})),
    ("HassClimateSetTemperature", frozenset({"climate"}),
     "Sets the target temperature of a climate device or entity",
     {"type": "object", "properties": {"temperature": {"type": "number"}, "area": STRING,
                                       "name": STRING, "floor": STRING},
      "required": ["temperature"]}),
    ("HassFanSetSpeed", frozenset({"fan"}), "Sets a fan's speed by percentage",
     _target(["fan"], required={"percentage": _percent()})),
    ("HassMediaUnpause", frozenset(MEDIA), "Resumes a media player",
     _target(MEDIA, MEDIA_CLASSES)),
    ("HassMediaPause", frozenset(MEDIA), "Pauses a media player", _target(MEDIA, MEDIA_CLASSES)),
    ("HassMediaNext", frozenset(MEDIA), "Skips a media player to the next item",
     _target(MEDIA, MEDIA_CLASSES)),
    ("HassMediaPrevious", frozenset(MEDIA), "Replays the previous item for a media player",
     _target(MEDIA, MEDIA_CLASSES)),
    ("HassSetVolume", frozenset(MEDIA), "Sets the volume of a media player",
     _target(MEDIA, MEDIA_CLASSES, required={"volume_level": _percent()})),
    ("HassSetVolumeStep", frozenset(MEDIA), "Sets the volume step of a media player",
     _target(MEDIA, MEDIA_CLASSES, required={"volume_step": _percent(1, 10)})),
]

GET_DATE_TIME = ("GetDateTime", "Provides the current date and time.", NO_PARAMETERS)
GET_LIVE_CONTEXT = (
    "GetLiveContext",
    "Provides real-time information about the CURRENT state, value, or mode of devices, "
    "sensors, entities, or areas. Use this tool for: 1. Answering questions about current "
    "conditions (e.g., 'Is the light on?'). 2. As the first step in conditional actions (e.g., "
    "'If the weather is rainy, turn off sprinklers' requires checking the weather first). You "
    "may filter for devices by name, domain, and area, including combining those filters. "
    "Prefer filtering by domain when searching for multiple devices of the same type.",
    {"type": "object", "properties": {
        "name": {"description": "Filter entities by name or alias (case-insensitive).",
                 "type": "string"},
        # cv.string has no type hint voluptuous_openapi can read, so one branch is {}
        "domain": {"anyOf": [{}, _strings()],
                   "description": "Filter entities by domain (e.g. 'light', 'sensor'). "
                                  "Accepts a single domain or a list."},
        "area": {"description": "Filter entities by area name or alias (case-insensitive).",
                 "type": "string"}}, "required": []})


def _tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


def tools(domains: set[str] | frozenset[str]) -> list[dict[str, Any]]:
    """The tools HA offers when entities of `domains` are exposed (OpenAI/Ollama shape)."""
    out = [_tool(name, description, parameters)
           for name, platforms, description, parameters in INTENT_TOOLS
           if platforms is None or platforms & domains]
    out.append(_tool(*GET_DATE_TIME))
    if domains:
        out.append(_tool(*GET_LIVE_CONTEXT))
    return out


def schemas(tool_list: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tool's parameters schema by name."""
    return {t["function"]["name"]: t["function"]["parameters"] for t in tool_list}


# -- the home ---------------------------------------------------------------------------------

# (name, domain, area): a plausible home, interleaved so any prefix mixes the domains
HOME: list[tuple[str, str, str]] = [
    ("Kitchen Ceiling", "light", "Kitchen"),
    ("Living Room TV", "media_player", "Living Room"),
    ("Thermostat", "climate", "Hallway"),
    ("Front Door", "lock", "Hallway"),
    ("Bedroom Blinds", "cover", "Bedroom"),
    ("Coffee Maker", "switch", "Kitchen"),
    ("Ceiling Fan", "fan", "Bedroom"),
    ("Outdoor Temperature", "sensor", "Garden"),
    ("Sofa Lamp", "light", "Living Room"),
    ("Kitchen Speaker", "media_player", "Kitchen"),
    ("Garage Door", "cover", "Garage"),
    ("Hallway Motion", "binary_sensor", "Hallway"),
    ("Bedside Lamp", "light", "Bedroom"),
    ("Office Heater", "climate", "Office"),
    ("Back Door", "lock", "Kitchen"),
    ("Christmas Tree", "switch", "Living Room"),
    ("Desk Lamp", "light", "Office"),
    ("Office Fan", "fan", "Office"),
    ("Bathroom Humidity", "sensor", "Bathroom"),
    ("Porch Light", "light", "Garden"),
    ("Bedroom Speaker", "media_player", "Bedroom"),
    ("Living Room Curtains", "cover", "Living Room"),
    ("Dishwasher", "switch", "Kitchen"),
    ("Front Door Contact", "binary_sensor", "Hallway"),
    ("Bathroom Mirror", "light", "Bathroom"),
    ("Kids Room Ceiling", "light", "Kids Room"),
    ("Garden Sprinkler", "switch", "Garden"),
    ("Kids Room Heater", "climate", "Kids Room"),
    ("Office Blinds", "cover", "Office"),
    ("Living Room Temperature", "sensor", "Living Room"),
    ("Under Cabinet Lights", "light", "Kitchen"),
    ("Office Speaker", "media_player", "Office"),
    ("Garage Side Door", "lock", "Garage"),
    ("Washing Machine", "switch", "Laundry"),
    ("Laundry Light", "light", "Laundry"),
    ("Bathroom Fan", "fan", "Bathroom"),
    ("Garage Motion", "binary_sensor", "Garage"),
    ("Dining Pendant", "light", "Dining Room"),
    ("Guest Room Heater", "climate", "Guest Room"),
    ("Kitchen Window Shade", "cover", "Kitchen"),
    ("Electricity Meter", "sensor", "Garage"),
    ("Hallway Light", "light", "Hallway"),
    ("Patio Heater", "switch", "Garden"),
    ("Guest Room Lamp", "light", "Guest Room"),
    ("Dining Room Speaker", "media_player", "Dining Room"),
    ("Shed Door", "lock", "Garden"),
    ("Attic Fan", "fan", "Attic"),
    ("Stairs Light", "light", "Hallway"),
    ("Fridge Temperature", "sensor", "Kitchen"),
    ("Garden Lights", "light", "Garden"),
]
DEFAULT_ENTITIES = 25


def entities(n: int = DEFAULT_ENTITIES) -> list[dict[str, str]]:
    """The first `n` exposed entities as HA lists them without state (sorted by name)."""
    if not 0 <= n <= len(HOME):
        raise ValueError(f"entities: 0..{len(HOME)}, not {n}")
    chosen = sorted(HOME[:n], key=lambda e: e[0])
    return [{"names": name, "domain": domain, "areas": area} for name, domain, area in chosen]


def _yaml(items: list[dict[str, str]]) -> str:
    # HA's yaml_util.dump (sort_keys=False, block style); the names need no quoting
    return "".join("- " + "\n  ".join(f"{k}: {v}" for k, v in item.items()) + "\n"
                   for item in items)


# -- the prompt -------------------------------------------------------------------------------

INSTRUCTIONS = ("You are a voice assistant for Home Assistant.\n"
                "Answer questions about the world truthfully.\n"
                "Answer in plain text. Keep it simple and to the point.\n")
DEVICE_CONTROL = (
    "When controlling Home Assistant always call the intent tools. "
    "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
    "When controlling a device, prefer passing just name and domain. "
    "When controlling an area, prefer passing just area name and domain.")
NO_DEVICE_AREA = ("When a request names a generic device without an area, "
                  "ask the user to specify which area they mean before targeting.")
NO_TIMERS = "This device is not able to start timers."
DYNAMIC_CONTEXT = (
    "You ARE equipped to answer questions about the current state of\n"
    "the home using the `GetLiveContext` tool. This is a primary function. Do not state you "
    "lack the\nfunctionality if the question requires live data.\n"
    'If the user asks about device existence/type (e.g., "Do I have lights in the bedroom?"):'
    " Answer\nfrom the static context below.\n"
    'If the user asks about the CURRENT state, value, or mode (e.g., "Is the lock locked?",\n'
    '"Is the fan on?", "What mode is the thermostat in?", "What is the temperature outside?"):'
    "\n    1.  Recognize this requires live data.\n"
    "    2.  You MUST call `GetLiveContext`. This tool will provide the needed real-time "
    "information (like temperature from the local weather, lock status, etc.).\n"
    "    3.  Use the tool's response** to answer the user accurately (e.g., \"The temperature "
    'outside is [value from tool].").\n'
    "For general knowledge questions not about the home: Answer truthfully from internal "
    "knowledge.\n")
NO_ENTITIES = ("Only if the user wants to control a device, tell them to expose entities "
               "to their voice assistant in Home Assistant.")


def system_prompt(n: int = DEFAULT_ENTITIES) -> str:
    """The system message HA sends with `n` exposed entities (no satellite device)."""
    exposed = entities(n)
    if not exposed:
        api_prompt = NO_ENTITIES
    else:
        api_prompt = "\n".join([
            DEVICE_CONTROL, NO_DEVICE_AREA, NO_TIMERS, DYNAMIC_CONTEXT,
            "Static Context: An overview of the areas and the devices in this smart home:",
            _yaml(exposed)])
    # conversation/chat_log.py: the instructions rendered as a template (which strips them),
    # the API prompt, no date/time line since GetDateTime is offered, joined by newlines
    return INSTRUCTIONS.strip() + "\n" + api_prompt


def exposed_domains(n: int = DEFAULT_ENTITIES) -> set[str]:
    return {e["domain"] for e in entities(n)}


def request(n: int = DEFAULT_ENTITIES, user: str = "Turn on the kitchen ceiling light",
            history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The OpenAI-shaped body (`messages`, `tools`) of one Assist turn with `n` entities;
    `history`: the calls and results that followed the user's message in this turn."""
    return {"messages": [{"role": "system", "content": system_prompt(n)},
                         {"role": "user", "content": user}, *(history or [])],
            "tools": tools(exposed_domains(n))}


OLLAMA_NUM_CTX = 8192  # HA's ollama const.DEFAULT_NUM_CTX
MAX_TOOL_ITERATIONS = 10  # HA's ollama entity.py


def ollama_request(n: int = DEFAULT_ENTITIES, user: str = "Turn on the kitchen ceiling light",
                   model: str = "default", history: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """The same turn as HA's Ollama integration posts it to /api/chat: through the `ollama`
    client's own ChatRequest (HA calls `client.chat(..., tools=..., stream=True)`), which keeps
    of each property only type, items, description and enum (no minimum/maximum, no anyOf);
    tool-call arguments as objects, tool results without a name."""
    from ollama._types import ChatRequest  # the client's wire model (what it serializes)

    body = request(n, user, history)
    messages = []
    for message in body["messages"]:
        # HA's tool messages carry only role and content (no tool_name, no id)
        message = {k: v for k, v in message.items() if k not in ("tool_call_id", "name")}
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"function": {"name": c["function"]["name"],
                              "arguments": json.loads(c["function"]["arguments"])}}
                for c in message["tool_calls"]]
        messages.append(message)
    wire: dict[str, Any] = ChatRequest(
        model=model, messages=messages, tools=body["tools"], stream=True, keep_alive=-1,
        options={"num_ctx": OLLAMA_NUM_CTX}).model_dump(exclude_none=True)
    return wire


# -- tool round trips -------------------------------------------------------------------------

# a plausible state (and HA's "interesting" attributes) per domain, for GetLiveContext
_STATES: dict[str, tuple[str, dict[str, Any]]] = {
    "light": ("on", {"brightness": "180"}),
    "media_player": ("playing", {"volume_level": 0.35, "media_title": "Morning Jazz"}),
    "climate": ("heat", {"current_temperature": 20.5, "temperature": "21"}),
    "lock": ("locked", {}),
    "cover": ("open", {"current_position": "100"}),
    "switch": ("off", {}),
    "fan": ("on", {"percentage": "50"}),
    "sensor": ("21.4", {"unit_of_measurement": "°C", "device_class": "temperature"}),
    "binary_sensor": ("off", {"device_class": "motion"}),
}


def _yaml_scalar(value: Any) -> str:
    # yaml quotes strings that would read back as numbers or booleans
    if isinstance(value, str):
        if value.lower() in ("on", "off", "yes", "no", "true", "false"):
            return f"'{value}'"
        try:
            float(value)
        except ValueError:
            return value
        return f"'{value}'"
    return str(value)


def live_context(n: int = DEFAULT_ENTITIES) -> str:
    """GetLiveContext's result text for the `n` entities (HA's yaml with state)."""
    lines = []
    for entity in entities(n):
        state, attributes = _STATES[entity["domain"]]
        lines.append(f"- names: {entity['names']}\n  domain: {entity['domain']}\n"
                     f"  state: {_yaml_scalar(state)}\n  areas: {entity['areas']}\n")
        if attributes:
            lines.append("  attributes:\n" + "".join(
                f"    {k}: {_yaml_scalar(v)}\n" for k, v in attributes.items()))
    return ("Live Context: An overview of the areas and the devices in this smart home:\n"
            + "".join(lines))


def tool_result(data: dict[str, Any]) -> str:
    """A tool message's content as HA's Ollama integration sends it."""
    return json.dumps({"data": data, "error": None})


def round_trips(n: int = DEFAULT_ENTITIES, name: str = "Kitchen Ceiling"
                ) -> list[dict[str, Any]]:
    """The history of a turn that asked for the live context, then turned a light on:
    two assistant calls, each with its tool result (OpenAI shape)."""
    entity_id = "light." + name.lower().replace(" ", "_")
    turned_on = {"speech": {}, "response_type": "action_done", "data": {
        "targets": [], "success": [{"name": name, "type": "entity", "id": entity_id}],
        "failed": []}}
    history: list[dict[str, Any]] = []
    for i, (tool, arguments, result) in enumerate((
            ("GetLiveContext", {}, {"success": True, "result": live_context(n)}),
            ("HassTurnOn", {"name": name, "domain": ["light"]}, turned_on))):
        call_id = f"call{i:05d}"  # 9 alphanumerics: Mistral's template insists
        history.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": tool, "arguments": json.dumps(arguments)}}]})
        history.append({"role": "tool", "tool_call_id": call_id, "name": tool,
                        "content": tool_result(result)})
    return history
