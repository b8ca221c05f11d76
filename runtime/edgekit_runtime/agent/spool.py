"""On-disk spool of outgoing messages: nothing made while the broker is away is lost.

Every telemetry window, event and ack is written here *before* it is sent and
deleted only when the broker acknowledged it (QoS 1 PUBACK), as Greengrass'
stream manager does; paho-mqtt's own queue lives in memory and is bounded by
``max_inflight``. SQLite in WAL mode, ``synchronous=FULL`` by default so a row
survives a power cut once :meth:`put` returned.

The spool is bounded in *message bytes* (topic + payload; the file itself is a
little larger and does not shrink). When a new message does not fit, the
declared policy applies:

* ``drop_oldest``: delete the oldest messages that are not in flight until it fits;
* ``reject_new``: refuse the new message.

Both are counted (persistently) and reported in telemetry and a ``spool_drop``
event. Row ids only grow (``AUTOINCREMENT``), so id order is creation order.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ROW_OVERHEAD = 64  # bytes counted per message on top of topic and payload

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    created REAL NOT NULL,
    live INTEGER,            -- connection epoch it was made in (NULL: made while offline)
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
COUNTERS = ("dropped_oldest", "rejected_new", "broker_rejected", "accepted")


@dataclass(frozen=True)
class SpooledMessage:
    id: int
    topic: str
    payload: bytes
    kind: str
    boot: int
    seq: int
    created: float
    live: int | None


@dataclass(frozen=True)
class PutResult:
    accepted: bool
    dropped: int = 0  # older messages deleted to make room (drop_oldest)
    id: int | None = None


class Spool:
    """A bounded, durable FIFO of MQTT messages; thread-safe."""

    def __init__(self, path: str | Path, max_bytes: int, policy: str = "drop_oldest", *, sync: str = "full"):
        if policy not in ("drop_oldest", "reject_new"):
            raise ValueError(f"spool policy {policy!r} is not drop_oldest or reject_new")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.policy = policy
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._inflight: set[int] = set()
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        self._counters = {name: 0 for name in COUNTERS}
        for name, value in self._db.execute("SELECT name, value FROM counters"):
            self._counters[name] = int(value)

    # -- writing ------------------------------------------------------------------
    def put(self, topic: str, payload: bytes, *, kind: str, boot: int, seq: int, live: int | None,
            created: float | None = None) -> PutResult:
        """Store one message durably, applying the size bound and the drop policy."""
        size = len(topic.encode()) + len(payload) + ROW_OVERHEAD
        with self._lock:
            if size > self.max_bytes:
                self._bump("rejected_new")
                return PutResult(False)
            dropped_ids: list[tuple[int, int]] = []
            if self._bytes + size > self.max_bytes:
                if self.policy == "reject_new":
                    self._bump("rejected_new")
                    return PutResult(False)
                need = self._bytes + size - self.max_bytes
                freed = 0
                for rid, rsize in self._db.execute("SELECT id, size FROM messages ORDER BY id"):
                    if rid in self._inflight:
                        continue
                    dropped_ids.append((rid, rsize))
                    freed += rsize
                    if freed >= need:
                        break
                if freed < need:  # what is in flight alone leaves no room
                    self._bump("rejected_new")
                    return PutResult(False)
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if dropped_ids:
                    db.executemany("DELETE FROM messages WHERE id = ?", [(rid,) for rid, _ in dropped_ids])
                    self._store_counter(db, "dropped_oldest", self._counters["dropped_oldest"] + len(dropped_ids))
                cur = db.execute(
                    "INSERT INTO messages (topic, payload, kind, boot, seq, created, live, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (topic, payload, kind, boot, seq, time.time() if created is None else created, live, size))
                self._store_counter(db, "accepted", self._counters["accepted"] + 1)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if dropped_ids:
                self._counters["dropped_oldest"] += len(dropped_ids)
            self._counters["accepted"] += 1
            self._count += 1 - len(dropped_ids)
            self._bytes += size - sum(s for _, s in dropped_ids)
            return PutResult(True, len(dropped_ids), cur.lastrowid)

    def _store_counter(self, db: sqlite3.Connection, name: str, value: int) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                   "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))

    def _bump(self, name: str, n: int = 1) -> None:
        self._counters[name] += n
        self._store_counter(self._db, name, self._counters[name])

    # -- sending ----------------------------------------------------------------------
    def next_unsent(self, limit: int) -> list[SpooledMessage]:
        """The oldest messages not in flight, in creation order."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, kind, boot, seq, created, live FROM messages ORDER BY id LIMIT ?",
                (limit + len(self._inflight),)).fetchall()
            out = [SpooledMessage(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6], r[7])
                   for r in rows if r[0] not in self._inflight]
        return out[:limit]

    def mark_inflight(self, message_id: int) -> None:
        with self._lock:
            self._inflight.add(message_id)

    def release(self, message_ids: Iterable[int] | None = None) -> None:
        """Put in-flight messages back in line (all of them when ``message_ids`` is None)."""
        with self._lock:
            if message_ids is None:
                self._inflight.clear()
            else:
                self._inflight.difference_update(message_ids)

    def ack(self, message_ids: Iterable[int], *, rejected: int = 0) -> None:
        """Delete messages the broker acknowledged (one transaction for the lot)."""
        ids = list(message_ids)
        if not ids:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                freed = 0
                removed = 0
                for rid in ids:
                    row = db.execute("SELECT size FROM messages WHERE id = ?", (rid,)).fetchone()
                    if row is None:
                        continue
                    db.execute("DELETE FROM messages WHERE id = ?", (rid,))
                    freed += int(row[0])
                    removed += 1
                if rejected:
                    self._store_counter(db, "broker_rejected", self._counters["broker_rejected"] + rejected)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._counters["broker_rejected"] += rejected
            self._count -= removed
            self._bytes -= freed
            self._inflight.difference_update(ids)

    def forget_live(self, boot: int, live: int) -> None:
        """Messages made during a connection attempt that failed count as made offline."""
        with self._lock:
            self._db.execute("UPDATE messages SET live = NULL WHERE boot = ? AND live = ?", (boot, live))

    # -- reporting -------------------------------------------------------------------
    def max_boot(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(boot), 0) FROM messages").fetchone()[0])

    @property
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def __len__(self) -> int:
        return self._count

    def stats(self) -> dict[str, object]:
        """What telemetry reports about the spool."""
        with self._lock:
            oldest = self._db.execute("SELECT MIN(created) FROM messages").fetchone()[0]
            return {
                "pending": self._count,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "policy": self.policy,
                "in_flight": len(self._inflight),
                "oldest_age_s": None if oldest is None else round(max(0.0, time.time() - oldest), 3),
                "dropped_oldest_total": self._counters["dropped_oldest"],
                "rejected_new_total": self._counters["rejected_new"],
                "broker_rejected_total": self._counters["broker_rejected"],
            }

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another reader holds the WAL; the next open checkpoints it
            self._db.close()


def read_stats(path: str | Path) -> dict[str, object] | None:
    """Spool figures for ``edgekit-agent status``, read-only (the agent may be running)."""
    path = Path(path)
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        count, size, oldest = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM messages").fetchone()
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return {"pending": count, "bytes": size, "oldest_age_s": None if oldest is None else round(time.time() - oldest, 3),
            "dropped_oldest_total": counters.get("dropped_oldest", 0),
            "rejected_new_total": counters.get("rejected_new", 0),
            "broker_rejected_total": counters.get("broker_rejected", 0)}
