"""The monitor's history: one SQLite file (WAL), written by ingest workers, read by the CLI.

Tables (schema version in ``PRAGMA user_version``; a newer file is refused):

* ``messages`` — every valid message once: ``UNIQUE(fleet, device, boot, seq)``
  makes a replayed or re-delivered message an ignored insert (counted as a
  duplicate), ``(fleet, device, ts)`` serves history queries. Telemetry's key
  figures are copied into columns at ingest so the tracker, ``history`` and
  ``plot`` never parse JSON; ``payload`` is the envelope as received.
* ``devices`` — the tracker's view of each device (what ``fleet ls`` shows).
* ``gaps`` — missing ``seq`` ranges per (device, boot), closed when filled.
* ``alerts`` — thresholds crossed, with when they opened and closed.
* ``malformed`` — payloads refused on the fleet's topics, counted per reason.
* ``counters`` — fleet-wide counts (duplicates, stale wills, ...).

Rows are checked before they get here (:mod:`.ingest`, the contract's limits);
if SQLite still refuses one row of a batch, :meth:`FleetStore.insert_batch`
stores the others row by row and counts the refused one as ``store_refused``.
Reads skip rows an older edgekit stored out of range (a device time outside
1970..2242, say) with a logged note, so that ``history`` and ``plot`` always work.

Several processes write at once (one per ingest worker): each batch is one
``BEGIN IMMEDIATE`` transaction, and SQLite's busy timeout queues them. Row ids
are assigned under the write lock, so ``id`` order is commit order and a reader
can tail the table by id.

The SQL here is written once for both engines: :class:`.store_pg.PgFleetStore`
(a ``postgresql://`` URL) subclasses :class:`FleetStore` and replaces only the
hooks marked *engine* (connection, schema bookkeeping, the batch insert, how a
write transaction begins and how a new row's id is read back).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from edgekit_runtime.contract.fleet_protocol import MAX_TS

from ..errors import EdgekitError

log = logging.getLogger("edgekit.fleet.store")

SCHEMA_VERSION = 1
PAGE_SIZE = 16384  # measured: 4 KB pages cost ~20 % more per stored row (insert + checkpoint) than 16 KB

_SCHEMA = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,              -- device clock (UNIX s)
    received REAL NOT NULL,        -- monitor clock
    historical INTEGER NOT NULL,   -- replayed from the device's spool
    retained INTEGER NOT NULL,     -- delivered as the broker's retained copy
    p50_ms REAL, p99_ms REAL, inferences INTEGER, calls INTEGER, errors INTEGER,
    temp_c REAL, cpu_percent REAL, drift_psi REAL,
    payload TEXT NOT NULL
);
CREATE UNIQUE INDEX messages_key ON messages(fleet, device, boot, seq);
CREATE INDEX messages_device_time ON messages(fleet, device, ts);
CREATE TABLE devices (
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    status TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    model TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    info TEXT NOT NULL,            -- JSON: everything else `fleet show` prints
    PRIMARY KEY (fleet, device)
);
CREATE TABLE gaps (
    id INTEGER PRIMARY KEY,
    fleet TEXT NOT NULL, device TEXT NOT NULL, boot INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    opened REAL NOT NULL, closed REAL
);
CREATE INDEX gaps_device ON gaps(fleet, device, boot);
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    fleet TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
    value REAL, threshold REAL, message TEXT NOT NULL,
    opened REAL NOT NULL, closed REAL
);
CREATE INDEX alerts_device ON alerts(fleet, device, opened);
CREATE TABLE malformed (
    reason TEXT PRIMARY KEY, count INTEGER NOT NULL,
    last_topic TEXT, last_error TEXT, last_seen REAL
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

MESSAGE_COLUMNS = ("fleet", "device", "kind", "boot", "seq", "ts", "received", "historical", "retained",
                   "p50_ms", "p99_ms", "inferences", "calls", "errors", "temp_c", "cpu_percent", "drift_psi",
                   "payload")
_INSERT = (f"INSERT OR IGNORE INTO messages ({', '.join(MESSAGE_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(MESSAGE_COLUMNS))})")
# (the target table is named in DO UPDATE: PostgreSQL finds a bare `value` ambiguous with excluded's)
_BUMP = ("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
         "SET value = counters.value + excluded.value")
_MALFORMED = ("INSERT INTO malformed(reason, count, last_topic, last_error, last_seen) VALUES (?, ?, ?, ?, ?) "
              "ON CONFLICT(reason) DO UPDATE SET count = malformed.count + excluded.count, "
              "last_topic = excluded.last_topic, last_error = excluded.last_error, last_seen = excluded.last_seen")
# what the tracker reads back; telemetry payloads stay in the file (their figures are columns)
TAIL_COLUMNS = ("id", "fleet", "device", "kind", "boot", "seq", "ts", "received", "historical", "retained",
                "p50_ms", "p99_ms", "inferences", "calls", "errors", "temp_c", "cpu_percent", "drift_psi")


# what one row can make SQLite or its driver refuse (an integer beyond 64 bits, a value of no SQL type, a
# constraint); anything else (a lock, a full disk) fails the whole batch, which the broker then re-delivers
_ROW_ERRORS = (OverflowError, ValueError, TypeError, sqlite3.IntegrityError, sqlite3.InterfaceError,
               sqlite3.DataError)
# device times a reader shows; rows outside were stored by an older edgekit that did not check them
_TS_SQL = f"ts >= 0 AND ts <= {MAX_TS!r}"


def _finite(value: Any) -> Any:
    """A stored REAL that is inf or NaN (written before values were checked) reads as None."""
    return None if value.__class__ is float and not math.isfinite(value) else value


def _seen(t: Any) -> Any:
    """A device row's time, None where an older edgekit stored a device time out of range."""
    return t if t is None or (t.__class__ is float or t.__class__ is int) and 0 <= t <= MAX_TS else None


