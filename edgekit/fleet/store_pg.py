"""The fleet store on a PostgreSQL server (``--db postgresql://…``): several monitors on several machines, one store.

Same tables, columns, keys and queries as the SQLite store (:mod:`.store`; the
DDL is derived from its schema, the SQL is its own, run through :class:`PgConnection`
which reads SQLite's ``?`` placeholders). What differs, and why:

* **Schema version** — PostgreSQL has no ``user_version``: it is the row
  ``schema_version`` of ``store_meta``; a newer one is refused as SQLite's is.
  Creating the schema takes an advisory lock, so monitors starting together on
  an empty database create it once.
* **Tailing by id** — a ``BIGSERIAL`` id is drawn when a row is inserted, not
  when its transaction commits, so two concurrent batches can commit out of id
  order and a reader tailing ``id > last`` would step over the later-committing
  one's rows for good. Each batch's transaction therefore takes one advisory
  transaction lock (:data:`ORDER_LOCK`) *before* it draws ids and keeps it until
  its commit is visible: batches commit one at a time, ids are commit order, as
  under SQLite's write lock.
* **One tracker** — several monitors ingest into one store, but only one may
  run the tracker (devices, gaps, alerts, and alert notifications), or they
  would overwrite each other's device rows. :meth:`PgFleetStore.try_lead` takes
  a session advisory lock (:data:`LEADER_LOCK`): whoever holds it tracks; when
  its process or connection dies the server drops the lock and the next monitor
  to ask takes over. The tracker's position (id of the last message it
  consumed) is written in the same transaction as its device rows, so the new
  leader restores the device rows and continues right after them.
* **A server restart** — a broken connection raises :class:`.store.StoreConnectionLost`;
  an ingest batch reconnects and is stored again (its messages were not
  acknowledged to the broker yet), the monitor's tracker reconnects and asks for
  the lead again (:meth:`PgFleetStore.reconnect`, retried for :data:`RECONNECT_S`).
* **A batch is one COPY** — binary ``COPY`` into a session's temporary table,
  then one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` whose row count says how
  many were new (the rest are duplicates). Measured on agent telemetry rows
  (``benchmarks/pg_ingest.py``): ~1 µs of client CPU per row, against ~4 µs for
  one ``unnest`` of binary arrays per column, 8 µs for ``executemany`` and
  ~100 µs for ``unnest`` of text arrays (psycopg quotes each payload in Python).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from typing import Any, Optional, Sequence

from ..errors import EdgekitError
from .store import _SCHEMA, MESSAGE_COLUMNS, SCHEMA_VERSION, FleetStore, StoreConnectionLost, StoreError, describe

try:
    import psycopg
except ImportError:  # (a main dependency; only a broken install lacks it)
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger("edgekit.fleet.store_pg")

# advisory lock keys: (namespace, what); one store per database, so the keys need not name it
LOCK_NAMESPACE = 0x65646B74  # "edkt"
ORDER_LOCK = 1  # held by a batch's transaction from before its ids are drawn until it commits
LEADER_LOCK = 2  # held by the session of the monitor that runs the tracker
SCHEMA_LOCK = 3  # held while the schema is checked or created

# which monitor (host, pid) runs the tracker: its session holds LEADER_LOCK
LEADER_QUERY = ("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                f"WHERE l.locktype = 'advisory' AND l.classid = {LOCK_NAMESPACE} AND l.objid = {LEADER_LOCK} "
                "AND l.objsubid = 2 AND l.granted")

# the SQLite schema with PostgreSQL's types (ids: BIGSERIAL; numbers: 64-bit integers and doubles)
PG_SCHEMA = re.sub(r"\bREAL\b", "DOUBLE PRECISION", re.sub(r"\bINTEGER\b", "BIGINT", _SCHEMA.replace(
    "INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"))) + """;
