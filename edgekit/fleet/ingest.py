"""Ingest: MQTT messages → validated rows → the store, in batches, acknowledged after commit.

One :class:`Ingestor` turns received ``(topic, payload, retained)`` into rows
(validation is :mod:`edgekit_runtime.contract.fleet_protocol`'s, the one contract) and
counts what it refuses, per reason. :func:`run_ingest` is one worker's loop: a
:mod:`.wire` connection, a batch of up to ``batch_max`` messages read from the
socket, one transaction, then the batch's PUBACKs — so the broker re-delivers
anything the monitor had not stored when it died, and the store's unique key
drops the copy it had.

Workers run as threads (small fleets, tests) or processes (``--workers N``):
each telemetry/event/ack message reaches exactly one worker of the group
through an MQTT v5 shared subscription. ``state`` is read with a normal
subscription by the monitor itself, because a broker does not hand retained
messages to shared subscriptions.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edgekit_runtime.contract import fleet_protocol
from edgekit_runtime.contract.fleet_protocol import ProtocolError

from . import wire
from .connection import BrokerSettings
from .store import FleetStore
from .stores import open_store

log = logging.getLogger("edgekit.fleet.ingest")

try:  # 4-5x faster than the standard library on telemetry bodies (latency sketches are many small keys)
    from orjson import loads as _loads

    JSON_BACKEND = "orjson"
except ImportError:  # the standard library does the same job, slower
    _loads = json.loads
    JSON_BACKEND = "json"

# why a payload on a fleet topic was refused (keys of the `malformed` table)
MALFORMED_REASONS = {
    "bad_topic": "topic is not edgekit/v1/<fleet>/<device>/<kind> with valid names",
    "not_json": "payload is not UTF-8 JSON",
    "newer_schema": "envelope schema is newer than this monitor",
    "bad_envelope": "envelope fields missing or of the wrong type",
    "out_of_range": "a number outside its range or not finite (boot, seq, ts, counters, latencies, readings)",
    "too_large": "the payload, a string, a collection or the nesting beyond the contract's limits",
    "topic_mismatch": "envelope's fleet/device/kind differ from the topic's",
    "not_from_device": "a device kind the monitor does not ingest (cmd)",
    "store_refused": "the store refused the row (the rest of its batch was stored)",
}
# a device clock further than this from the monitor's is not trusted: the row is stored at the receive time
# (the envelope keeps the device's), and counted as `clock_skew`. Replayed (historical) and retained messages
# may be older: they report the past.
MAX_CLOCK_SKEW_S = 86400.0
INGEST_KINDS = ("telemetry", "event", "ack")
LINGER_S = 0.002  # shared subscription; `state` is read by the monitor


def _num(value: Any) -> Optional[float]:
    cls = value.__class__
    if cls is float:
        return value if math.isfinite(value) else None
    if cls is int:  # (bool is not int here: its class is bool)
        return float(value)
    return None


def _max_num(values: Any) -> Optional[float]:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return max(nums) if nums else None


def telemetry_figures(body: dict[str, Any]) -> tuple:
    """``(p50_ms, p99_ms, inferences, calls, errors, temp_c, cpu_percent, drift_psi)`` of a telemetry body.

    Reads the agent's layout (``latency_ms.p99``, ``system.temperature_c``
    per zone, ``drift.inputs.<name>.psi``); a figure that is absent or not a
    number is None. Temperature and PSI are the maximum over zones/inputs.
    """
    get = body.get
    lat = get("latency_ms")
    p50 = p99 = None
    if lat.__class__ is dict:
        p50, p99 = _num(lat.get("p50")), _num(lat.get("p99"))
    errors = get("errors")
    if errors.__class__ is dict:
        errors = sum(v for v in errors.values() if v.__class__ is int)
    system = get("system")
    temp = cpu = None
    if system.__class__ is dict:
        t = system.get("temperature_c")
        temp = _max_num(t.values()) if t.__class__ is dict else _num(t)
        cpu = _num(system.get("cpu_percent"))
    drift = get("drift")
    psi = None
    if drift.__class__ is dict:
        inputs = drift.get("inputs")
        if inputs.__class__ is dict:
            psi = _max_num([v.get("psi") for v in inputs.values() if v.__class__ is dict])
        else:
            psi = _num(drift.get("psi"))
    inferences = get("inferences")
    calls = get("calls")
    return (p50, p99, inferences if inferences.__class__ is int else None,
            calls if calls.__class__ is int else None, errors if errors.__class__ is int else None,
            temp, cpu, psi)


_NO_FIGURES = (None,) * 8

_MAX_INT = fleet_protocol.MAX_INT
_MAX_TS = fleet_protocol.MAX_TS
_MAX_COUNT = fleet_protocol.MAX_COUNT
_MAX_WINDOW_S = fleet_protocol.MAX_WINDOW_S
_MAX_LATENCY_MS = fleet_protocol.MAX_LATENCY_MS
_MAX_TEMP_C = fleet_protocol.MAX_TEMP_C
_MAX_CPU_PERCENT = fleet_protocol.MAX_CPU_PERCENT
_MAX_PSI = fleet_protocol.MAX_PSI


def _in(v: Any, low: float, high: float) -> bool:
    """``v`` is a JSON number in ``[low, high]`` (NaN and infinities compare False)."""
    cls = v.__class__
    return (cls is float or cls is int) and low <= v <= high


def _count(v: Any) -> bool:
    return v.__class__ is int and 0 <= v <= _MAX_COUNT


def _counts(v: Any) -> Optional[int]:
    """A valid ``errors``/``errors_by_code`` value's total (0 when absent), or -1 when it may not be valid."""
    if v is None:
        return 0
    if v.__class__ is int:
        return v if 0 <= v <= _MAX_COUNT else -1
    if v.__class__ is not dict:
        return -1
    total = 0
    for x in v.values():
        if x.__class__ is not int or not 0 <= x <= _MAX_COUNT:
            return -1
        total += x
    return total if total <= _MAX_COUNT else -1


