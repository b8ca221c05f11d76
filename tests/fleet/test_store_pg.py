"""The PostgreSQL fleet store against a real server: the SQLite store's behaviour and results, tailing in commit
order under concurrent writers, one tracker among several monitors, and two monitor processes on one store."""

from __future__ import annotations

import json
import threading

import pytest

from edgekit.fleet.ingest import Ingestor
from edgekit.fleet.store import MESSAGE_COLUMNS, SCHEMA_VERSION, StoreError
from edgekit.fleet.store_pg import PgFleetStore
from edgekit.fleet.stores import open_store
from edgekit.fleet.tracker import FleetTracker, Thresholds
from edgekit_runtime.contract import fleet_protocol as fp

from tests.polling import wait_until


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def env(kind, seq, body=None, boot=1, device="d1", historical=False, ts=None):
    body = body if body is not None else ({"status": "online", "model": {"name": "m", "version": "2"}}
                                          if kind == "state" else {"window_s": 1.0, "inferences": 1})
    return fp.envelope(kind, "f1", device, boot, seq, body, ts=1000.0 + seq if ts is None else ts,
                       historical=historical)


def feed(store, tracker, *messages, retained=False, received=2000.0):
    ing = Ingestor(fleet="f1")
    for msg in messages:
        assert ing.add(fp.topic(msg["fleet"], msg["device"], msg["kind"]), fp.encode(msg), retained, received)
    rows, bad = ing.take()
    store.insert_batch(rows, bad)
    tracker.consume(store.tail(tracker.last_id))
    store.position = tracker.last_id
    tracker.flush(store)


