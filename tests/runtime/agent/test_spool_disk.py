"""The spool's files on disk stay bounded, and the state/backlog ordering rule consumers rely on.

Bound (docs/telemetry.md, "The device's spool on disk"): db + -wal + -shm together stay
within ``spool_max_bytes`` + ``FILES_CONSTANT`` for a small spool; for a larger one the
db's pages add up to 1/3 of ``spool_max_bytes`` for telemetry-sized messages (a message's
last page is partly empty).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from edgekit_runtime.agent import AgentState
from edgekit_runtime.agent.spool import ACK_BATCH, Spool

FILES_CONSTANT = 128 * 1024  # WAL (<= 64 KiB), -shm (32 KiB), schema pages and one message's slack
TOPIC = "edgekit/v1/f1/dev1/telemetry"


def files_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


def payload(seq: int, size: int = 1700) -> bytes:
    """A telemetry-sized JSON payload (the agent's windows are ~1.7 KB)."""
    return json.dumps({"seq": seq, "pad": os.urandom(size // 2).hex()}).encode()


def drain(spool: Spool, sent: list[int], check) -> None:
    """A sender that keeps 20 in flight and is acknowledged for all of them."""
    while rows := spool.next_unsent(20):
        for r in rows:
            spool.mark_inflight(r.id)
        sent.extend(r.seq for r in rows)
        spool.ack([r.id for r in rows])
        check()


def test_files_stay_bounded_live_and_through_an_outage(tmp_path):
    max_bytes = 16384
    db = tmp_path / "spool.db"
    s = Spool(db, max_bytes, "drop_oldest")
    peak = [0]

    def check():
        peak[0] = max(peak[0], files_size(db))
        assert files_size(db) <= max_bytes + FILES_CONSTANT

    sent: list[int] = []
    for seq in range(1, 301):  # live: every message acknowledged right away
        assert s.put(TOPIC, payload(seq), kind="telemetry", boot=1, seq=seq, live=1).accepted
        check()
        drain(s, sent, check)
    assert sent == list(range(1, 301))

    for seq in range(301, 601):  # outage: nothing acknowledged, the oldest are dropped to make room
        assert s.put(TOPIC, payload(seq), kind="telemetry", boot=1, seq=seq, live=None).accepted
        check()
    kept = [r.seq for r in s.next_unsent(1000)]
    assert kept == list(range(601 - len(kept), 601)) and 5 <= len(kept) <= 10
    dropped = s.counters["dropped_oldest"]
    assert dropped == 300 - len(kept)
    drain(s, sent, check)  # the broker is back: everything acknowledged
    assert sent == list(range(1, 301)) + kept  # nothing lost beyond the counted drops, nothing twice
    assert len(s) == 0 and s.stats()["bytes"] == 0 and s.stats()["oldest_age_s"] is None
    s.close()
    # closed: the WAL is checkpointed and truncated; the db keeps its pages (and their free list)
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    assert files_size(db) <= max_bytes * 4 // 3 + 4 * 1024
    assert peak[0] > max_bytes // 2  # (the check measured something)


def test_a_larger_spool_stays_within_a_third_over_its_bound(tmp_path):
    max_bytes = 256 * 1024
    db = tmp_path / "spool.db"
    s = Spool(db, max_bytes, "drop_oldest")
    sent: list[int] = []

    def check():
        assert files_size(db) <= max_bytes * 4 // 3 + FILES_CONSTANT

    for seq in range(1, 301):  # ~510 KB made while offline: about half is dropped
        s.put(TOPIC, payload(seq), kind="telemetry", boot=1, seq=seq, live=None)
        check()
    assert s.counters["dropped_oldest"] > 100
    drain(s, sent, check)
    assert sent == sorted(set(sent)) and sent[-1] == 300
    s.close()


def test_acknowledged_messages_cost_no_commit_of_their_own_and_a_crash_only_resends_them(tmp_path):
    db = tmp_path / "spool.db"
    s = Spool(db, 1_000_000)
    for seq in range(1, 4):
        s.put(TOPIC, payload(seq, 200), kind="telemetry", boot=1, seq=seq, live=1)
    rows = s.next_unsent(10)
    s.ack([rows[0].id, rows[1].id])
    assert len(s) == 1 and [r.seq for r in s.next_unsent(10)] == [3]
    # a crash now (the connection dies without close()): the two acknowledged come back, nothing is lost
    s._db.close()
    again = Spool(db, 1_000_000)
    assert [r.seq for r in again.next_unsent(10)] == [1, 2, 3]
    rows = again.next_unsent(10)
    again.ack([rows[0].id])
    again.put(TOPIC, payload(4, 200), kind="telemetry", boot=1, seq=4, live=1)  # its transaction deletes seq 1
    again._db.close()
    third = Spool(db, 1_000_000)
    assert [r.seq for r in third.next_unsent(10)] == [2, 3, 4]
    # at most ACK_BATCH wait: a long drain with no new message deletes as it goes
    rows = third.next_unsent(10)
    for seq in range(5, 5 + 2 * ACK_BATCH):
        third.put(TOPIC, payload(seq, 100), kind="event", boot=1, seq=seq, live=None)
    rows = third.next_unsent(1000)
    third.ack([r.id for r in rows])
    on_disk = sqlite3.connect(db).execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert len(third) == 0 and on_disk < ACK_BATCH
    third.close()
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_a_spool_made_by_an_older_agent_keeps_its_order(tmp_path):
    db = tmp_path / "spool.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript("""
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
            kind TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL, created REAL NOT NULL, live INTEGER,
            size INTEGER NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);""")
    for seq in (1, 2, 3):
        old.execute("INSERT INTO messages (topic, payload, kind, boot, seq, created, live, size) "
                    "VALUES (?, ?, 'telemetry', 1, ?, 0, NULL, 100)", (TOPIC, b"x", seq))
    old.execute("DELETE FROM messages WHERE seq = 3")
    old.close()
    s = Spool(db, 1_000_000)
    s.put(TOPIC, b"y", kind="telemetry", boot=2, seq=1, live=None)
    assert [(r.boot, r.seq) for r in s.next_unsent(10)] == [(1, 1), (1, 2), (2, 1)]
    s.close()


def test_online_state_arrives_first_and_its_seq_bounds_the_backlog(agent_env, broker, subscriber):
    """The rule in docs/telemetry.md: a `state` "online" with seq S is made when the connection
    comes up, so every message of its boot numbered below S was made before it and, after an
    outage, arrives *after* it (replayed, historical); S itself sorts after that backlog."""
    sub = subscriber(client_id="order-watcher")
    agent = agent_env.start_agent(agent_env.config(telemetry_interval_s=0.1), load_model=False)
    agent_env.wait_until(lambda: agent.link.connected, what="agent connected")
    sub.wait(lambda s: len(s.of("telemetry")) >= 2, what="live telemetry")
    broker.stop()
    agent_env.wait_until(lambda: agent.core.state == AgentState.OFFLINE_SPOOLING, what="offline")
    agent_env.wait_until(lambda: len(agent.core.spool) >= 5, what="a backlog")
    backlog = {r.seq for r in agent.core.spool.next_unsent(10_000)}
    before = agent.core.seq
    broker.start()
    agent_env.wait_until(lambda: len(agent.core.spool) == 0 and agent.link.connected, timeout=15,
                         what="backlog sent")
    sub.wait(lambda s: backlog <= {m["seq"] for m in s.of("telemetry") + s.of("event")}, timeout=15,
             what="the backlog")
    agent_env.stop_agent(agent)

    arrivals = [env for _, env, _ in sub.messages if env["boot"] == 1 and env["seq"] > 0]
    online = next(e for e in arrivals if e["kind"] == "state" and e["body"]["status"] == "online"
                  and e["seq"] > before)
    s = online["seq"]
    first_at = {}
    for i, e in enumerate(arrivals):
        first_at.setdefault(e["seq"], i)
    # on the wire, the online came before the backlog it follows...
    assert all(first_at[q] > first_at[s] for q in backlog)
    # ...but its seq is above every message made before it, and all of those are historical
    assert max(backlog) < s
    below = [e for e in arrivals if e["kind"] != "state" and e["seq"] < s and e["seq"] in backlog]
    assert below and all(e["historical"] for e in below)
    # waiting for the numbers below S is enough: none is missing once the spool drained
    assert set(range(1, s)) <= set(first_at)
    # and (boot, seq) order puts the online after its backlog
    ordered = sorted({(e["boot"], e["seq"]): e for e in arrivals}.values(), key=lambda e: (e["boot"], e["seq"]))
    assert ordered.index(next(e for e in ordered if e["seq"] == s)) > max(
        i for i, e in enumerate(ordered) if e["seq"] in backlog)