class StoreError(EdgekitError):
    """The fleet store cannot be opened or is of a newer format."""


class StoreConnectionLost(StoreError):
    """The connection to a store's server broke (it restarted, the network went): reconnect and try again."""


class FleetStore:
    """One connection to the store file; use one per thread or process."""

    engine = "sqlite"

    def __init__(self, path: str | Path, *, create: bool = True, readonly: bool = False,
                 busy_timeout_s: float = 30.0, autocheckpoint: bool = True):
        self.path = Path(path)
        self.last_left_out = 0  # rows the last history()/series() left out (stored out of range by an older edgekit)
        self.last_refused = 0  # rows of the last insert_batch that SQLite refused (counted as store_refused)
        # the tracker's position (id of the last message it consumed), written with its device rows by
        # save_tracker where the engine keeps it (PostgreSQL: a new leader resumes there); set by the monitor
        self.position: Optional[int] = None
        if not create and not self.path.exists():
            raise StoreError(f"no fleet store at {self.path}; run `edgekit fleet monitor --db {self.path}` first")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            uri = f"file:{self.path}?mode=ro" if readonly else str(self.path)
            self.db = sqlite3.connect(uri, uri=readonly, isolation_level=None, timeout=busy_timeout_s,
                                      check_same_thread=False)
            self.db.execute("PRAGMA synchronous=NORMAL")
            if not readonly:
                # a writer's page cache: 64 MiB (at most; filled as used). A batch touches an index leaf per device
                # per index, and SQLite's default 2 MiB (125 pages of 16 KiB) re-read them from the OS each batch:
                # measured 21.5 -> 19.6 CPU µs per ingested message (1,000 devices, 4,000-row batches)
                self.db.execute("PRAGMA cache_size=-65536")
                self._init()
                if not autocheckpoint:
                    # an ingest worker: the monitor's checkpointer (checkpoint()) copies the WAL into the
                    # database in its own thread, so a commit never waits for a checkpoint
                    self.db.execute("PRAGMA wal_autocheckpoint=0")
            else:
                self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable fleet store ({exc})") from None

    # -- schema ------------------------------------------------------------------------------
    def _schema_version(self) -> int:
        """The schema version the store holds (0: a new, empty store); each engine keeps it its own way."""
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _check_version(self) -> int:
        version = self._schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version}, newer than this edgekit "
                             f"({SCHEMA_VERSION}); upgrade edgekit to read it")
        return version

    def _init(self) -> None:
        db = self.db
        # (only takes effect on a new file) larger pages: fewer WAL frames and page writes per row of ~1 KB
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        # a larger WAL between checkpoints (16 MB): fewer, bigger checkpoints while ingesting
        db.execute("PRAGMA wal_autocheckpoint=4000")
        db.execute(f"PRAGMA journal_size_limit={64 << 20}")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = self._check_version()
            if version == 0:
                for stmt in _SCHEMA.split(";"):  # (executescript would COMMIT the transaction)
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy committed WAL frames into the database without blocking writers (``PASSIVE``)."""
        return self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "FleetStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writes (ingest) ---------------------------------------------------------------------
    def insert_batch(self, rows: Sequence[tuple], malformed: Optional[dict[str, list]] = None,
                     counters: Optional[dict[str, int]] = None) -> int:
        """Insert message rows (``MESSAGE_COLUMNS`` order) in one transaction; returns how many were new.

        Rows whose (fleet, device, boot, seq) is already stored are ignored and
        counted as ``duplicates``. ``malformed``: reason → [count, topic, error, time].
        A row SQLite refuses does not lose the others: the batch is stored again
        row by row and the refused rows are counted as malformed ``store_refused``
        (their number is in :attr:`last_refused`).
        """
        self.last_refused = 0
        try:
            return self._insert(rows, malformed, counters, one_by_one=False)
        except Exception as exc:
            if not rows or not self._is_row_error(exc):
                raise
            log.warning("a batch of %d messages was refused by %s (%s: %s); storing it row by row",
                        len(rows), self.engine, type(exc).__name__, exc)
        return self._insert(rows, malformed, counters, one_by_one=True)

    def _insert(self, rows: Sequence[tuple], malformed: Optional[dict[str, list]],
                counters: Optional[dict[str, int]], one_by_one: bool) -> int:
        db = self.db
        malformed = dict(malformed or {})
        self._begin_insert()
        try:
            new = refused = 0
            if one_by_one:
                for row in rows:
                    try:
                        new += self._insert_row(row)
                    except Exception as exc:
                        if not self._is_row_error(exc):
                            raise
                        refused += 1
                        entry = malformed.get("store_refused") or [0, None, None, None]
                        malformed["store_refused"] = [entry[0] + 1, f"edgekit/v1/{row[0]}/{row[1]}/{row[2]}",
                                                      f"{type(exc).__name__}: {exc}"[:500], time.time()]
            else:
                new = self._insert_rows(rows)
            dup = len(rows) - refused - new
            bumps = dict(counters or {})
            if dup:
                bumps["duplicates"] = bumps.get("duplicates", 0) + dup
            if bumps:
                db.executemany(_BUMP, [(k, v) for k, v in bumps.items() if v])
            if malformed:
                db.executemany(_MALFORMED, [(reason, *v) for reason, v in malformed.items()])
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.last_refused = refused
        return new

    # -- engine: how rows go in ----------------------------------------------------------------
    def _is_row_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` is one row's fault (the batch is then stored row by row), not the store's."""
        return isinstance(exc, _ROW_ERRORS)

    def _begin_insert(self) -> None:
        """Begin a batch's transaction so that its ids are drawn in commit order (SQLite: the write lock)."""
        self.db.execute("BEGIN IMMEDIATE")

    def _begin_write(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def _rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def _insert_rows(self, rows: Sequence[tuple]) -> int:
        """Insert rows, ignoring stored keys; returns how many were new."""
        before = self.db.total_changes
        self.db.executemany(_INSERT, rows)
        return self.db.total_changes - before

    def _insert_row(self, row: tuple) -> int:
        """One row (the fallback after a refused batch): 1 if stored, 0 if its key was; raises if refused."""
        before = self.db.total_changes
        self.db.execute(_INSERT, row)
        return self.db.total_changes - before

    def _insert_id(self, sql: str, row: tuple) -> int:
        """Run an INSERT of one row and return the new row's id."""
        return self.db.execute(sql, row).lastrowid

    def _save_position(self, devices: list) -> None:
        """(engine) Keep the tracker's :attr:`position` with its device rows; SQLite's single tracker needs not."""

    def tracker_position(self) -> Optional[int]:
        """Id of the last message whose effects the stored device rows include (None: not kept by this engine)."""
        return None

    def try_lead(self) -> bool:
        """Whether this connection may run the tracker: always for a SQLite file (one monitor per file)."""
        return True

    def bump(self, name: str, value: int = 1) -> None:
        self.db.execute(_BUMP, (name, value))

    # -- tracker -----------------------------------------------------------------------------
    def tail(self, after_id: int, limit: int = 50000) -> list[tuple]:
        """Messages committed after ``after_id`` in commit order: ``TAIL_COLUMNS`` + payload.

        The payload is only returned for non-telemetry messages (telemetry's
        figures are columns already).
        """
        return self.db.execute(
            f"SELECT {', '.join(TAIL_COLUMNS)}, CASE WHEN kind = 'telemetry' THEN NULL ELSE payload END "
            "FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def last_id(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]

    def save_tracker(self, devices: Iterable[tuple], gaps_new: Iterable[tuple], gaps_closed: Iterable[tuple],
                     alerts_new: Iterable[tuple], alerts_closed: Iterable[tuple],
                     counters: Optional[dict[str, int]] = None) -> list[int]:
        """Write the tracker's changes in one transaction; returns the ids of the new gap rows.

        ``gaps_closed``: ``(closed_time, gap_id)``; ``alerts_closed``: ``(closed_time, fleet, device, kind)``.
        """
        db = self.db
        devices = list(devices)
        self._begin_write()
        try:
            db.executemany("INSERT INTO devices(fleet, device, status, boot, seq, model, first_seen, last_seen, info) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(fleet, device) DO UPDATE SET "
                           "status=excluded.status, boot=excluded.boot, seq=excluded.seq, model=excluded.model, "
                           "last_seen=excluded.last_seen, info=excluded.info", devices)
            gap_ids = []
            for row in gaps_new:
                gap_ids.append(self._insert_id("INSERT INTO gaps(fleet, device, boot, first_seq, last_seq, opened) "
                                               "VALUES (?, ?, ?, ?, ?, ?)", row))
            db.executemany("UPDATE gaps SET closed=? WHERE id=?", gaps_closed)
            for row in alerts_new:
                db.execute("INSERT INTO alerts(fleet, device, kind, value, threshold, message, opened) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            db.executemany("UPDATE alerts SET closed=? WHERE fleet=? AND device=? AND kind=? AND closed IS NULL",
                           alerts_closed)
            if counters:
                db.executemany(_BUMP, [(k, v) for k, v in counters.items() if v])
            self._save_position(devices)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return gap_ids

    def max_seq(self, fleet: str, device: str, boot: int) -> Optional[int]:
        return self.db.execute("SELECT MAX(seq) FROM messages WHERE fleet=? AND device=? AND boot=?",
                               (fleet, device, boot)).fetchone()[0]

    # -- reads (CLI) -------------------------------------------------------------------------
    def devices(self, fleet: Optional[str] = None) -> list[dict[str, Any]]:
        sql = "SELECT fleet, device, status, boot, seq, model, first_seen, last_seen, info FROM devices"
        args: tuple = ()
        if fleet:
            sql += " WHERE fleet = ?"
            args = (fleet,)
        out = []
        for f, d, status, boot, seq, model, first, last, info in self.db.execute(sql + " ORDER BY fleet, device",
                                                                                args):
            out.append({"fleet": f, "device": d, "status": status, "boot": boot, "seq": seq, "model": model,
                        "first_seen": _seen(first), "last_seen": _seen(last), **json.loads(info)})
        return out

    def find_device(self, device: str, fleet: Optional[str] = None) -> tuple[str, str]:
        """``(fleet, device)`` of a device the store knows (by messages or the devices table)."""
        sql = "SELECT DISTINCT fleet FROM devices WHERE device = ?"
        fleets = [r[0] for r in self.db.execute(sql, (device,))]
        if not fleets:
            fleets = [r[0] for r in self.db.execute(
                "SELECT DISTINCT fleet FROM messages WHERE device = ? LIMIT 10", (device,))]
        if fleet:
            if fleet not in fleets:
                raise StoreError(f"device {device!r} of fleet {fleet!r} is not in {self.path}")
            return fleet, device
        if not fleets:
            known = [r[0] for r in self.db.execute("SELECT device FROM devices ORDER BY device LIMIT 20")]
            import difflib

            close = difflib.get_close_matches(device, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; known: {', '.join(known)}" if known else "")
            raise StoreError(f"device {device!r} is not in {self.path}{hint}")
        if len(fleets) > 1:
            raise StoreError(f"device {device!r} is in fleets {', '.join(fleets)}; pass --fleet")
        return fleets[0], device

    def history(self, fleet: str, device: str, since: Optional[float] = None, until: Optional[float] = None,
                kinds: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> list[dict[str, Any]]:
        """The device's messages by device time, oldest first (``limit``: the newest N).

        ``device_ts`` is added where the device's own time differs from ``ts``
        (its clock was off by more than the monitor accepts). Rows stored out of
        range by an older edgekit are left out, with a logged note.
        """
        where = ["fleet = ?", "device = ?"]
        args: list[Any] = [fleet, device]
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts <= ?")
            args.append(until)
        if kinds:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args.extend(kinds)
        self._note_out_of_range(fleet, device, where, args)
        sql = (f"SELECT {', '.join(MESSAGE_COLUMNS)} FROM messages WHERE {' AND '.join(where)} AND {_TS_SQL} "
               "ORDER BY ts DESC, id DESC")
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = self.db.execute(sql, args).fetchall()
        out = []
        for row in reversed(rows):
            rec = {k: _finite(v) for k, v in zip(MESSAGE_COLUMNS, row)}
            try:
                msg = json.loads(rec.pop("payload"))
            except (ValueError, RecursionError):  # (an older edgekit stored what it could not check)
                msg = {}
            if not isinstance(msg, dict):
                msg = {}
            rec["historical"] = bool(rec["historical"])
            rec["retained"] = bool(rec["retained"])
            rec["body"] = msg.get("body")
            device_ts = msg.get("ts")
            if isinstance(device_ts, (int, float)) and device_ts != rec["ts"]:
                rec["device_ts"] = _finite(float(device_ts)) if abs(device_ts) < 1e308 else None
            out.append(rec)
        return out

    def _note_out_of_range(self, fleet: str, device: str, where: list[str], args: list[Any]) -> int:
        n = self.db.execute(f"SELECT COUNT(*) FROM messages WHERE {' AND '.join(where)} AND NOT ({_TS_SQL})",
                            args).fetchone()[0]
        if n:
            log.warning("%s/%s: %d stored message(s) have a device time outside 1970..2242 (stored by an older "
                        "edgekit, which did not check it); they are left out", fleet, device, n)
        self.last_left_out = n
        return n

    def series(self, fleet: str, device: str, since: Optional[float] = None) -> list[tuple]:
        """``(ts, p50_ms, p99_ms, drift_psi, historical)`` of every telemetry message, by time.

        Rows stored out of range by an older edgekit are left out (a logged note);
        a figure stored as inf or NaN reads as None.
        """
        where = ["fleet = ?", "device = ?", "kind = 'telemetry'"]
        args: list[Any] = [fleet, device]
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        self._note_out_of_range(fleet, device, where, args)
        sql = (f"SELECT ts, p50_ms, p99_ms, drift_psi, historical FROM messages WHERE {' AND '.join(where)} "
               f"AND {_TS_SQL} ORDER BY ts")
        return [tuple(_finite(v) for v in row) for row in self.db.execute(sql, args)]

    def gaps(self, fleet: str, device: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT boot, first_seq, last_seq, opened, closed FROM gaps WHERE fleet=? AND device=? "
                               "ORDER BY boot, first_seq", (fleet, device)).fetchall()
        return [{"boot": b, "first_seq": f, "last_seq": last, "missing": last - f + 1, "opened": o, "closed": c}
                for b, f, last, o, c in rows]

    def alerts(self, fleet: Optional[str] = None, device: Optional[str] = None,
               open_only: bool = False) -> list[dict[str, Any]]:
        where, args = [], []
        if fleet:
            where.append("fleet = ?")
            args.append(fleet)
        if device:
            where.append("device = ?")
            args.append(device)
        if open_only:
            where.append("closed IS NULL")
        sql = "SELECT fleet, device, kind, value, threshold, message, opened, closed FROM alerts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        cols = ("fleet", "device", "kind", "value", "threshold", "message", "opened", "closed")
        return [dict(zip(cols, r)) for r in self.db.execute(sql + " ORDER BY opened", args)]

    def malformed(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {"count": r[1], "last_topic": r[2], "last_error": r[3], "last_seen": r[4]}
                for r in self.db.execute("SELECT reason, count, last_topic, last_error, last_seen FROM malformed "
                                         "ORDER BY reason")}

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, value FROM counters ORDER BY name").fetchall())

    def message_counts(self, fleet: str, device: str) -> dict[str, int]:
        """Stored messages of one device per kind (state, telemetry, event, ...)."""
        return dict(self.db.execute("SELECT kind, COUNT(*) FROM messages WHERE fleet=? AND device=? GROUP BY kind",
                                    (fleet, device)).fetchall())

    def message_count(self, kind: Optional[str] = None) -> int:
        if kind:
            return self.db.execute("SELECT COUNT(*) FROM messages WHERE kind = ?", (kind,)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]


# ----------------------------------------------------------------------------- naming a store
# (here rather than in .stores, which opens the engines: store_pg uses them too)
PG_SCHEMES = ("postgresql://", "postgres://")


def is_pg_url(db: Union[str, Path]) -> bool:
    """True when ``db`` names a PostgreSQL server rather than a SQLite file."""
    return isinstance(db, str) and db.startswith(PG_SCHEMES)


def describe(db: Union[str, Path]) -> str:
    """``db`` for messages and JSON output, without a password."""
    if not is_pg_url(db):
        return str(db)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(db))
    if parts.password is None:
        return str(db)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