def _row(seq, ts=1500.0, device="old", **over):
    rec = {"fleet": "f1", "device": device, "kind": "telemetry", "boot": 1, "seq": seq, "ts": ts,
           "received": 2000.0, "historical": 0, "retained": 0, "p50_ms": 2.0, "p99_ms": 5.0,
           "inferences": 5, "calls": 5, "errors": 0, "temp_c": None, "cpu_percent": None, "drift_psi": 0.05,
           "payload": json.dumps({"ts": ts, "body": {"window_s": 1.0, "inferences": 5}})}
    rec.update(over)
    return tuple(rec[c] for c in MESSAGE_COLUMNS)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """The --db of an empty store of each engine (the PostgreSQL one on the session's server)."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("pg_url")


# ----------------------------------------------------------------------------- same behaviour on both engines
def scenario(db: str) -> dict:
    """Everything the readers show after one fixed history: states, duplicates, a gap filled by a replay,
    alerts opened and closed, a refused batch, a stale will. Equal on both engines."""
    clock = Clock()
    with open_store(db) as store:
        tracker = FleetTracker(Thresholds(gap_grace_s=5.0, p99_ms=10.0), clock=clock)

        def tel(seq, p99=5.0, **kw):
            return env("telemetry", seq, {"window_s": 1.0, "inferences": 5, "calls": 5, "errors": 0,
                                          "latency_ms": {"p50": 1.0, "p99": p99}}, **kw)

        feed(store, tracker, env("state", 1), tel(2), tel(2), tel(5, p99=50.0), env("event", 6, {"type": "x"}))
        feed(store, tracker, env("state", 1, device="d2"), tel(2, device="d2"))
        clock.t += 6
        tracker.flush(store)
        feed(store, tracker, tel(3, historical=True), tel(4, historical=True), tel(7))
        feed(store, tracker, env("state", 0, {"status": "offline"}, boot=0))  # stale will
        assert store.insert_batch([_row(1), _row(2**63), _row(3), _row(4, inferences=2**64), _row(1)],
                                  {"not_json": [2, "edgekit/v1/f1/x/telemetry", "bad", 5.0]},
                                  {"clock_skew": 1}) == 2
        refused = store.last_refused
        tracker.consume(store.tail(tracker.last_id))
        store.position = tracker.last_id
        tracker.flush(store)
        malformed = store.malformed()
        assert "store_refused" in malformed
        malformed["store_refused"].pop("last_error")  # (each engine's own words)
        malformed["store_refused"].pop("last_seen")  # (the time of the refusal)
        return {"refused": refused, "devices": store.devices(), "find": store.find_device("d2"),
                "history": store.history("f1", "d1"), "newest": store.history("f1", "d1", limit=2),
                "telemetry_since": store.history("f1", "d1", since=1004.0, kinds=["telemetry"]),
                "series": store.series("f1", "d1"), "gaps": store.gaps("f1", "d1"), "alerts": store.alerts(),
                "open": store.alerts("f1", "d1", open_only=True), "malformed": malformed,
                "counters": store.counters(), "per_kind": store.message_counts("f1", "d1"),
                "count": store.message_count(), "telemetry": store.message_count("telemetry"),
                "max_seq": store.max_seq("f1", "d1", 1), "tail": [r[1:] for r in store.tail(0)]}


def test_both_engines_store_and_answer_the_same(tmp_path, pg_url):
    sqlite, pg = scenario(str(tmp_path / "fleet.db")), scenario(pg_url)
    assert pg == sqlite
    # and what the scenario means, so that two equally wrong engines do not pass
    assert pg["refused"] == 2 and pg["counters"] == {"clock_skew": 1, "duplicates": 2, "stale_wills": 1}
    assert [(g["first_seq"], g["last_seq"], g["closed"] is not None) for g in pg["gaps"]] == [(3, 4, True)]
    assert [(a["kind"], a["closed"] is None) for a in pg["alerts"]] == [("p99", False)]
    assert [(r["boot"], r["seq"]) for r in pg["history"]] == [(0, 0)] + [(1, s) for s in range(1, 8)]
    assert pg["max_seq"] == 7
    assert [r["seq"] for r in pg["newest"]] == [6, 7] and pg["find"] == ("f1", "d2")
    assert pg["malformed"]["not_json"]["count"] == 2 and pg["malformed"]["store_refused"]["count"] == 2
    d1 = next(d for d in pg["devices"] if d["device"] == "d1")
    assert (d1["status"], d1["model"], d1["seq"], d1["missing"]) == ("online", "m 2", 7, 0)


def test_refused_rows_do_not_lose_their_batch(db):
    with open_store(db) as store:
        rows = [_row(1), _row(2**63), _row(3), _row(4, inferences=2**64), _row(1), _row(5, payload="{\"a\":\"\x00\"}")]
        new = store.insert_batch(rows, counters={"clock_skew": 1})
        nul_refused = store.engine == "postgresql"  # (PostgreSQL's text has no NUL; SQLite stores it)
        assert new == 3 - nul_refused and store.last_refused == 2 + nul_refused
        assert store.counters() == {"clock_skew": 1, "duplicates": 1}
        refused = store.malformed()["store_refused"]
        assert refused["count"] == 2 + nul_refused and refused["last_topic"] == "edgekit/v1/f1/old/telemetry"
        assert store.insert_batch([_row(6)]) == 1 and store.last_refused == 0


def test_the_retention_sql_dialect_runs_on_both(db):
    """``store.db`` takes ``?`` placeholders, BEGIN/COMMIT and portable upserts on both engines."""
    with open_store(db) as store:
        assert store.engine in ("sqlite", "postgresql")
        store.insert_batch([_row(s, ts=1000.0 + s) for s in range(1, 11)])
        q = store.db
        q.execute("BEGIN")
        cur = q.execute("DELETE FROM messages WHERE ts < ? AND kind = ?", (1005.0, "telemetry"))
        assert cur.rowcount == 4
        q.executemany("INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                      "SET value = counters.value + excluded.value", [("pruned", 4), ("pruned", 1)])
        q.execute("COMMIT")
        assert q.execute("SELECT value FROM counters WHERE name = ?", ("pruned",)).fetchone() == (5,)
        assert q.execute("SELECT COUNT(*) FROM messages WHERE payload LIKE '%inferences%'").fetchone()[0] == 6
        assert [r[0] for r in q.execute("SELECT seq FROM messages ORDER BY seq").fetchall()] == list(range(5, 11))


# ----------------------------------------------------------------------------- PostgreSQL's own
def test_schema_version_is_kept_and_a_newer_store_is_refused(pg_url):
    with pytest.raises(StoreError, match="no fleet store"):
        PgFleetStore(pg_url, create=False, readonly=True)
    with PgFleetStore(pg_url) as store:
        assert store.db.execute("SELECT value FROM store_meta WHERE name = 'schema_version'").fetchone() == \
            (SCHEMA_VERSION,)
        plan = " ".join(r[0] for r in store.db.execute(
            "EXPLAIN SELECT * FROM messages WHERE fleet = ? AND device = ? AND ts >= ?", ("f", "d", 5.0)))
        assert "messages_device_time" in plan or "messages_key" in plan
        store.db.execute("UPDATE store_meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this edgekit"):
        PgFleetStore(pg_url)
    with pytest.raises(StoreError, match="newer than this edgekit"):
        PgFleetStore(pg_url, create=False, readonly=True)


def test_a_reader_cannot_write(pg_url):
    PgFleetStore(pg_url).close()
    with PgFleetStore(pg_url, create=False, readonly=True) as store:
        with pytest.raises(Exception, match="read-only"):
            store.bump("x")


def test_connection_errors_say_what_to_check_and_never_the_password(pg_server):
    from edgekit.fleet.broker import free_port

    url = f"postgresql://edgekit:s3cret-pw@127.0.0.1:{free_port()}/fleet"
    with pytest.raises(StoreError) as info:
        open_store(url, connect_timeout_s=2)
    text = str(info.value)
    assert "s3cret-pw" not in text and "edgekit:***@127.0.0.1" in text
    assert "running" in text and "createdb" in text
    missing = f"postgresql://edgekit@{pg_server.host}:{pg_server.port}/no_such_db"
    with pytest.raises(StoreError, match="does not exist.*createdb"):
        open_store(missing)


def test_concurrent_batches_commit_in_id_order(pg_url):
    """A batch that drew its ids first commits first: a later batch waits, so a tail never steps over rows."""
    a, b, reader = PgFleetStore(pg_url), PgFleetStore(pg_url), PgFleetStore(pg_url)
    try:
        a._begin_insert()
        assert a._insert_rows([_row(s, device="a") for s in range(1, 4)]) == 3  # ids drawn, not committed
        done = threading.Event()
        t = threading.Thread(target=lambda: (b.insert_batch([_row(s, device="b") for s in range(1, 4)]),
                                             done.set()))
        t.start()
        assert not done.wait(0.5), "a second batch committed while the first (lower ids) was still open"
        assert reader.tail(0) == []
        a.db.execute("COMMIT")
        t.join(10)
        assert done.is_set()
        rows = reader.tail(0)
        assert [r[2] for r in rows] == ["a"] * 3 + ["b"] * 3
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    finally:
        for s in (a, b, reader):
            s.close()


def test_a_tail_by_id_sees_every_row_once_under_concurrent_writers(pg_url):
    writers, batches, size = 4, 40, 25
    PgFleetStore(pg_url).close()
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            with PgFleetStore(pg_url) as store:
                for i in range(batches):
                    store.insert_batch([_row(i * size + s + 1, device=f"w{w}") for s in range(size)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    seen: list[tuple] = []
    with PgFleetStore(pg_url, create=False, readonly=True) as reader:
        for t in threads:
            t.start()
        last = 0
        while True:
            writing = any(t.is_alive() for t in threads)
            rows = reader.tail(last, limit=37)  # (small pages: many reads while the writers commit)
            if rows:
                last = rows[-1][0]
                seen.extend((r[2], r[5]) for r in rows)
            elif not writing:
                break  # (the writers had finished before this empty read: nothing more will come)
        for t in threads:
            t.join()
        assert reader.message_count() == writers * batches * size
    assert not errors
    assert len(seen) == writers * batches * size == len(set(seen))


def test_one_leader_at_a_time_and_the_next_takes_over(pg_url):
    a, b = PgFleetStore(pg_url), PgFleetStore(pg_url)
    try:
        assert a.try_lead() and a.try_lead()
        assert not b.try_lead()
        assert b.tracker_position() == 0
        a.position = 42
        a.save_tracker([], [], [], [], [])  # no device rows: the position is not theirs yet
        assert b.tracker_position() == 0
        a.save_tracker([("f1", "d1", "online", 1, 3, None, 1.0, 2.0, "{}")], [], [], [], [])
        assert b.tracker_position() == 42
        a.close()  # (the server lets go of the lock as the session ends, a moment later)
        wait_until(b.try_lead, 10, "the lock to pass to the second session")
    finally:
        b.close()


def test_a_new_leader_resumes_where_the_old_ones_device_rows_end(pg_url):
    """Rows the dead leader consumed but whose device rows it never wrote are tracked by the next leader, once."""
    from edgekit.fleet.connection import BrokerSettings
    from edgekit.fleet.monitor import Monitor, MonitorOptions

    old = PgFleetStore(pg_url)
    assert old.try_lead()
    tracker = FleetTracker(Thresholds(gap_grace_s=0))
    feed(old, tracker, env("state", 1), env("telemetry", 2), env("telemetry", 3))  # device rows: 3 messages
    ing = Ingestor(fleet="f1")
    for msg in (env("telemetry", 4), env("telemetry", 5)):
        ing.add(fp.topic("f1", "d1", "telemetry"), fp.encode(msg), False, 2000.0)
    old.insert_batch(*ing.take())
    tracker.consume(old.tail(tracker.last_id))  # consumed, then the process dies before it writes them
    old.close()
    monitor = Monitor(BrokerSettings(host="127.0.0.1", port=1), pg_url, MonitorOptions(persist_every_s=0))
    taken: list = []
    monitor.options.lead_listeners.append(taken.append)
    with PgFleetStore(pg_url) as store:
        wait_until(lambda: (monitor._try_lead(store), monitor.leader)[1], 10, "the lock to be free")
        assert taken == [monitor]
        monitor._step(store)
    with PgFleetStore(pg_url, create=False, readonly=True) as store:
        (dev,) = store.devices()
    assert (dev["seq"], dev["messages"], dev["missing"]) == (5, 5, 0)


def test_a_follower_monitor_takes_over_when_the_leader_stops(fleet, pg_url):
    fleet.db = pg_url
    leader = fleet.start_monitor()
    fleet.wait(lambda: leader.monitor.leader, what="the first monitor to lead")
    follower = fleet.start_monitor(client_id="second")
    fleet.online("cam-1", seq=1)
    for seq in range(2, 12):
        fleet.publish("telemetry", "cam-1", seq, {"window_s": 1.0, "inferences": seq})

    def device():
        with open_store(pg_url, create=False, readonly=True) as s:
            return next((d for d in s.devices() if d["device"] == "cam-1"), None)

    fleet.wait(lambda: (device() or {}).get("seq") == 11, what="cam-1 tracked by the leader")
    assert not follower.monitor.leader
    summary = leader.stop()
    assert summary["tracker"] == "leader" and "edgekit@" in summary["store"]
    fleet.wait(lambda: follower.monitor.leader, what="the second monitor to take over")
    for seq in range(12, 20):
        fleet.publish("telemetry", "cam-1", seq, {"window_s": 1.0, "inferences": seq})
    dev = fleet.wait(lambda: (lambda d: d if d and d["seq"] == 19 else None)(device()), what="cam-1 at seq 19")
    # restored, not restarted: every message counted once across the two leaders, nothing missing
    assert dev["messages"] == 19 and dev["missing"] == 0 and dev["status"] == "online"
    with open_store(pg_url, create=False, readonly=True) as s:
        assert s.message_count() == 19 and s.counters().get("duplicates", 0) == 1  # (the follower's state copy)


# ----------------------------------------------------------------------------- two monitor processes, one store
MONITOR_PROCESS = r"""
import json, signal, sys
from edgekit.fleet.connection import BrokerSettings
from edgekit.fleet.monitor import Monitor, MonitorOptions
host, port, db, client = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
monitor = Monitor(BrokerSettings(host=host, port=port, keepalive=10), db,
                  MonitorOptions(fleet="bench", group="monitors", client_id=client, tick_s=0.1, persist_every_s=0.2))
