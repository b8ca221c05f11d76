"""The MQTT contract between device agents and fleet monitors (stdlib only).

Topic tree, one per device::

    edgekit/v1/<fleet>/<device>/state      retained; "online" + what runs, or "offline" (last will)
    edgekit/v1/<fleet>/<device>/telemetry  periodic metrics over a window
    edgekit/v1/<fleet>/<device>/event      errors, model loaded, drift alarm, spool drops, ...
    edgekit/v1/<fleet>/<device>/cmd        host → device commands (request id)
    edgekit/v1/<fleet>/<device>/ack        device → host replies to commands

Every payload is a UTF-8 JSON *envelope* (documented in ``docs/telemetry.md``)::

    {"schema": 1, "kind": "telemetry", "fleet": "f", "device": "d",
     "boot": 7, "seq": 1234, "ts": 1764000000.123, "historical": false, "body": {...}}

``boot`` is a counter persisted by the agent and incremented at every start;
``seq`` counts messages within a boot. Together they order a device's messages,
let the monitor de-duplicate replays from the on-disk spool, detect gaps, and
ignore a stale last will (whose ``boot`` is older than the device's current one),
as Sparkplug B does with its bdSeq. ``historical`` is true for messages replayed
from the spool after an outage, so dashboards do not treat them as live.

Rules: fields are only appended; a reader ignores unknown fields and refuses a
newer ``schema`` major with a counted error, never a crash.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgekit/v1"
KINDS = ("state", "telemetry", "event", "cmd", "ack")
DEVICE_KINDS = ("state", "telemetry", "event", "ack")  # what a device may publish
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# body fields each kind must carry (more are allowed)
REQUIRED_BODY: dict[str, tuple[str, ...]] = {
    "state": ("status",),
    "telemetry": ("window_s", "inferences"),
    "event": ("type",),
    "cmd": ("request_id", "command"),
    "ack": ("request_id", "ok"),
}
STATUSES = ("online", "offline")
COMMANDS = ("ping", "config", "bench", "install", "rollback")


class ProtocolError(ValueError):
    """A topic or payload that does not follow this contract."""


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(f"{what} {value!r} must be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    return value


def topic(fleet: str, device: str, kind: str) -> str:
    if kind not in KINDS:
        raise ProtocolError(f"kind {kind!r} is not one of {KINDS}")
    return f"{TOPIC_ROOT}/{check_name(fleet, 'fleet')}/{check_name(device, 'device')}/{kind}"


def fleet_filter(fleet: str = "+", kind: str = "+") -> str:
    """Subscription filter for every device of ``fleet`` (``+``: all fleets)."""
    return f"{TOPIC_ROOT}/{fleet}/+/{kind}"


def shared(filter_: str, group: str) -> str:
    """MQTT v5 shared subscription: monitors in ``group`` split the messages between them."""
    return f"$share/{check_name(group, 'group')}/{filter_}"


def parse_topic(value: str) -> tuple[str, str, str]:
    """``edgekit/v1/f/d/telemetry`` → ``("f", "d", "telemetry")``."""
    parts = value.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT or parts[4] not in KINDS:
        raise ProtocolError(f"topic {value!r} is not {TOPIC_ROOT}/<fleet>/<device>/<kind>")
    check_name(parts[2], "fleet")
    check_name(parts[3], "device")
    return parts[2], parts[3], parts[4]


def envelope(kind: str, fleet: str, device: str, boot: int, seq: int, body: dict[str, Any],
             ts: float | None = None, historical: bool = False) -> dict[str, Any]:
    msg = {"schema": SCHEMA_VERSION, "kind": kind, "fleet": fleet, "device": device, "boot": int(boot),
           "seq": int(seq), "ts": time.time() if ts is None else float(ts), "historical": bool(historical),
           "body": body}
    validate(msg)
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()


def validate(msg: Any) -> dict[str, Any]:
    """Check an envelope; returns it, raises :class:`ProtocolError` with the reason."""
    if not isinstance(msg, dict):
        raise ProtocolError("payload is not a JSON object")
    schema = msg.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise ProtocolError("schema is missing or not an integer")
    if schema > SCHEMA_VERSION:
        raise ProtocolError(f"schema {schema} is newer than this reader ({SCHEMA_VERSION})")
    kind = msg.get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"kind {kind!r} is not one of {KINDS}")
    for key in ("fleet", "device"):
        check_name(msg.get(key), key)
    for key in ("boot", "seq"):
        v = msg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ProtocolError(f"{key} must be a non-negative integer")
    if not isinstance(msg.get("ts"), (int, float)) or isinstance(msg.get("ts"), bool):
        raise ProtocolError("ts must be a number (UNIX seconds)")
    if not isinstance(msg.get("historical", False), bool):
        raise ProtocolError("historical must be a boolean")
    body = msg.get("body")
    if not isinstance(body, dict):
        raise ProtocolError("body must be an object")
    missing = [k for k in REQUIRED_BODY[kind] if k not in body]
    if missing:
        raise ProtocolError(f"{kind} body lacks {missing}")
    if kind == "state" and body["status"] not in STATUSES:
        raise ProtocolError(f"state status {body['status']!r} is not one of {STATUSES}")
    return msg


def decode(topic_name: str, payload: bytes) -> dict[str, Any]:
    """Parse and validate a received message; the topic must agree with the envelope."""
    fleet, device, kind = parse_topic(topic_name)
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"payload is not JSON ({exc})") from None
    validate(msg)
    if (msg["fleet"], msg["device"], msg["kind"]) != (fleet, device, kind):
        raise ProtocolError(f"envelope says {msg['fleet']}/{msg['device']}/{msg['kind']}, topic says "
                            f"{fleet}/{device}/{kind}")
    return msg