def fast_telemetry(msg: Any, fleet: str, device: str) -> Optional[tuple]:
    """The figures (as :func:`telemetry_figures`) of a telemetry envelope from ``fleet``/``device`` that is
    certainly valid, or None when it may not be.

    Why: the contract's checks (``validate`` + ``check_telemetry``) and the
    figures' reading walk the same few fields; done in one pass on exact JSON
    types they cost a third as much, and telemetry is nearly all a fleet sends.
    This only ever accepts less than the contract: anything unusual (a bool, a
    missing field, a value at a limit, another schema) returns None, and the
    contract then decides, with its own refusal reason and message.
    """
    if msg.__class__ is not dict:
        return None
    get = msg.get
    schema, boot, seq, ts, body = get("schema"), get("boot"), get("seq"), get("ts"), get("body")
    if not (schema.__class__ is int and schema == 1 and get("kind") == "telemetry" and get("fleet") == fleet
            and get("device") == device and boot.__class__ is int and 0 <= boot <= _MAX_INT
            and seq.__class__ is int and 0 <= seq <= _MAX_INT and _in(ts, 0.0, _MAX_TS)
            and get("historical", False).__class__ is bool and body.__class__ is dict):
        return None
    get = body.get
    inferences, calls = get("inferences"), get("calls")
    if not (_in(get("window_s"), 0.0, _MAX_WINDOW_S) and _count(inferences) and (calls is None or _count(calls))):
        return None
    errors = _counts(get("errors"))
    if errors < 0 or _counts(get("errors_by_code")) < 0:
        return None
    if get("errors") is None:
        errors = None
    p50 = p99 = temp = cpu = psi = None
    lat = get("latency_ms")
    if lat is not None:
        if lat.__class__ is not dict:
            return None
        for k, v in lat.items():
            cls = v.__class__
            if (cls is float or cls is int) and k != "count":
                if not 0.0 <= v <= _MAX_LATENCY_MS:
                    return None
            elif k == "count":
                if v is not None and not _count(v):
                    return None
            elif v is not None and k != "sketch":
                return None
        p50, p99 = lat.get("p50"), lat.get("p99")
        if p50 is not None:
            p50 = float(p50)
        if p99 is not None:
            p99 = float(p99)
    system = get("system")
    if system is not None:
        if system.__class__ is not dict:
            return None
        cpu = system.get("cpu_percent")
        if cpu is not None:
            if not _in(cpu, 0.0, _MAX_CPU_PERCENT):
                return None
            cpu = float(cpu)
        t = system.get("temperature_c")
        if t.__class__ is dict:
            for v in t.values():
                if v is not None:
                    if not _in(v, -273.15, _MAX_TEMP_C):
                        return None
                    temp = float(v) if temp is None else max(temp, float(v))
        elif t is not None:
            if not _in(t, -273.15, _MAX_TEMP_C):
                return None
            temp = float(t)
    drift = get("drift")
    if drift is not None:
        if drift.__class__ is not dict:
            return None
        psi = drift.get("psi")
        if psi is not None:
            if not _in(psi, 0.0, _MAX_PSI):
                return None
            psi = float(psi)
        inputs = drift.get("inputs")
        if inputs is not None:
            if inputs.__class__ is not dict:
                return None
            psi = None  # (per input, when there are inputs)
            for v in inputs.values():
                if v.__class__ is dict:
                    x = v.get("psi")
                    if x is not None:
                        if not _in(x, 0.0, _MAX_PSI):
                            return None
                        psi = float(x) if psi is None else max(psi, float(x))
    return (p50, p99, inferences, calls, errors, temp, cpu, psi)


