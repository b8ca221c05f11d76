"""On-disk spool of outgoing messages: nothing made while the broker is away is lost.

Every telemetry window, event and ack is written here *before* it is sent and
deleted only when the broker acknowledged it (QoS 1 PUBACK), as Greengrass'
stream manager does; paho-mqtt's own queue lives in memory and is bounded by
``max_inflight``. SQLite in WAL mode, ``synchronous=FULL`` by default so a row
survives a power cut once :meth:`put` returned.

The spool is bounded in *message bytes* (topic + payload + ``ROW_OVERHEAD``).
When a new message does not fit, the declared policy applies:

* ``drop_oldest``: delete the oldest messages that are not in flight until it fits;
* ``reject_new``: refuse the new message.

Both are counted (persistently) and reported in telemetry and a ``spool_drop``
event. Row ids only grow within a process and start above every stored row, so
id order is creation order.

Its *files* are bounded too, and written as little as the durability allows
(flash wears): the WAL is checkpointed every ``WAL_AUTOCHECKPOINT_PAGES`` pages and
truncated to ``WAL_SIZE_LIMIT`` bytes when it restarts; a new spool uses 1 KiB
pages; a message acknowledged by the broker is forgotten at once but deleted on
disk in the next :meth:`put`'s transaction (or once ``ACK_BATCH`` are waiting, or
at :meth:`close`), so a message costs one commit, not two. A crash in between
re-sends those few acknowledged messages (at most ``ACK_BATCH``): duplicates, which
QoS 1 allows and the monitor counts, never losses. docs/telemetry.md ("The
device's spool on disk") has the measured bound and bytes per message.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ROW_OVERHEAD = 64  # bytes counted per message on top of topic and payload
PAGE_SIZE = 1024  # for a new spool file: a ~1.7 KB telemetry message dirties ~3 KiB, not 8
WAL_AUTOCHECKPOINT_PAGES = 32  # checkpoint once the WAL holds this many pages
WAL_SIZE_LIMIT = 64 * 1024  # the WAL file is truncated to this when it restarts
ACK_BATCH = 32  # acknowledged messages whose on-disk delete may wait for the next write

# (ids are assigned by the spool; spools made before had AUTOINCREMENT, which rewrote
# the sqlite_sequence page at every insert)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
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
        if not self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new file: only possible before WAL mode
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._db.executescript(_SCHEMA)
        self._inflight: set[int] = set()
        self._acked: set[int] = set()  # acknowledged, still on disk until the next write transaction
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM messages"
                               ).fetchone()
        self._count, self._bytes, self._last_id = int(row[0]), int(row[1]), int(row[2])
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
                    if rid in self._inflight or rid in self._acked:
                        continue
                    dropped_ids.append((rid, rsize))
                    freed += rsize
                    if freed >= need:
                        break
                if freed < need:  # what is in flight alone leaves no room
                    self._bump("rejected_new")
                    return PutResult(False)
            db = self._db
            new_id = self._last_id + 1
            db.execute("BEGIN IMMEDIATE")
            try:
                # one transaction: the deletes acknowledged since the last write, the drops, the message
                gone = [rid for rid, _ in dropped_ids] + sorted(self._acked)
                if gone:
                    db.executemany("DELETE FROM messages WHERE id = ?", [(rid,) for rid in gone])
                if dropped_ids:
                    self._store_counter(db, "dropped_oldest", self._counters["dropped_oldest"] + len(dropped_ids))
                db.execute(
                    "INSERT INTO messages (id, topic, payload, kind, boot, seq, created, live, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (new_id, topic, payload, kind, boot, seq, time.time() if created is None else created, live,
                     size))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._last_id = new_id
            self._acked.clear()
            if dropped_ids:
                self._counters["dropped_oldest"] += len(dropped_ids)
            # (kept in memory, stored with the next counter write or at close: it is only informative)
            self._counters["accepted"] += 1
            self._count += 1 - len(dropped_ids)
            self._bytes += size - sum(s for _, s in dropped_ids)
            return PutResult(True, len(dropped_ids), new_id)

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
                (limit + len(self._inflight) + len(self._acked),)).fetchall()
            out = [SpooledMessage(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6], r[7])
                   for r in rows if r[0] not in self._inflight and r[0] not in self._acked]
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
        """Forget messages the broker acknowledged.

        They are deleted on disk in the next write transaction (:meth:`put`), or
        now once ``ACK_BATCH`` wait or ``rejected`` must be counted.
        """
        ids = list(message_ids)
        if not ids:
            return
        with self._lock:
            sizes = dict(self._db.execute(
                f"SELECT id, size FROM messages WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall())
            fresh = [rid for rid in sizes if rid not in self._acked]
            self._acked.update(fresh)
            self._count -= len(fresh)
            self._bytes -= sum(sizes[rid] for rid in fresh)
            self._inflight.difference_update(ids)
            self._counters["broker_rejected"] += rejected
            if rejected or len(self._acked) >= ACK_BATCH:
                self._flush_acked()

    def _flush_acked(self) -> None:
        """Delete the acknowledged messages on disk (and store the counters) in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM messages WHERE id = ?", [(rid,) for rid in sorted(self._acked)])
            for name in ("broker_rejected", "accepted"):
                self._store_counter(db, name, self._counters[name])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._acked.clear()

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
            oldest = next((created for rid, created in self._db.execute(
                "SELECT id, created FROM messages ORDER BY id LIMIT ?", (len(self._acked) + 1,))
                if rid not in self._acked), None)
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
            self._flush_acked()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another reader holds the WAL; the next open checkpoints it
            self._db.close()


def read_stats(path: str | Path) -> dict[str, object] | None:
    """Spool figures for ``edgekit-agent status``, read-only (the agent may be running).

    While the agent runs, ``pending`` may include up to ``ACK_BATCH`` messages already
    acknowledged but not yet deleted on disk.
    """
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
