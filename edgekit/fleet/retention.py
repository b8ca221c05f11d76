"""Retention: raw telemetry kept for a while, then folded into per-hour rows; old rows deleted in small steps.

What a telemetry message carries decides what an hour can honestly keep. The
agent's body has ``latency_ms`` with ``count``, ``mean``, ``min``, ``max``,
window percentiles and the window's latency **sketch** (DDSketch buckets,
:class:`edgekit_runtime.agent.metrics.LatencyHistogram`): two sketches of the
same accuracy merge by adding bucket counts, so an hour's p50/p90/p99 are
computed from the merged sketch with the device's own error bound (1 %
relative), never by averaging window percentiles. Counters sum. Temperature,
CPU and drift PSI keep ``n``, ``sum`` and ``max`` (their mean and maximum
merge exactly). Each window's p99 is kept as ``p99_windows`` / ``p99_sum_ms``
/ ``p99_max_ms`` — the worst window and the mean of window p99s, named as
such; they are not percentiles of the hour. A message without a sketch (an
older agent, a hand-made body) still counts, sums and sets min/max; the hour
says how many messages its sketch covers (``sketch_messages``).

Table ``telemetry_hourly`` (created by :func:`ensure_schema`, on SQLite and
PostgreSQL alike): one row per (fleet, device, hour), ``hour`` being the
UNIX second the UTC hour starts at, computed in Python so both engines agree.

:func:`rollup` *moves* raw rows: in one transaction it deletes the raw rows it
folded and merges them into their hour rows. That is what makes it idempotent
and safe beside a running monitor: a row is either raw or in an hour, never
both, never neither; a raw row that arrives late for an hour already rolled up
(a device's spool replayed after days offline) is merged into that hour by the
next run. Rows are read and folded *before* the write transaction, which then
only deletes them by id (a count that differs means another prune took them:
the step is undone and read again) and writes the hour rows, so ingest waits
at most one short transaction of ``batch_rows`` deletes.

Two raw rows are never deleted, whatever their age:

* the row with the highest ``id``: SQLite gives a new row ``max(id) + 1``, so
  deleting the newest row would hand its id to the next message, and the
  monitor's tracker (which tails by id) would skip it;
* each device's highest ``seq`` of its current boot: the tracker restores its
  sequence tracking from it after a restart; without it, an older event left
  in the store would make every message since look missing.

:func:`prune` rolls up telemetry older than ``keep_raw_s`` (to the hour
below), deletes events, acks and state older than ``keep_events_s``, hour
rows older than ``keep_rollups_s``, and gaps and alerts that closed before
``keep_rollups_s`` (open ones stay), each in transactions of at most
``batch_rows`` rows.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

from ..errors import ConfigError

log = logging.getLogger("edgekit.fleet.retention")

HOUR_S = 3600
BATCH_ROWS = 2_000  # rows per write transaction: ~50-150 ms of ingest waiting (benchmarks/fleet_retention.py)
DEFAULT_KEEP_RAW_S = 7 * 86400.0
DEFAULT_KEEP_EVENTS_S = 30 * 86400.0
DEFAULT_KEEP_ROLLUPS_S = 400 * 86400.0
MAX_SKETCH_KEY = 100_000  # |bucket index|: γ^100000 is far beyond any latency (1 % accuracy: 10^867)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS telemetry_hourly (
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    hour BIGINT NOT NULL,          -- UNIX s of the UTC hour's start
    messages BIGINT NOT NULL,      -- telemetry messages folded into the hour
    historical BIGINT NOT NULL,    -- of which replayed from the device's spool
    first_ts DOUBLE PRECISION, last_ts DOUBLE PRECISION,
    window_s DOUBLE PRECISION,     -- sum of the windows' lengths
    inferences BIGINT, calls BIGINT, errors BIGINT,
    lat_count BIGINT, lat_sum_ms DOUBLE PRECISION, lat_min_ms DOUBLE PRECISION, lat_max_ms DOUBLE PRECISION,
    sketch TEXT,                   -- JSON {relative_accuracy, unit, zero_count, buckets}: the windows' sketches merged
    sketch_messages BIGINT NOT NULL,
    p99_windows BIGINT NOT NULL, p99_sum_ms DOUBLE PRECISION, p99_max_ms DOUBLE PRECISION,
    temp_n BIGINT NOT NULL, temp_sum DOUBLE PRECISION, temp_max DOUBLE PRECISION,
    cpu_n BIGINT NOT NULL, cpu_sum DOUBLE PRECISION, cpu_max DOUBLE PRECISION,
    psi_n BIGINT NOT NULL, psi_sum DOUBLE PRECISION, psi_max DOUBLE PRECISION,
    PRIMARY KEY (fleet, device, hour)
)""",
    "CREATE INDEX IF NOT EXISTS telemetry_hourly_hour ON telemetry_hourly(hour)",
)