@dataclass
class Ingestor:
    """Validates messages and collects rows and refusals for the next batch."""

    fleet: Optional[str] = None  # only this fleet's topics (None: any)
    rows: list = field(default_factory=list)
    malformed: dict = field(default_factory=dict)  # reason -> [count, last topic, last error, time]
    refused: int = 0
    counters: dict = field(default_factory=dict)  # name -> count for the store's `counters` (clock_skew)
    _topics: dict = field(default_factory=dict)  # topic -> (fleet, device, kind) or ProtocolError text
    _logged: dict = field(default_factory=dict)

    def add(self, topic: str, payload: bytes, retained: bool = False, received: Optional[float] = None) -> bool:
        """Validate one message and queue its row; a refusal is counted (never raised)."""
        try:
            return self._add(topic, payload, retained, received)
        except Exception as exc:  # a payload nothing above foresaw: refused and counted, ingest goes on
            log.debug("unforeseen refusal on %s", topic[:300], exc_info=True)
            return self._refuse("bad_envelope", topic, f"unreadable payload ({type(exc).__name__}: {exc})")

    def _add(self, topic: str, payload: bytes, retained: bool, received: Optional[float]) -> bool:
        parsed = self._topics.get(topic)
        if parsed is None:
            try:
                parsed = fleet_protocol.parse_topic(topic)
                if self.fleet not in (None, "+") and parsed[0] != self.fleet:
                    raise ProtocolError(f"topic {topic!r} is not of fleet {self.fleet!r}")
            except ProtocolError as exc:
                parsed = str(exc)
            if len(self._topics) < 200_000:
                self._topics[topic] = parsed
        if isinstance(parsed, str):
            return self._refuse("bad_topic", topic, parsed)
        fleet, device, kind = parsed
        if kind == "cmd":
            return self._refuse("not_from_device", topic, "cmd messages are host → device")
        if isinstance(payload, str):
            payload = payload.encode()
        if len(payload) > fleet_protocol.MAX_PAYLOAD_BYTES:
            return self._refuse("too_large", topic, f"payload of {len(payload)} bytes "
                                                    f"(at most {fleet_protocol.MAX_PAYLOAD_BYTES})")
        try:
            msg = _loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # (orjson.JSONDecodeError is a ValueError)
            return self._refuse("not_json", topic, f"payload is not JSON ({exc})")
        figures = fast_telemetry(msg, fleet, device) if kind == "telemetry" else None
        try:
            if figures is None:
                fleet_protocol.validate(msg)
            # (cheap proofs first: no string is longer than the payload, no nesting deeper than its brackets)
            if len(payload) > fleet_protocol.MAX_STRING or \
                    payload.count(b"{") + payload.count(b"[") > fleet_protocol.MAX_DEPTH:
                fleet_protocol.check_limits(msg)
            if figures is None and kind == "telemetry":
                fleet_protocol.check_telemetry(msg["body"])
        except ProtocolError as exc:
            return self._refuse(exc.reason, topic, str(exc))
        if figures is None:
            if msg["fleet"] != fleet or msg["device"] != device or msg["kind"] != kind:
                return self._refuse("topic_mismatch", topic, f"envelope says {msg['fleet']}/{msg['device']}/"
                                                             f"{msg['kind']}, topic says {fleet}/{device}/{kind}")
            figures = telemetry_figures(msg["body"]) if kind == "telemetry" else _NO_FIGURES
        text = payload.decode()
        now = time.time() if received is None else received
        historical = msg.get("historical") is True
        ts = float(msg["ts"])
        skew = ts - now
        if skew > MAX_CLOCK_SKEW_S or (skew < -MAX_CLOCK_SKEW_S and not (historical or retained)):
            self._clock_skew(topic, skew)
            ts = now
        seq = msg["seq"]
        if seq == 0 and kind == "state":
            # a will: every connection of a boot has one, all with seq 0; the store keeps each under -connection
            # (the unique key would drop a second death in one boot as a duplicate of the first)
            connection = msg["body"].get("connection")
            if connection.__class__ is int and 0 < connection <= fleet_protocol.MAX_INT:
                seq = -connection
        self.rows.append((fleet, device, kind, msg["boot"], seq, ts, now, 1 if historical else 0,
                          1 if retained else 0, *figures, text))
        return True

    def _clock_skew(self, topic: str, skew: float) -> None:
        n = self.counters.get("clock_skew", 0) + 1
        self.counters["clock_skew"] = n
        logged = self._logged.get("clock_skew", 0) + 1
        self._logged["clock_skew"] = logged
        if logged <= 5 or logged % 1000 == 0:
            log.warning("%s: the device clock is %+.0f s off the monitor's; stored at the receive time "
                        "(%d so far)", topic, skew, logged)

    def _refuse(self, reason: str, topic: str, error: str) -> bool:
        self.refused += 1
        topic = topic[:300]
        entry = self.malformed.get(reason)
        if entry is None:
            self.malformed[reason] = [1, topic, error[:500], time.time()]
        else:
            entry[0] += 1
            entry[1], entry[2], entry[3] = topic, error[:500], time.time()
        n = self._logged.get(reason, 0) + 1
        self._logged[reason] = n
        if n <= 5 or n % 1000 == 0:
            log.warning("refused a message on %s (%s, %d so far): %s", topic, reason, n, error[:200])
        return False

    def take(self) -> tuple[list, dict]:
        rows, bad = self.rows, self.malformed
        self.rows, self.malformed = [], {}
        return rows, bad

    def take_counters(self) -> dict:
        counters, self.counters = self.counters, {}
        return counters


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    refused: int = 0
    batches: int = 0
    reconnects: int = 0