signal.signal(signal.SIGTERM, lambda *a: monitor.stop())
monitor.start()
print(json.dumps({"ready": True}), flush=True)
print(json.dumps(monitor.run()), flush=True)
"""


def _leaders(pg_url: str) -> list[str]:
    from edgekit.fleet.store_pg import LEADER_QUERY

    with open_store(pg_url, create=False, readonly=True) as s:
        return [r[0] for r in s.db.execute(LEADER_QUERY).fetchall()]


def _publish(broker, devices: int, messages: int, boot: int) -> int:
    """``devices`` publisher connections, each its state then ``messages`` telemetry; all must be acknowledged."""
    from edgekit.fleet.connection import BrokerSettings
    from edgekit.fleet.loadgen import LoadGenerator, LoadPlan

    plan = LoadPlan(fleet="bench", devices=devices, messages_per_device=messages, processes=2, window=8,
                    boot=boot, timeout_s=120)
    load = LoadGenerator(BrokerSettings(host=broker.host, port=broker.port, keepalive=30), plan)
    load.ready(timeout=120)
    load.go()
    result = load.wait(150)
    assert (result.acked, result.refused) == (load.expected, 0)
    return load.expected


def _wait_tracked(pg_url: str, devices: int, boot: int, seq: int, messages: int, stored: int) -> None:
    def count() -> int:
        with open_store(pg_url, create=False, readonly=True) as s:
            return s.message_count()

    wait_until(lambda: count() >= stored, 60, f"{stored} stored messages")

    def tracked() -> bool:
        with open_store(pg_url, create=False, readonly=True) as s:
            rows = s.devices("bench")
        return len(rows) == devices and all((d["boot"], d["seq"], d["messages"]) == (boot, seq, messages)
                                            for d in rows)

    wait_until(tracked, 60, f"all {devices} devices tracked to boot {boot} seq {seq}")


def test_two_monitor_processes_ingest_1000_devices_none_lost_none_twice(mqtt_broker, pg_url):
    """Two monitor processes (same shared-subscription group, one PostgreSQL store), 1,000 device connections:
    every acknowledged message stored once, one tracker; then the tracker's process is killed and the other
    monitor takes over, restores, and tracks a second round of every device without counting anything twice."""
    import signal
    import subprocess
    import sys

    from typer.testing import CliRunner

    from edgekit.cli import app

    devices, messages = 1000, 5
    PgFleetStore(pg_url).close()  # (created once here; the monitors would race harmlessly for it)
    procs = [subprocess.Popen([sys.executable, "-c", MONITOR_PROCESS, mqtt_broker.host, str(mqtt_broker.port),
                               pg_url, f"monitor-{i}"], stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for p in procs:
            assert json.loads(p.stdout.readline()) == {"ready": True}
        first = _publish(mqtt_broker, devices, messages, boot=1)
        _wait_tracked(pg_url, devices, 1, messages + 1, messages + 1, first)
        leaders = _leaders(pg_url)
        assert len(leaders) == 1  # exactly one tracker
        leader = next(p for p in procs if leaders[0].endswith(f" {p.pid}"))
        follower = next(p for p in procs if p is not leader)
        with open_store(pg_url, create=False, readonly=True) as s:
            assert s.message_count() == first  # 0 lost: every acknowledged message is a row
            # 0 duplicates: the unique key kept one row per message; what it dropped is exactly each state
            # message's second copy (every monitor reads every device's state), no telemetry twice
            assert s.counters().get("duplicates", 0) == devices

        leader.send_signal(signal.SIGKILL)  # no goodbye: its session's lock goes when the server sees it gone
        leader.wait(10)
        wait_until(lambda: len(_leaders(pg_url)) == 1 and _leaders(pg_url)[0].endswith(f" {follower.pid}"), 30,
                   "the surviving monitor to take the tracker")
        second = _publish(mqtt_broker, devices, messages, boot=2)  # (every device restarted)
        _wait_tracked(pg_url, devices, 2, messages + 1, 2 * (messages + 1), first + second)
        follower.terminate()
        out, _ = follower.communicate(timeout=60)
        assert follower.returncode == 0
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["tracker"] == "leader" and summary["devices"] == devices
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with open_store(pg_url, create=False, readonly=True) as s:
        assert s.message_count() == first + second
        assert s.counters().get("duplicates", 0) == devices
        assert s.malformed() == {}
        assert all(d["missing"] == 0 and d["status"] == "online" for d in s.devices())
    listed = CliRunner().invoke(app, ["fleet", "ls", "--db", pg_url, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    rows = rows["devices"] if isinstance(rows, dict) else rows
    assert len(rows) == devices


def test_temp_postgres_serves_its_database_and_leaves_nothing(pg_server):
    import os

    import psycopg

    from edgekit.fleet.pgserver import TempPostgres

    with TempPostgres(dbname="other") as pg:
        root = pg.root
        if os.geteuid() == 0:  # (initdb refuses root: the cluster belongs to an unprivileged account)
            assert root.stat().st_uid != 0
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("other",)
        assert pg.url != pg_server.url
    assert not root.exists()


@pytest.mark.timeout(120)
def test_a_server_restart_loses_nothing(fleet, pg_server):
    """The server restarts under a running monitor: ingest reconnects and stores the batch again (it was not
    acknowledged), the tracker reconnects, leads again and goes on; every message once, nothing missing."""
    from edgekit.fleet.pgserver import TempPostgres

    with TempPostgres(dbname="restart") as pg:  # (its own server: a restart cuts every session on it)
        fleet.db = pg.url
        run = fleet.start_monitor()
        fleet.wait(lambda: run.monitor.leader, what="the monitor to lead")
        fleet.online("cam-1", seq=1)
        for seq in range(2, 11):
            fleet.publish("telemetry", "cam-1", seq, {"window_s": 1.0, "inferences": seq})

        def device():
            with open_store(pg.url, create=False, readonly=True) as s:
                return next((d for d in s.devices() if d["device"] == "cam-1"), None)

        fleet.wait(lambda: (device() or {}).get("seq") == 10, what="cam-1 at seq 10")
        pg.restart()
        for seq in range(11, 21):
            fleet.publish("telemetry", "cam-1", seq, {"window_s": 1.0, "inferences": seq})
        dev = fleet.wait(lambda: (lambda d: d if d and d["seq"] == 20 else None)(device()), timeout=60,
                         what="cam-1 at seq 20 after the restart")
        assert dev["messages"] == 20 and dev["missing"] == 0
        assert run.monitor.leader
        with open_store(pg.url, create=False, readonly=True) as s:
            assert s.message_count() == 20
        run.stop()