HOUR_COLUMNS = ("fleet", "device", "hour", "messages", "historical", "first_ts", "last_ts", "window_s",
                "inferences", "calls", "errors", "lat_count", "lat_sum_ms", "lat_min_ms", "lat_max_ms", "sketch",
                "sketch_messages", "p99_windows", "p99_sum_ms", "p99_max_ms", "temp_n", "temp_sum", "temp_max",
                "cpu_n", "cpu_sum", "cpu_max", "psi_n", "psi_sum", "psi_max")
_KEY = ("fleet", "device", "hour")
_UPSERT = (f"INSERT INTO telemetry_hourly ({', '.join(HOUR_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(HOUR_COLUMNS))}) ON CONFLICT (fleet, device, hour) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in HOUR_COLUMNS if c not in _KEY))
# what a raw telemetry row gives the fold (the payload only for window_s, latency count/mean/min/max, sketch)
_RAW = ("SELECT id, ts, historical, p99_ms, inferences, calls, errors, temp_c, cpu_percent, drift_psi, payload "
        "FROM messages WHERE fleet = ? AND device = ? AND kind = 'telemetry' AND ts < ? AND id < ? AND id <> ? "
        "ORDER BY ts LIMIT ?")

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*")
_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class RetentionError(ConfigError):
    """A retention setting is unusable (a duration that does not parse, raw kept longer than hours)."""


def parse_duration(text: str, option: str = "--keep-raw") -> float:
    """``90m``, ``36h``, ``7d``, ``30s`` or plain seconds → seconds (what ``fleet prune`` options read)."""
    m = _DURATION.fullmatch(str(text))
    if not m:
        raise RetentionError(f"{option} {text!r}: give a duration such as 36h, 7d, 90m or seconds")
    return float(m.group(1)) * _UNITS[m.group(2)]


def engine(store: Any) -> str:
    """``"sqlite"`` or ``"postgresql"`` (a store without the attribute is a SQLite :class:`FleetStore`)."""
    return getattr(store, "engine", "sqlite")


def hour_of(ts: float) -> int:
    """The UNIX second the UTC hour holding ``ts`` starts at."""
    return int(math.floor(ts / HOUR_S)) * HOUR_S


def ensure_schema(store: Any) -> None:
    """Create the hour table and its index where missing (both engines; idempotent)."""
    for stmt in _SCHEMA:
        store.db.execute(stmt)


def _begin(store: Any) -> None:
    # SQLite: take the write lock now, so the transaction never fails to upgrade a read lock beside ingest
    store.db.execute("BEGIN IMMEDIATE" if engine(store) == "sqlite" else "BEGIN")


# ----------------------------------------------------------------------------- one hour's figures
def _num(v: Any) -> Optional[float]:
    if v.__class__ is bool or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _sketch(lat: dict) -> Optional[tuple[float, int, dict[int, int]]]:
    """``(relative_accuracy, zero_count, buckets)`` of a window's sketch, None where it is absent or unusable.

    The contract checks a sketch's size, not its content, so anything odd here
    (a key that is no integer, a negative count) leaves the message out of the
    hour's sketch rather than failing the prune.
    """
    sk = lat.get("sketch")
    if not isinstance(sk, dict) or sk.get("unit", "s") != "s":
        return None
    acc, zero, buckets = sk.get("relative_accuracy"), sk.get("zero_count", 0), sk.get("buckets")
    if not (_num(acc) is not None and 0 < acc < 1 and isinstance(zero, int) and not isinstance(zero, bool)
            and zero >= 0 and isinstance(buckets, dict)):
        return None
    out: dict[int, int] = {}
    for k, c in buckets.items():
        try:
            ki = int(k)
        except (TypeError, ValueError):
            return None
        if abs(ki) > MAX_SKETCH_KEY or not isinstance(c, int) or isinstance(c, bool) or c < 0:
            return None
        if c:
            out[ki] = out.get(ki, 0) + c
    return float(acc), zero, out


def _add(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b if a is None else a if b is None else a + b


def _max(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b if a is None else a if b is None else max(a, b)


def _min(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b if a is None else a if b is None else min(a, b)


@dataclass
class Hour:
    """One (fleet, device, hour)'s merged figures; :meth:`merge` adds another hour's or a window's."""

    fleet: str
    device: str
    hour: int
    messages: int = 0
    historical: int = 0
    first_ts: Optional[float] = None
    last_ts: Optional[float] = None
    window_s: Optional[float] = None
    inferences: Optional[int] = None
    calls: Optional[int] = None
    errors: Optional[int] = None
    lat_count: Optional[int] = None
    lat_sum_ms: Optional[float] = None
    lat_min_ms: Optional[float] = None
    lat_max_ms: Optional[float] = None
    accuracy: Optional[float] = None
    zero_count: int = 0
    buckets: dict[int, int] = field(default_factory=dict)
    sketch_messages: int = 0
    p99_windows: int = 0
    p99_sum_ms: Optional[float] = None
    p99_max_ms: Optional[float] = None
    temp_n: int = 0
    temp_sum: Optional[float] = None
    temp_max: Optional[float] = None
    cpu_n: int = 0
    cpu_sum: Optional[float] = None
    cpu_max: Optional[float] = None
    psi_n: int = 0
    psi_sum: Optional[float] = None
    psi_max: Optional[float] = None

    # -- building ---------------------------------------------------------------------------
    def add_raw(self, ts: float, historical: int, p99: Any, inferences: Any, calls: Any, errors: Any,
                temp: Any, cpu: Any, psi: Any, payload: Optional[str]) -> None:
        """Fold one stored telemetry row (its figure columns, and its payload for the latency summary)."""
        self.messages += 1
        self.historical += 1 if historical else 0
        self.first_ts, self.last_ts = _min(self.first_ts, ts), _max(self.last_ts, ts)
        for name, v in (("inferences", inferences), ("calls", calls), ("errors", errors)):
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, (getattr(self, name) or 0) + v)
        for prefix, v in (("p99", p99), ("temp", temp), ("cpu", cpu), ("psi", psi)):
            v = _num(v)
            if v is None:
                continue
            if prefix == "p99":
                self.p99_windows += 1
                self.p99_sum_ms, self.p99_max_ms = _add(self.p99_sum_ms, v), _max(self.p99_max_ms, v)
            else:
                setattr(self, f"{prefix}_n", getattr(self, f"{prefix}_n") + 1)
                setattr(self, f"{prefix}_sum", _add(getattr(self, f"{prefix}_sum"), v))
                setattr(self, f"{prefix}_max", _max(getattr(self, f"{prefix}_max"), v))
        body = _body(payload)
        self.window_s = _add(self.window_s, _num(body.get("window_s")))
        lat = body.get("latency_ms")
        if not isinstance(lat, dict):
            return
        count, mean = lat.get("count"), _num(lat.get("mean"))
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            self.lat_count = (self.lat_count or 0) + count
            if mean is not None:
                self.lat_sum_ms = _add(self.lat_sum_ms, mean * count)
            self.lat_min_ms = _min(self.lat_min_ms, _num(lat.get("min")))
            self.lat_max_ms = _max(self.lat_max_ms, _num(lat.get("max")))
            sk = _sketch(lat)
            if sk is not None and (self.accuracy is None or sk[0] == self.accuracy):
                self.accuracy = sk[0]
                self.zero_count += sk[1]
                for k, c in sk[2].items():
                    self.buckets[k] = self.buckets.get(k, 0) + c
                self.sketch_messages += 1

    def merge(self, other: "Hour") -> None:
        """Add another part of the same hour (rows that arrived after the hour was rolled up)."""
        self.messages += other.messages
        self.historical += other.historical
        self.first_ts, self.last_ts = _min(self.first_ts, other.first_ts), _max(self.last_ts, other.last_ts)
        for name in ("window_s", "inferences", "calls", "errors", "lat_count", "lat_sum_ms", "p99_sum_ms",
                     "temp_sum", "cpu_sum", "psi_sum"):
            setattr(self, name, _add(getattr(self, name), getattr(other, name)))
        for name in ("p99_windows", "temp_n", "cpu_n", "psi_n"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("lat_max_ms", "p99_max_ms", "temp_max", "cpu_max", "psi_max"):
            setattr(self, name, _max(getattr(self, name), getattr(other, name)))
        self.lat_min_ms = _min(self.lat_min_ms, other.lat_min_ms)
        if other.sketch_messages and (self.accuracy is None or other.accuracy == self.accuracy):
            self.accuracy = other.accuracy
            self.zero_count += other.zero_count
            for k, c in other.buckets.items():
                self.buckets[k] = self.buckets.get(k, 0) + c
            self.sketch_messages += other.sketch_messages

    # -- storing ----------------------------------------------------------------------------
    def row(self) -> tuple:
        sketch = None
        if self.accuracy is not None:
            sketch = json.dumps({"relative_accuracy": self.accuracy, "unit": "s", "zero_count": self.zero_count,
                                 "buckets": {str(k): c for k, c in sorted(self.buckets.items())}},
                                separators=(",", ":"))
        values = asdict(self)
        values["sketch"] = sketch
        return tuple(values[c] for c in HOUR_COLUMNS)

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> "Hour":
        values = dict(zip(HOUR_COLUMNS, row))
        sketch = values.pop("sketch")
        hour = cls(**values)
        if sketch:
            sk = json.loads(sketch)
            hour.accuracy = float(sk["relative_accuracy"])
            hour.zero_count = int(sk["zero_count"])
            hour.buckets = {int(k): int(c) for k, c in sk["buckets"].items()}
        return hour

    # -- reading ----------------------------------------------------------------------------
    def quantile_ms(self, q: float) -> Optional[float]:
        """The hour's ``q``-quantile latency from the merged sketch (None without one)."""
        if self.accuracy is None or not (self.zero_count or self.buckets):
            return None
        from edgekit_runtime.agent.metrics import LatencyHistogram

        h = LatencyHistogram(self.accuracy)
        h.buckets = dict(self.buckets)
        h.zero_count = self.zero_count
        h.count = self.zero_count + sum(self.buckets.values())
        # the extremes clamp the sketch's answer; they are exact only when every window had a sketch
        exact = self.sketch_messages == self.messages
        h.min = self.lat_min_ms / 1e3 if exact and self.lat_min_ms is not None else 0.0
        h.max = self.lat_max_ms / 1e3 if exact and self.lat_max_ms is not None else math.inf
        value = h.quantile(q)
        return None if value is None or not math.isfinite(value) else value * 1e3

    def summary(self) -> dict[str, Any]:
        """What ``history`` shows for an hour: sums, means, maxima and sketch percentiles, each named for what it is."""
        def mean(s: Optional[float], n: Optional[int]) -> Optional[float]:
            return None if s is None or not n else s / n

        return {"fleet": self.fleet, "device": self.device, "hour": self.hour, "rollup": True,
                "messages": self.messages, "historical": self.historical, "first_ts": self.first_ts,
                "last_ts": self.last_ts, "window_s": self.window_s, "inferences": self.inferences,
                "calls": self.calls, "errors": self.errors,
                "error_rate": None if not self.calls or self.errors is None else self.errors / self.calls,
                "latency_count": self.lat_count, "mean_ms": mean(self.lat_sum_ms, self.lat_count),
                "min_ms": self.lat_min_ms, "max_ms": self.lat_max_ms,
                "p50_ms": self.quantile_ms(0.5), "p90_ms": self.quantile_ms(0.9), "p99_ms": self.quantile_ms(0.99),
                "sketch_messages": self.sketch_messages, "sketch_relative_accuracy": self.accuracy,
                "worst_window_p99_ms": self.p99_max_ms, "mean_window_p99_ms": mean(self.p99_sum_ms, self.p99_windows),
                "temp_c_max": self.temp_max, "temp_c_mean": mean(self.temp_sum, self.temp_n),
                "cpu_percent_max": self.cpu_max, "cpu_percent_mean": mean(self.cpu_sum, self.cpu_n),
                "drift_psi_max": self.psi_max, "drift_psi_mean": mean(self.psi_sum, self.psi_n)}


def _body(payload: Optional[str]) -> dict:
    if not payload:
        return {}
    try:
        msg = _loads(payload)
    except (ValueError, RecursionError, TypeError):
        return {}
    body = msg.get("body") if isinstance(msg, dict) else None
    return body if isinstance(body, dict) else {}


try:  # the telemetry payloads are parsed once each; orjson is several times faster (as in ingest)
    from orjson import loads as _loads
except ImportError:
    _loads = json.loads


# ----------------------------------------------------------------------------- rollup
@dataclass
class PruneResult:
    """What one :func:`prune` (or :func:`rollup`) did, or with ``dry_run`` would do."""

    cutoff_raw: Optional[float] = None
    cutoff_events: Optional[float] = None
    cutoff_rollups: Optional[float] = None
    rolled_up: int = 0          # raw telemetry rows folded into hours (and deleted)
    hours_written: int = 0      # hour rows created or merged into
    events_deleted: int = 0     # event/ack/state rows deleted
    hours_deleted: int = 0      # hour rows older than the rollup retention
    gaps_deleted: int = 0
    alerts_deleted: int = 0
    transactions: int = 0
    retries: int = 0            # steps undone because another prune took the same rows
    longest_transaction_s: float = 0.0
    dry_run: bool = False
    vacuumed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _protected(store: Any, fleet: str, device: str) -> int:
    """Id of the device's highest-seq row of its current boot (kept: the tracker restores from it), or -1."""
    row = store.db.execute("SELECT boot FROM devices WHERE fleet = ? AND device = ?", (fleet, device)).fetchone()
    if row is None:
        row = store.db.execute("SELECT MAX(boot) FROM messages WHERE fleet = ? AND device = ?",
                               (fleet, device)).fetchone()
    if row is None or row[0] is None:
        return -1
    top = store.db.execute("SELECT id FROM messages WHERE fleet = ? AND device = ? AND boot = ? "
                           "ORDER BY seq DESC LIMIT 1", (fleet, device, row[0])).fetchone()
    return -1 if top is None else top[0]


def _devices_with_rows_before(store: Any, cutoff: float) -> list[tuple[str, str]]:
    # (served by the (fleet, device, ts) index without reading the rows themselves)
    return [tuple(r) for r in store.db.execute(
        "SELECT DISTINCT fleet, device FROM messages WHERE ts < ? ORDER BY fleet, device", (cutoff,)).fetchall()]


def _max_id(store: Any) -> int:
    return store.db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]


def _delete_ids(store: Any, ids: list[int]) -> int:
    n = 0
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        n += store.db.execute(f"DELETE FROM messages WHERE id IN ({', '.join('?' * len(part))})", part).rowcount
    return n


def _fold_step(store: Any, work: list[tuple[str, str, int]], cutoff: float, max_id: int, batch_rows: int,
               result: PruneResult) -> list[tuple[str, str, int]]:
    """Fold up to ``batch_rows`` raw rows of the devices in ``work`` and move them in one transaction.

    Returns the devices still to do. Reading and folding happen before the
    transaction (stored messages never change, only disappear), so the write
    lock is held for the deletes and the hour rows only.
    """
    hours: dict[tuple[str, str, int], Hour] = {}
    ids: list[int] = []
    remaining = list(work)
    while remaining and len(ids) < batch_rows:
        fleet, device, keep_id = remaining[0]
        room = batch_rows - len(ids)
        rows = store.db.execute(_RAW, (fleet, device, cutoff, max_id, keep_id, room)).fetchall()
        for (rid, ts, historical, p99, inferences, calls, errors, temp, cpu, psi, payload) in rows:
            key = (fleet, device, hour_of(ts))
            hour = hours.get(key)
            if hour is None:
                hour = hours[key] = Hour(*key)
            hour.add_raw(ts, historical, p99, inferences, calls, errors, temp, cpu, psi, payload)
            ids.append(rid)
        if len(rows) < room:
            remaining.pop(0)  # this device is done
    if not ids:
        return remaining
    started = time.monotonic()
    _begin(store)
    try:
        deleted = _delete_ids(store, ids)
        if deleted != len(ids):  # another prune moved some of these rows first: undo, read again
            store.db.execute("ROLLBACK")
            result.retries += 1
            log.info("another prune moved %d of %d rows first; reading them again", len(ids) - deleted, len(ids))
            return work
        lock = " FOR UPDATE" if engine(store) == "postgresql" else ""
        for key, hour in hours.items():
            old = store.db.execute(f"SELECT {', '.join(HOUR_COLUMNS)} FROM telemetry_hourly "
                                   f"WHERE fleet = ? AND device = ? AND hour = ?{lock}", key).fetchone()
            if old is not None:
                merged = Hour.from_row(old)
                merged.merge(hour)
                hour = merged
            store.db.execute(_UPSERT, hour.row())
        store.db.execute("COMMIT")
    except BaseException:
        store.db.execute("ROLLBACK")
        raise
    result.transactions += 1
    result.longest_transaction_s = max(result.longest_transaction_s, time.monotonic() - started)
    result.rolled_up += len(ids)
    result.hours_written += len(hours)
    return remaining


def rollup(store: Any, older_than_ts: float, *, batch_rows: int = BATCH_ROWS,
           result: Optional[PruneResult] = None) -> PruneResult:
    """Move raw telemetry from before the hour holding ``older_than_ts`` into hour rows (idempotent).

    The cutoff is rounded down to a whole hour, so an hour is either all in
    ``telemetry_hourly`` or all raw (until rows for it arrive late, which the
    next run merges in).
    """
    result = result or PruneResult()
    ensure_schema(store)
    cutoff = float(hour_of(older_than_ts))
    result.cutoff_raw = cutoff
    max_id = _max_id(store)
    work = [(f, d, _protected(store, f, d)) for f, d in _devices_with_rows_before(store, cutoff)]
    while work:
        work = _fold_step(store, work, cutoff, max_id, batch_rows, result)
    return result


# ----------------------------------------------------------------------------- prune
def _delete_chunks(store: Any, table: str, where: str, args: tuple, batch_rows: int, result: PruneResult) -> int:
    """``DELETE FROM table WHERE where`` in transactions of at most ``batch_rows`` rows."""
    total = 0
    while True:
        started = time.monotonic()
        _begin(store)
        try:
            n = store.db.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {where} LIMIT ?)",
                                 (*args, batch_rows)).rowcount
            store.db.execute("COMMIT")
        except BaseException:
            store.db.execute("ROLLBACK")
            raise
        result.transactions += 1
        result.longest_transaction_s = max(result.longest_transaction_s, time.monotonic() - started)
        total += n
        if n < batch_rows:
            return total


def _count(store: Any, sql: str, args: tuple) -> int:
    return store.db.execute(sql, args).fetchone()[0]


def prune(store: Any, keep_raw_s: float = DEFAULT_KEEP_RAW_S, keep_rollups_s: float = DEFAULT_KEEP_ROLLUPS_S,
          now: Optional[float] = None, *, keep_events_s: Optional[float] = None, batch_rows: int = BATCH_ROWS,
          dry_run: bool = False, vacuum: bool = False) -> PruneResult:
    """Roll up raw telemetry older than ``keep_raw_s``, then delete what is past its retention; returns counts.

    ``keep_events_s`` (default: ``max(keep_raw_s, 30 days)``) is how long
    events, acks and state messages stay: few, and they say what happened in
    the hours that are only rollups by then. Hour rows stay ``keep_rollups_s``,
    and so do closed gaps and alerts (open ones stay until they close).
    ``dry_run`` counts what would go and writes nothing. ``vacuum`` (SQLite)
    rewrites the file afterwards to give freed pages back to the disk — it
    blocks every writer meanwhile; without it freed pages are reused by new rows.
    """
    if keep_raw_s < 0 or keep_rollups_s < 0 or (keep_events_s is not None and keep_events_s < 0):
        raise RetentionError("retention durations must not be negative")
    if keep_rollups_s < keep_raw_s:
        raise RetentionError(f"--keep-rollups ({keep_rollups_s:g} s) is shorter than --keep-raw ({keep_raw_s:g} s): "
                             "hours would be deleted before their raw rows are; keep rollups at least as long")
    now = time.time() if now is None else now
    keep_events_s = max(keep_raw_s, DEFAULT_KEEP_EVENTS_S) if keep_events_s is None else keep_events_s
    result = PruneResult(dry_run=dry_run)
    result.cutoff_raw = float(hour_of(now - keep_raw_s))
    result.cutoff_events = now - keep_events_s
    result.cutoff_rollups = now - keep_rollups_s
    if dry_run:  # (writes nothing, not even the hour table: a read-only store can be asked)
        max_id = _max_id(store)
        for cutoff, kind, name in ((result.cutoff_raw, "kind = 'telemetry'", "rolled_up"),
                                   (result.cutoff_events, "kind <> 'telemetry'", "events_deleted")):
            for fleet, device in _devices_with_rows_before(store, cutoff):
                setattr(result, name, getattr(result, name) + _count(
                    store, f"SELECT COUNT(*) FROM messages WHERE fleet = ? AND device = ? AND {kind} AND ts < ? "
                    "AND id < ? AND id <> ?", (fleet, device, cutoff, max_id, _protected(store, fleet, device))))
        if _has_table(store):
            result.hours_deleted = _count(store, "SELECT COUNT(*) FROM telemetry_hourly WHERE hour < ?",
                                          (result.cutoff_rollups - HOUR_S,))
        result.gaps_deleted = _count(store, "SELECT COUNT(*) FROM gaps WHERE closed < ?", (result.cutoff_rollups,))
        result.alerts_deleted = _count(store, "SELECT COUNT(*) FROM alerts WHERE closed < ?",
                                       (result.cutoff_rollups,))
        return result
    rollup(store, now - keep_raw_s, batch_rows=batch_rows, result=result)
    max_id = _max_id(store)
    for fleet, device in _devices_with_rows_before(store, result.cutoff_events):
        keep_id = _protected(store, fleet, device)
        result.events_deleted += _delete_chunks(
            store, "messages", "fleet = ? AND device = ? AND kind <> 'telemetry' AND ts < ? AND id < ? AND id <> ?",
            (fleet, device, result.cutoff_events, max_id, keep_id), batch_rows, result)
    # an hour goes once all of it is past the retention (hour + 1 h <= cutoff)
    for (hour,) in store.db.execute("SELECT DISTINCT hour FROM telemetry_hourly WHERE hour < ? ORDER BY hour",
                                    (result.cutoff_rollups - HOUR_S,)).fetchall():
        started = time.monotonic()
        _begin(store)
        try:
            result.hours_deleted += store.db.execute("DELETE FROM telemetry_hourly WHERE hour = ?", (hour,)).rowcount
            store.db.execute("COMMIT")
        except BaseException:
            store.db.execute("ROLLBACK")
            raise
        result.transactions += 1
        result.longest_transaction_s = max(result.longest_transaction_s, time.monotonic() - started)
    result.gaps_deleted = _delete_chunks(store, "gaps", "closed < ?", (result.cutoff_rollups,), batch_rows, result)
    result.alerts_deleted = _delete_chunks(store, "alerts", "closed < ?", (result.cutoff_rollups,), batch_rows,
                                           result)
    if vacuum:
        store.db.execute("VACUUM")
        result.vacuumed = True
    return result


# ----------------------------------------------------------------------------- reads
def hourly(store: Any, fleet: str, device: str, since: Optional[float] = None,
           until: Optional[float] = None) -> list[dict[str, Any]]:
    """A device's rolled-up hours that overlap ``[since, until]``, oldest first (:meth:`Hour.summary` each).

    Raw history covers ``ts >= cutoff`` and hours cover what is older, so a
    reader shows both: hours up to the first raw row, then the raw rows. Before
    the first prune the table may not exist yet: that reads as no hours.
    """
    return [h.summary() for h in hour_rows(store, fleet, device, since, until)]


def hour_rows(store: Any, fleet: str, device: Optional[str] = None, since: Optional[float] = None,
              until: Optional[float] = None) -> list[Hour]:
    """:class:`Hour` objects of one device (or, ``device=None``, of every device of the fleet), by hour."""
    where, args = ["fleet = ?"], [fleet]
    if device is not None:
        where.append("device = ?")
        args.append(device)
    if since is not None:
        where.append("hour > ?")  # an hour overlaps [since, ...] when it ends after since
        args.append(since - HOUR_S)
    if until is not None:
        where.append("hour <= ?")
        args.append(until)
    if not _has_table(store):
        return []
    rows = store.db.execute(f"SELECT {', '.join(HOUR_COLUMNS)} FROM telemetry_hourly WHERE {' AND '.join(where)} "
                            "ORDER BY hour, device", args).fetchall()
    return [Hour.from_row(r) for r in rows]


def fleet_hourly(store: Any, fleet: str, since: Optional[float] = None,
                 until: Optional[float] = None) -> list[dict[str, Any]]:
    """The fleet's hours with every device merged (sketches add, so fleet percentiles are true ones)."""
    merged: dict[int, Hour] = {}
    for h in hour_rows(store, fleet, None, since, until):
        m = merged.get(h.hour)
        if m is None:
            merged[h.hour] = Hour.from_row(h.row())
            merged[h.hour].device = "*"
        else:
            m.merge(h)
    return [merged[k].summary() for k in sorted(merged)]


def _has_table(store: Any) -> bool:
    if engine(store) == "sqlite":
        sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'telemetry_hourly'"
    else:
        return store.db.execute("SELECT to_regclass('telemetry_hourly')").fetchone()[0] is not None
    return store.db.execute(sql).fetchone()[0] > 0


def store_bytes(path: Any) -> int:
    """Bytes a SQLite store takes on disk: the file and its ``-wal`` (and ``-shm``)."""
    from pathlib import Path

    p = Path(path)
    return sum(q.stat().st_size for q in (p, Path(f"{p}-wal"), Path(f"{p}-shm")) if q.exists())