def subscription_filters(fleet: str, group: Optional[str], kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for kind in kinds:
        f = fleet_protocol.fleet_filter(fleet or "+", kind)
        out.append((fleet_protocol.shared(f, group) if group else f, 1))
    return out


def run_ingest(settings: BrokerSettings, store_path: str, fleet: str, *, client_id: str,
               group: Optional[str], kinds: tuple[str, ...] = INGEST_KINDS, should_stop: Callable[[], bool],
               batch_max: int = 4000, flush_s: float = 0.05, session_expiry: int = 0,
               on_connected: Optional[Callable[[], None]] = None, on_batch: Optional[Callable[[int, int], None]] = None,
               stats: Optional[IngestStats] = None, reconnect_max_s: float = 30.0) -> IngestStats:
    """One ingest worker: subscribe, store batches, ack them; reconnects until ``should_stop()``.

    The first connection's failure is raised (:class:`~.connection.FleetConnectionError`)
    so a wrong password or address is reported at once; later losses are retried
    with backoff.
    """
    stats = stats or IngestStats()
    store = open_store(store_path, autocheckpoint=False)
    ingestor = Ingestor(fleet=fleet)
    filters = subscription_filters(fleet, group, kinds)
    first = True
    delay = 0.5
    try:
        while not should_stop():
            try:
                conn = settings.open_wire(client_id, clean_start=session_expiry == 0, session_expiry=session_expiry)
                conn.subscribe(filters)
            except (OSError, wire.WireError) as exc:
                if first:
                    raise settings.connection_error(exc) from None
                log.warning("ingest %s: cannot reconnect (%s); retrying in %.1f s", client_id, exc, delay)
                _sleep_unless(should_stop, delay)
                delay = min(delay * 2, reconnect_max_s)
                continue
            if not first:
                stats.reconnects += 1
                log.warning("ingest %s: reconnected", client_id)
            first = False
            delay = 0.5
            if on_connected:
                on_connected()
            try:
                _pump(conn, store, ingestor, should_stop, batch_max, flush_s, stats, on_batch)
            except (OSError, wire.WireError) as exc:
                log.warning("ingest %s: connection lost (%s)", client_id, exc)
            finally:
                conn.close()
    finally:
        store.close()
    return stats


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not should_stop():
        time.sleep(min(0.1, end - time.monotonic()))


class _Committer(threading.Thread):
    """Stores each batch, then sends its PUBACKs, while the reader thread parses the next one.

    (sqlite3 releases the GIL while SQLite works, so storing overlaps parsing.)
    At most two batches wait; the reader blocks behind them (back-pressure).
    """

    def __init__(self, store: FleetStore, sock: socket.socket, send_lock: threading.Lock, stats: IngestStats,
                 on_batch: Optional[Callable[[int, int], None]]):
        super().__init__(name="edgekit-ingest-commit", daemon=True)
        self.store = store
        self.sock = sock
        self.send_lock = send_lock
        self.stats = stats
        self.on_batch = on_batch
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        stats = self.stats
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                self.queue.task_done()
                continue  # drain: the reader raises the error
            rows, bad, pids, counters = item
            try:
                if rows or bad or counters:
                    n_received = len(rows) + sum(v[0] for v in bad.values())
                    new = self.store.insert_batch(rows, bad, counters)
                    stats.received += n_received
                    stats.stored += new
                    stats.refused += n_received - len(rows) + self.store.last_refused
                    stats.batches += 1
                    if self.on_batch:
                        self.on_batch(n_received, new)
                if pids:  # acknowledged only now that the batch is committed
                    acks = b"".join([wire.puback_packet(p) for p in pids])
                    with self.send_lock:
                        self.sock.sendall(acks)
            except BaseException as exc:  # raised again in the reader's thread
                self.error = exc
            finally:
                self.queue.task_done()

    @property
    def busy(self) -> bool:
        """A batch is queued or being stored/acknowledged (the reader lets its next batch grow meanwhile)."""
        return self.queue.unfinished_tasks > 0

    def put(self, rows: list, bad: dict, pids: list[int], counters: Optional[dict] = None) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((rows, bad, pids, counters or {}))

    def finish(self) -> None:
        """Commit and acknowledge what is queued, then end; raises the first error."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _pump(conn: "wire.WireConnection", store: FleetStore, ingestor: Ingestor, should_stop: Callable[[], bool],
          batch_max: int, flush_s: float, stats: IngestStats, on_batch: Optional[Callable[[int, int], None]]) -> None:
    sock = conn.sock
    tls = isinstance(sock, ssl.SSLSocket)
    reader = conn.reader
    keepalive = conn.keepalive
    last_sent = time.monotonic()
    pids: list[int] = []
    add = ingestor.add
    pending = reader.pending
    feed = reader.feed_split
    reader.pending = []
    send_lock = threading.Lock()
    committer = _Committer(store, sock, send_lock, stats, on_batch)
    committer.start()
    try:
        while not should_stop():
            batch_start = None
            # read until the batch is full, the socket is drained, or flush_s passed
            while True:
                publishes, others = [], pending
                pending = []
                if not others:
                    # TLS: bytes already decrypted wait inside the SSL object, invisible to select()
                    if not (tls and sock.pending()):
                        # once a batch has begun, linger only briefly: the broker stops sending when its
                        # in-flight window to us is full, and only our PUBACKs (after the commit) reopen it
                        wait = 0.2 if batch_start is None else \
                            max(0.0, min(LINGER_S, flush_s - (time.monotonic() - batch_start)))
                        readable, _, _ = select.select([sock], [], [], wait)
                        if not readable:
                            if batch_start is not None and committer.busy and \
                                    time.monotonic() - batch_start < flush_s:
                                # the store is still busy with the previous batch: this one may as well grow
                                # meanwhile (fewer, larger transactions when the store is the bottleneck)
                                continue
                            break
                    try:
                        data = sock.recv(1 << 20)
                    except (BlockingIOError, socket.timeout):
                        continue
                    if not data:
                        raise wire.WireError("the broker closed the connection")
                    publishes, others = feed(data)
                else:  # what arrived with the handshake
                    publishes = [wire.parse_publish(f, b) for t, f, b in others if t == wire.PUBLISH]
                    others = [p for p in others if p[0] != wire.PUBLISH]
                now = time.time()
                for topic, pid, payload, retained in publishes:
                    add(topic, payload, retained, now)
                    if pid:
                        pids.append(pid)
                for ptype, flags, body in others:
                    if ptype == wire.DISCONNECT:
                        code = body[0] if body else 0
                        raise wire.WireError(f"the broker disconnected us: {wire.reason_text(code)}", code)
                    # PINGRESP, SUBACK: nothing to do
                if batch_start is None and (ingestor.rows or ingestor.malformed):
                    batch_start = time.monotonic()
                if len(ingestor.rows) >= batch_max or (batch_start is not None
                                                        and time.monotonic() - batch_start >= flush_s):
                    break
            rows, bad = ingestor.take()
            counters = ingestor.take_counters()
            if rows or bad or pids or counters:
                committer.put(rows, bad, pids, counters)
                pids = []
                last_sent = time.monotonic()
            if time.monotonic() - last_sent > keepalive / 2:
                with send_lock:
                    sock.sendall(wire.PINGREQ_PACKET)
                last_sent = time.monotonic()
    finally:
        committer.finish()
