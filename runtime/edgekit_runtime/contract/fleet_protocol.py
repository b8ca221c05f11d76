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

Limits: whatever a device sends is bounded before anyone stores it. ``validate``
bounds the envelope's numbers (``boot``/``seq`` to 2^53 - 1, ``ts`` finite and
within 1970..2242); :func:`check_limits` bounds a payload's size, nesting,
strings and collections; :func:`check_telemetry` the figures a monitor keeps
(counters, latencies, environment readings). Each raises :class:`ProtocolError`
whose ``reason`` says which rule failed.
"""

from __future__ import annotations

import json
import math
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

# -- limits on what a device may send (a monitor refuses the rest, counted, never a crash) ----------------
MAX_PAYLOAD_BYTES = 256 * 1024  # one message (the agent's telemetry is ~1.3 KB)
MAX_DEPTH = 32  # nesting of objects/arrays, the envelope included (the agent's is 6)
MAX_ITEMS = 4096  # members of one object or array (a latency sketch has at most ~1,100 buckets)
MAX_STRING = 4096  # characters of one string or key
MAX_INT = 2**53 - 1  # boot, seq: exact in every JSON reader's double, far inside SQLite's signed 64 bits
MAX_TS = float(2**33)  # device clock, UNIX s: up to the year 2242 (0 is the lowest)
MAX_COUNT = 10**12  # inferences, calls, errors of one telemetry window
MAX_WINDOW_S = 30 * 86400.0  # a telemetry window (a device suspended for days reports one long window)
MAX_LATENCY_MS = 86400e3  # one inference: a day
MAX_TEMP_C = 1000.0  # (and at least absolute zero)
MAX_CPU_PERCENT = 100.0 * 4096  # per-process figures exceed 100 % on several cores
MAX_PSI = 1e6
# why a message breaks the contract (ProtocolError.reason)
REASONS = ("bad_envelope", "newer_schema", "out_of_range", "too_large")
COMMANDS = ("ping", "config", "bench", "install", "rollback")


class ProtocolError(ValueError):
    """A topic or payload that does not follow this contract; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, message: str, reason: str = "bad_envelope"):
        super().__init__(message)
        self.reason = reason


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(v: Any, what: str, high: int, low: int = 0) -> int:
    """An integer in ``[low, high]``; a wrong type is ``bad_envelope``, a wrong value ``out_of_range``."""
    if not _is_int(v):
        raise ProtocolError(f"{what} must be an integer, not {type(v).__name__}")
    if not low <= v <= high:
        raise ProtocolError(f"{what} {_short(v)} is outside [{low}, {high}]", "out_of_range")
    return v


def check_number(v: Any, what: str, low: float, high: float) -> float:
    """A finite number in ``[low, high]`` (an integer too big for a double is out of range)."""
    if not _is_num(v):
        raise ProtocolError(f"{what} must be a number, not {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise ProtocolError(f"{what} {_short(v)} is outside [{low:g}, {high:g}]", "out_of_range") from None
    if not (math.isfinite(f) and low <= f <= high):
        raise ProtocolError(f"{what} {_short(v)} is outside [{low:g}, {high:g}]", "out_of_range")
    return f


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."

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
        raise ProtocolError(f"schema {schema} is newer than this reader ({SCHEMA_VERSION})", "newer_schema")
    kind = msg.get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"kind {kind!r} is not one of {KINDS}")
    for key in ("fleet", "device"):
        check_name(msg.get(key), key)
    for key in ("boot", "seq"):
        check_int(msg.get(key), key, MAX_INT)
    if not _is_num(msg.get("ts")):
        raise ProtocolError("ts must be a number (UNIX seconds)")
    check_number(msg["ts"], "ts", 0.0, MAX_TS)
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


def check_limits(value: Any, depth: int = 1) -> None:
    """Bound nesting (:data:`MAX_DEPTH`), strings and keys (:data:`MAX_STRING`) and collections
    (:data:`MAX_ITEMS`) of a decoded payload; raises :class:`ProtocolError` (``too_large``)."""
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ProtocolError(f"a string of {len(value)} characters (at most {MAX_STRING})", "too_large")
        return
    if isinstance(value, (dict, list)):
        if depth > MAX_DEPTH:
            raise ProtocolError(f"nested deeper than {MAX_DEPTH} levels", "too_large")
        if len(value) > MAX_ITEMS:
            raise ProtocolError(f"a collection of {len(value)} items (at most {MAX_ITEMS})", "too_large")
        if isinstance(value, dict):
            for k, v in value.items():
                check_limits(k, depth)
                check_limits(v, depth + 1)
        else:
            for v in value:
                check_limits(v, depth + 1)


def check_telemetry(body: dict[str, Any]) -> None:
    """The figures a monitor keeps from a telemetry body, each absent, null, or of its type and range.

    ``window_s`` and ``inferences`` (required), ``calls``, ``errors`` (a count
    or counts by code) and ``errors_by_code``; ``latency_ms``'s numbers;
    ``system.cpu_percent`` and ``system.temperature_c`` (one reading or one per
    zone); ``drift.psi`` and ``drift.inputs.<name>.psi``.
    """
    check_number(body.get("window_s"), "body.window_s", 0.0, MAX_WINDOW_S)
    check_int(body.get("inferences"), "body.inferences", MAX_COUNT)
    if body.get("calls") is not None:
        check_int(body["calls"], "body.calls", MAX_COUNT)
    for key in ("errors", "errors_by_code"):
        errors = body.get(key)
        if isinstance(errors, dict):
            total = sum(check_int(v, f"body.{key}[{_short(k)}]", MAX_COUNT) for k, v in errors.items())
            check_int(total, f"the sum of body.{key}", MAX_COUNT)
        elif errors is not None:
            check_int(errors, f"body.{key}", MAX_COUNT)
    latency = body.get("latency_ms")
    if isinstance(latency, dict):
        for k, v in latency.items():
            if k == "count" and v is not None:
                check_int(v, "body.latency_ms.count", MAX_COUNT)
            elif k != "sketch" and v is not None:
                check_number(v, f"body.latency_ms.{_short(k)}", 0.0, MAX_LATENCY_MS)
    elif latency is not None:
        raise ProtocolError("body.latency_ms must be an object")
    system = body.get("system")
    if isinstance(system, dict):
        if system.get("cpu_percent") is not None:
            check_number(system["cpu_percent"], "body.system.cpu_percent", 0.0, MAX_CPU_PERCENT)
        temp = system.get("temperature_c")
        for zone, v in (temp.items() if isinstance(temp, dict) else [("", temp)]):
            if v is not None:
                check_number(v, "body.system.temperature_c" + (f".{_short(zone)}" if zone else ""), -273.15,
                             MAX_TEMP_C)
    elif system is not None:
        raise ProtocolError("body.system must be an object")
    drift = body.get("drift")
    if isinstance(drift, dict):
        if drift.get("psi") is not None:
            check_number(drift["psi"], "body.drift.psi", 0.0, MAX_PSI)
        inputs = drift.get("inputs")
        if isinstance(inputs, dict):
            for name, v in inputs.items():
                if isinstance(v, dict) and v.get("psi") is not None:
                    check_number(v["psi"], f"body.drift.inputs.{_short(name)}.psi", 0.0, MAX_PSI)
        elif inputs is not None:
            raise ProtocolError("body.drift.inputs must be an object")
    elif drift is not None:
        raise ProtocolError("body.drift must be an object")


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