CREATE TABLE store_meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)
"""

_COLUMN_TYPES = {"fleet": "text", "device": "text", "kind": "text", "boot": "int8", "seq": "int8", "ts": "float8",
                "received": "float8", "historical": "int8", "retained": "int8", "p50_ms": "float8",
                "p99_ms": "float8", "inferences": "int8", "calls": "int8", "errors": "int8", "temp_c": "float8",
                "cpu_percent": "float8", "drift_psi": "float8", "payload": "text"}
_COPY_TYPES = [_COLUMN_TYPES[c] for c in MESSAGE_COLUMNS]
_STAGE = "edgekit_stage"  # a temporary table of the session: the batch's rows before they meet the unique key
_CREATE_STAGE = (f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ("
                 + ", ".join(f"{c} {_COLUMN_TYPES[c]}" for c in MESSAGE_COLUMNS) + ") ON COMMIT DELETE ROWS")
_COPY = f"COPY {_STAGE} ({', '.join(MESSAGE_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_INSERT_STAGED = (f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) SELECT {', '.join(MESSAGE_COLUMNS)} "
                  f"FROM {_STAGE} ON CONFLICT (fleet, device, boot, seq) DO NOTHING")
_INSERT_ONE = (f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) VALUES "
               f"({', '.join('%s' for _ in MESSAGE_COLUMNS)}) ON CONFLICT (fleet, device, boot, seq) DO NOTHING")
# server errors that are one value's fault: data exceptions (22: out of range, bad text), integrity (23: a NULL),
# and a value of the wrong type (42804 datatype mismatch, 42846 cannot coerce)
_ROW_SQLSTATES = ("22", "23", "42804", "42846")

# a half-open connection (a machine or network gone, no FIN) is noticed in ~25 s on both ends
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 3}

# how long a broken connection is retried (server restart, failover) before the error is the monitor's
RECONNECT_S = 120.0

CONNECT_HINT = ("check that the PostgreSQL server is running and reachable at that host and port, that the URL's "
                "user, password and database name are right, and that the database exists (on the server: "
                "`createuser -P edgekit && createdb -O edgekit edgekit_fleet`)")


class PgConnection:
    """The store's connection as the shared SQL uses it: ``?`` placeholders; ``execute``/``executemany``
    return a cursor (``fetchone``, ``fetchall``, ``rowcount``, iteration). Autocommit unless the SQL
    says ``BEGIN`` (``BEGIN IMMEDIATE``, SQLite's write transaction, is read as ``BEGIN``). Every ``?``
    of a statement with parameters is a placeholder, so keep literal question marks out of the SQL text."""

    def __init__(self, conn: "psycopg.Connection", where: str):
        self.conn = conn
        self.where = where
        self._sql: dict[tuple[str, bool], str] = {}

    def _translate(self, sql: str, has_params: bool) -> str:
        key = (sql, has_params)
        out = self._sql.get(key)
        if out is None:
            out = sql
            if out.strip().upper() == "BEGIN IMMEDIATE":
                out = "BEGIN"
            if has_params:  # (psycopg reads %: a literal one is doubled; SQL without parameters is sent as is)
                out = out.replace("%", "%%").replace("?", "%s")
            if len(self._sql) < 1000:
                self._sql[key] = out
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "psycopg.Cursor":
        has = bool(params)
        try:
            return self.conn.execute(self._translate(sql, has), params if has else None)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self.lost(exc) from None

    def executemany(self, sql: str, seq: Any) -> "psycopg.Cursor":
        cur = self.conn.cursor()
        try:
            cur.executemany(self._translate(sql, True), list(seq))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self.lost(exc) from None
        return cur

    def lost(self, exc: BaseException) -> BaseException:
        """A connection failure as :class:`StoreConnectionLost` (other errors unchanged)."""
        # (no SQLSTATE: the driver lost the socket; 57P0x: the server shut down; 08xxx: connection exceptions)
        if self.conn.closed or getattr(exc, "sqlstate", None) in (None, "57P01", "57P02", "57P03") or \
                str(getattr(exc, "sqlstate", "")).startswith("08"):
            return StoreConnectionLost(f"lost the connection to the fleet store at {self.where}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
                              "is the PostgreSQL server still running?")
        return exc

    def close(self) -> None:
        self.conn.close()


class PgFleetStore(FleetStore):
    """One connection to a PostgreSQL fleet store; use one per thread or process."""

    engine = "postgresql"

    def __init__(self, url: str, *, create: bool = True, readonly: bool = False, busy_timeout_s: float = 30.0,
                 autocheckpoint: bool = True, connect_timeout_s: float = 10.0):
        if psycopg is None:
            raise EdgekitError("a postgresql:// store needs psycopg: pip install 'psycopg[binary]'")
        self.url = url
        self.path = describe(url)  # (what messages show: never the password)
        self.last_left_out = 0
        self.last_refused = 0
        self.position = None
        self._readonly = readonly
        self._busy_timeout_s = busy_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._connect()
        try:
            if create and not readonly:
                self._init()
            elif self._check_version() == 0:
                raise StoreError(f"no fleet store in {self.path}; run `edgekit fleet monitor --db {self.path}` "
                                 "first")
        except BaseException:
            self.db.close()
            raise

    def _connect(self) -> None:
        try:
            # (the name says which process holds a session: LEADER_QUERY shows who runs the tracker)
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout_s)),
                                   application_name=f"edgekit-fleet {socket.gethostname()} {os.getpid()}"[:63],
                                   **KEEPALIVES)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the fleet store at {self.path}: {self._scrub(exc)}; {CONNECT_HINT}",
                             hint=CONNECT_HINT) from None
        try:
            # a statement stuck behind a lock longer than this fails instead of hanging the monitor
            conn.execute(f"SET lock_timeout = {int(self._busy_timeout_s * 1000)}")
            # the server side of the same: a leader whose machine vanished without closing its connection
            # loses the tracker's lock in ~25 s, not after the system's TCP keepalive (2 hours)
            for name, value in SERVER_KEEPALIVES.items():
                conn.execute(f"SET {name} = {value}")
            if self._readonly:
                conn.execute("SET default_transaction_read_only = on")
        except BaseException:
            conn.close()
            raise
        self.db = PgConnection(conn, self.path)
        self.leader = False  # (a new session holds no lock)
        self._staged = False  # the session's staging table exists

    def reconnect(self, within_s: float = RECONNECT_S) -> None:
        """A new session after the old one broke, retried with backoff for ``within_s`` seconds.

        The old session's locks went with it: the tracker's leadership must be
        asked for again (:meth:`try_lead`).
        """
        try:
            self.db.close()
        except psycopg.Error:
            pass
        deadline = time.monotonic() + within_s
        delay = 0.25
        while True:
            try:
                self._connect()
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreConnectionLost(f"{exc} (retried for {within_s:g} s)") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.warning("reconnected to the fleet store at %s", self.path)
            return

    def insert_batch(self, rows: Sequence[tuple], malformed: Optional[dict[str, list]] = None,
                     counters: Optional[dict[str, int]] = None) -> int:
        """As :meth:`FleetStore.insert_batch`; a broken connection is opened again and the batch stored again.

        (Its messages are not acknowledged to the broker yet. Had the lost commit
        gone through, the second try finds every row stored: they count as duplicates.)
        """
        try:
            return super().insert_batch(rows, malformed, counters)
        except StoreConnectionLost as exc:
            log.warning("%s; reconnecting to store the batch of %d messages again", exc, len(rows))
        self.reconnect()
        return super().insert_batch(rows, malformed, counters)

    def _scrub(self, exc: BaseException) -> str:
        """The driver's message, first line, with the URL's password (if it were echoed) masked."""
        from urllib.parse import urlsplit

        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        password = urlsplit(self.url).password
        return text.replace(password, "***") if password else text

    # -- schema (engine) -----------------------------------------------------------------------
    def _schema_version(self) -> int:
        if self.db.execute("SELECT to_regclass('store_meta')").fetchone()[0] is None:
            if self.db.execute("SELECT to_regclass('messages')").fetchone()[0] is not None:
                raise StoreError(f"{self.path} has a `messages` table but no `store_meta`: it is not a fleet "
                                 "store; name an empty database")
            return 0
        row = self.db.execute("SELECT value FROM store_meta WHERE name = 'schema_version'").fetchone()
        return row[0] if row else 0

    def _init(self) -> None:
        db = self.db
        db.execute("BEGIN")
        try:
            db.execute("SELECT pg_advisory_xact_lock(?, ?)", (LOCK_NAMESPACE, SCHEMA_LOCK))
            if self._check_version() == 0:
                for stmt in PG_SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT INTO store_meta(name, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except psycopg.errors.InsufficientPrivilege as exc:
            self._rollback()
            raise StoreError(f"cannot create the fleet store's tables in {self.path}: {self._scrub(exc)}; give "
                             "the monitor's user its own database (`createdb -O <user> <database>`) or CREATE on "
                             "its schema") from None
        except BaseException:
            self._rollback()
            raise

    def checkpoint(self) -> tuple[int, int, int]:
        """Nothing to do: the server checkpoints on its own (kept so that callers need not ask the engine)."""
        return (0, 0, 0)

    def close(self) -> None:
        self.db.close()  # (a session lock, the tracker's leadership, goes with the session)

    # -- writes (engine) -----------------------------------------------------------------------
    def _is_row_error(self, exc: BaseException) -> bool:
        if isinstance(exc, (OverflowError, ValueError, TypeError)):
            return True
        if not isinstance(exc, psycopg.DatabaseError) or isinstance(exc, psycopg.OperationalError):
            return False
        state = exc.sqlstate
        if state is None:  # refused by the driver before it was sent (a NUL in text, a value of no SQL type)
            return isinstance(exc, (psycopg.DataError, psycopg.ProgrammingError))
        return state.startswith(_ROW_SQLSTATES)

    def _begin_insert(self) -> None:
        if not self._staged:  # (outside the batch's transaction: a rolled-back batch must not take it along)
            self.db.execute(_CREATE_STAGE)
            self._staged = True
        self.db.execute("BEGIN")
        # before any id is drawn: the batches' commits, hence their ids, go one at a time (see the module doc)
        self.db.execute("SELECT pg_advisory_xact_lock(?, ?)", (LOCK_NAMESPACE, ORDER_LOCK))

    def _begin_write(self) -> None:
        self.db.execute("BEGIN")

    def _rollback(self) -> None:
        try:
            self.db.conn.execute("ROLLBACK")
        except psycopg.Error:  # the connection is gone: the server rolled it back
            log.debug("rollback failed", exc_info=True)

    def _insert_rows(self, rows: Sequence[tuple]) -> int:
        if not rows:
            return 0
        conn = self.db.conn
        try:
            with conn.cursor() as cur:
                with cur.copy(_COPY) as copy:
                    copy.set_types(_COPY_TYPES)
                    write = copy.write_row
                    for row in rows:
                        write(row)
                return cur.execute(_INSERT_STAGED).rowcount
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise self.db.lost(exc) from None

    def _insert_row(self, row: tuple) -> int:
        db = self.db
        db.execute("SAVEPOINT edgekit_row")  # a refused row must not abort the batch's transaction
        try:
            n = db.conn.execute(_INSERT_ONE, row).rowcount
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise db.lost(exc) from None
        except BaseException:
            db.execute("ROLLBACK TO SAVEPOINT edgekit_row")
            raise
        db.execute("RELEASE SAVEPOINT edgekit_row")
        return n

    def _insert_id(self, sql: str, row: tuple) -> int:
        return self.db.execute(sql + " RETURNING id", row).fetchone()[0]

    # -- tracker (engine) ----------------------------------------------------------------------
    def _save_position(self, devices: list) -> None:
        # only with device rows: they then include every message up to the position (all changed devices
        # are written at once), so a new leader neither skips nor counts twice
        if devices and self.position is not None:
            self.db.execute("INSERT INTO store_meta(name, value) VALUES ('tracker_position', ?) "
                            "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (self.position,))

    def tracker_position(self) -> Optional[int]:
        """Id of the last message the stored device rows include (0: none yet)."""
        row = self.db.execute("SELECT value FROM store_meta WHERE name = 'tracker_position'").fetchone()
        return row[0] if row else 0

    def try_lead(self) -> bool:
        """Take the tracker's lock if no other session holds it; True while this connection holds it."""
        if not self.leader:
            self.leader = bool(self.db.execute("SELECT pg_try_advisory_lock(?, ?)",
                                               (LOCK_NAMESPACE, LEADER_LOCK)).fetchone()[0])
        return self.leader
