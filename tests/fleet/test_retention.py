"""Retention: raw telemetry folded into hour rows (sketches merged exactly), pruning in bounded steps, size bound."""

from __future__ import annotations

import json
import math
import random
import threading

import pytest
from typer.testing import CliRunner

from edgekit.fleet import retention
from edgekit.fleet.ingest import Ingestor
from edgekit.fleet.retention import HOUR_S, hourly, prune, rollup
from edgekit.fleet.store import FleetStore
from edgekit_runtime.agent.metrics import LatencyHistogram
from edgekit_runtime.contract import fleet_protocol as fp

T0 = 1_780_000_000 - 1_780_000_000 % HOUR_S  # an hour boundary


def window(latencies_s: list[float], errors: int = 0, temp: float = 50.0, psi: float = 0.05) -> dict:
    """A telemetry body as the agent makes it: summary and sketch of these latencies."""
    h = LatencyHistogram()
    for v in latencies_s:
        h.add(v)
    n = len(latencies_s)
    return {"window_s": 10.0, "inferences": n, "calls": n + errors, "errors": errors, "latency_ms": h.summary_ms(),
            "system": {"cpu_percent": 20.0, "temperature_c": {"cpu": temp}},
            "drift": {"inputs": {"x": {"psi": psi}}}}


def store_messages(store: FleetStore, messages: list[dict]) -> None:
    """Through the real ingest path (validation, figures), as a monitor's worker stores them."""
    ing = Ingestor()
    for msg in messages:
        assert ing.add(fp.topic(msg["fleet"], msg["device"], msg["kind"]), fp.encode(msg), False,
                       received=msg["ts"])
    rows, bad = ing.take()
    assert not bad
    store.insert_batch(rows, bad)


def tele(seq: int, ts: float, body: dict, device: str = "d1", boot: int = 1, historical: bool = False) -> dict:
    return fp.envelope("telemetry", "f1", device, boot, seq, body, ts=ts, historical=historical)


@pytest.fixture
def store(tmp_path):
    s = FleetStore(tmp_path / "fleet.db")
    yield s
    s.close()


def raw_count(store: FleetStore, kind: str = "telemetry") -> int:
    return store.db.execute("SELECT COUNT(*) FROM messages WHERE kind = ?", (kind,)).fetchone()[0]


def test_an_hour_merges_sketches_exactly_and_sums_counters(store):
    rng = random.Random(1)
    windows = [[rng.lognormvariate(-5.0 + 0.2 * w, 0.4) for _ in range(200)] for w in range(12)]
    msgs = [tele(i + 1, T0 + 60.0 + i * 300.0, window(lat, errors=i % 3, temp=40.0 + i, psi=0.01 * i))
            for i, lat in enumerate(windows)]
    msgs.append(tele(99, T0 + 2 * HOUR_S, window([0.004])))  # a newer row: stays raw (and keeps the max id)
    store_messages(store, msgs)

    result = rollup(store, T0 + HOUR_S + 1800)  # rounded down to T0 + 1 h
    assert result.rolled_up == 12 and result.hours_written == 1
    assert raw_count(store) == 1

    (hour,) = hourly(store, "f1", "d1")
    everything = LatencyHistogram()
    for lat in windows:
        for v in lat:
            everything.add(v)
    assert hour["hour"] == T0 and hour["messages"] == 12
    assert hour["inferences"] == 2400 and hour["errors"] == sum(i % 3 for i in range(12))
    assert hour["calls"] == 2400 + hour["errors"]
    for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
        assert hour[name] == pytest.approx(everything.quantile(q) * 1e3, rel=1e-12)  # the same sketch, merged
    flat = sorted(v for lat in windows for v in lat)
    # within the sketch's 1 % of a true order statistic of every latency of the hour
    assert hour["p99_ms"] == pytest.approx(flat[int(0.99 * (len(flat) - 1))] * 1e3, rel=0.011)
    assert hour["mean_ms"] == pytest.approx(sum(flat) / len(flat) * 1e3, rel=1e-9)
    assert hour["min_ms"] == pytest.approx(flat[0] * 1e3) and hour["max_ms"] == pytest.approx(flat[-1] * 1e3)
    # the windows' own p99s are kept as what they are: the worst window, the mean of windows
    window_p99 = [LatencyHistogram() for _ in windows]
    for h, lat in zip(window_p99, windows):
        for v in lat:
            h.add(v)
    assert hour["worst_window_p99_ms"] == pytest.approx(max(h.quantile(0.99) for h in window_p99) * 1e3)
    assert hour["temp_c_max"] == 51.0 and hour["temp_c_mean"] == pytest.approx(45.5)
    assert hour["drift_psi_max"] == pytest.approx(0.11)
    assert hour["sketch_messages"] == 12


def test_rollup_is_idempotent_and_merges_rows_that_arrive_late(store, tmp_path):
    rng = random.Random(2)
    bodies = [window([rng.lognormvariate(-5, 0.5) for _ in range(50)]) for _ in range(8)]
    early = [tele(i + 1, T0 + i * 400.0, b) for i, b in enumerate(bodies[:5])]
    late = [tele(i + 6, T0 + 2000.0 + i * 100.0, b, historical=True) for i, b in enumerate(bodies[5:])]
    newest = tele(50, T0 + 5 * HOUR_S, window([0.003]))
    store_messages(store, early + [newest])
    rollup(store, T0 + 2 * HOUR_S)
    first = hourly(store, "f1", "d1")
    again = rollup(store, T0 + 2 * HOUR_S)
    assert again.rolled_up == 0 and hourly(store, "f1", "d1") == first

    store_messages(store, late)  # replayed from a device's spool after its hour was rolled up
    store_messages(store, [tele(51, T0 + 5 * HOUR_S + 10, window([0.003]))])  # (the newest id is never rolled up)
    assert rollup(store, T0 + 2 * HOUR_S).rolled_up == 3
    (merged,) = hourly(store, "f1", "d1")

    # the same messages rolled up in one go give the same hour
    other = FleetStore(tmp_path / "other.db")
    store_messages(other, early + late + [newest, tele(51, T0 + 5 * HOUR_S + 10, window([0.003]))])
    rollup(other, T0 + 2 * HOUR_S)
    (once,) = hourly(other, "f1", "d1")
    other.close()
    assert merged["messages"] == 8 and merged["historical"] == 3
    for key in once:
        if isinstance(once[key], float):
            assert merged[key] == pytest.approx(once[key], rel=1e-12), key
        else:
            assert merged[key] == once[key], key


def test_the_newest_row_and_each_current_boots_last_seq_are_kept(store):
    body = window([0.005] * 10)
    store_messages(store, [tele(1, T0, body, device="a"), tele(2, T0 + 10, body, device="a"),
                           tele(1, T0 + 20, body, device="b", boot=3),
                           fp.envelope("event", "f1", "b", 3, 2, {"type": "installed"}, ts=T0 + 30)])
    result = prune(store, keep_raw_s=0, keep_rollups_s=30 * 86400, now=T0 + 10 * HOUR_S, keep_events_s=0)
    kept = store.db.execute("SELECT device, kind, seq FROM messages ORDER BY id").fetchall()
    # a: seq 2 is its boot's last (the tracker restores from it); b's event has the highest id and seq
    assert kept == [("a", "telemetry", 2), ("b", "event", 2)]
    assert result.rolled_up == 2 and store.max_seq("f1", "a", 1) == 2 and store.max_seq("f1", "b", 3) == 2
    # the newest id is never deleted, so SQLite never hands it to the next message
    top = store.last_id()
    store_messages(store, [tele(3, T0 + 11 * HOUR_S, body, device="a")])
    assert store.last_id() == top + 1


def test_prune_deletes_by_retention_in_bounded_steps(store):
    now = T0 + 100 * HOUR_S
    body = window([0.004] * 20)
    msgs = [tele(i + 1, T0 + 60 * HOUR_S + i * 120.0, body, device=f"d{i % 3}") for i in range(90)]
    msgs += [fp.envelope("event", "f1", "d0", 1, 1000 + i, {"type": "x"}, ts=T0 + i * 3600.0) for i in range(40)]
    msgs.append(tele(5000, now - 60, body, device="d0"))
    store_messages(store, msgs)
    retention.ensure_schema(store)
    store.db.execute(retention._UPSERT, retention.Hour("f1", "d9", T0 - 400 * 86400, messages=1).row())
    store.save_tracker([], [("f1", "d0", 1, 5, 6, T0)], [], [("f1", "d0", "p99", 1.0, 0.5, "slow", T0)], [])
    store.save_tracker([], [("f1", "d0", 1, 8, 9, T0)], [], [("f1", "d0", "drift", 1.0, 0.5, "drift", T0)], [])
    store.db.execute("UPDATE gaps SET closed = ? WHERE first_seq = 5", (T0 + 1,))
    store.db.execute("UPDATE alerts SET closed = ? WHERE kind = 'p99'", (T0 + 1,))

    dry = prune(store, 2 * HOUR_S, 72 * HOUR_S, now, keep_events_s=80 * HOUR_S, dry_run=True, batch_rows=7)
    assert raw_count(store) == 91 and raw_count(store, "event") == 40  # nothing written

    done = prune(store, 2 * HOUR_S, 72 * HOUR_S, now, keep_events_s=80 * HOUR_S, batch_rows=7)
    assert done.rolled_up == dry.rolled_up == 88  # d1's and d2's last seq stay raw
    assert done.events_deleted == dry.events_deleted == 20  # events at T0 + 0..19 h are older than 80 h
    assert done.hours_deleted == dry.hours_deleted == 1
    assert done.gaps_deleted == dry.gaps_deleted == 1 and done.alerts_deleted == dry.alerts_deleted == 1
    assert done.transactions >= 88 // 7 + 3 + 3  # steps of at most 7 rows
    assert raw_count(store) == 3 and raw_count(store, "event") == 20
    assert [a["kind"] for a in store.alerts()] == ["drift"]  # open: kept
    assert sum(h["messages"] for d in ("d0", "d1", "d2") for h in hourly(store, "f1", d)) == 88
    # raw and hours together: inferences add up to what was sent
    raw = store.db.execute("SELECT SUM(inferences) FROM messages WHERE kind = 'telemetry'").fetchone()[0]
    assert sum(h["inferences"] for d in ("d0", "d1", "d2") for h in hourly(store, "f1", d)) + raw == 91 * 20
    fleet = retention.fleet_hourly(store, "f1")
    assert sum(h["messages"] for h in fleet) == 88 and all(h["device"] == "*" for h in fleet)
    with pytest.raises(retention.RetentionError, match="keep rollups at least as long"):
        prune(store, 7 * 86400, 86400, now)


def test_hostile_sketches_count_but_stay_out_of_the_hours_sketch(store):
    good = window([0.004] * 30)
    bad = window([0.5] * 30)
    bad["latency_ms"]["sketch"]["buckets"] = {"not-a-number": 5}
    odd = window([0.5] * 30)
    odd["latency_ms"]["sketch"]["relative_accuracy"] = 0.02  # another accuracy does not merge with 0.01
    store_messages(store, [tele(1, T0 + 1, good), tele(2, T0 + 2, bad), tele(3, T0 + 3, odd),
                           tele(4, T0 + 9 * HOUR_S, good)])
    rollup(store, T0 + HOUR_S)
    (hour,) = hourly(store, "f1", "d1")
    assert hour["messages"] == 3 and hour["sketch_messages"] == 1 and hour["inferences"] == 90
    assert hour["p99_ms"] == pytest.approx(4.0, rel=0.011)  # the sketch covers the good window only...
    assert hour["max_ms"] == pytest.approx(500.0)  # ...while max and mean cover all three


def test_prune_beside_a_writer_loses_and_doubles_nothing(tmp_path):
    path = tmp_path / "fleet.db"
    writer = FleetStore(path)
    pruner = FleetStore(path)
    body = window([0.004] * 5)
    sent = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        nonlocal sent
        ing = Ingestor()
        try:
            for seq in range(1, 2001):
                # late and current rows mixed: half of them are older than the cutoff when they arrive
                ts = T0 + (seq % 7) * 900.0 + seq * 0.01
                ing.add(fp.topic("f1", "d1", "telemetry"), fp.encode(tele(seq, ts, body)), False, received=ts)
                if seq % 50 == 0:
                    rows, bad = ing.take()
                    sent += writer.insert_batch(rows, bad)
        except BaseException as exc:  # (reported by the test below)
            errors.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=write)
    t.start()
    runs = 0
    while not stop.is_set() or runs < 2:
        prune(pruner, keep_raw_s=0, keep_rollups_s=86400, now=T0 + 3 * HOUR_S, batch_rows=64)
        runs += 1
    t.join()
    assert not errors
    hours = hourly(pruner, "f1", "d1")
    assert sent == 2000
    assert sum(h["messages"] for h in hours) + raw_count(pruner) == 2000
    assert sum(h["inferences"] for h in hours) + pruner.db.execute(
        "SELECT COALESCE(SUM(inferences), 0) FROM messages").fetchone()[0] == 2000 * 5
    writer.close()
    pruner.close()


def test_two_prunes_at_once_fold_each_row_once(tmp_path):
    path = tmp_path / "fleet.db"
    with FleetStore(path) as s:
        store_messages(s, [tele(i + 1, T0 + i * 3.0, window([0.004] * 3), device=f"d{i % 4}") for i in range(1200)]
                       + [tele(5000, T0 + 9 * HOUR_S, window([0.004]))])
    results: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with FleetStore(path) as mine:
                results.append(rollup(mine, T0 + 5 * HOUR_S, batch_rows=50))
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with FleetStore(path) as s:
        hours = [h for d in ("d0", "d1", "d2", "d3") for h in hourly(s, "f1", d)]
        assert sum(r.rolled_up for r in results) == sum(h["messages"] for h in hours) == 1200 - 4 + 1
        assert sum(h["inferences"] for h in hours) == (1200 - 4 + 1) * 3


def test_store_size_plateaus_under_a_simulated_day(tmp_path):
    """Fast variant of benchmarks/fleet_retention.py: 20 devices, a message a minute, 24 h, prune hourly."""
    from benchmarks.fleet_retention import bound, simulate

    out = simulate(tmp_path / "fleet.db", devices=20, interval_s=60.0, hours=24, keep_raw_s=2 * HOUR_S,
                   templates=8)
    per_hour = out["per_hour"]
    assert all(r["raw_rows"] <= 20 * 60 * 3 for r in per_hour)  # never more than 3 h of raw rows
    assert per_hour[-1]["hour_rows"] == 20 * 22  # every hour older than 2 h is an hour row
    b = bound(per_hour, warmup_hours=4)
    # after the warm-up only the hour rows grow (~1.2 KB each: the merged sketch is ~750 bytes of JSON), until
    # --keep-rollups; the raw rows' pages are freed and reused every hour (a few 16 KB pages of slack)
    new_hours = per_hour[-1]["hour_rows"] - per_hour[3]["hour_rows"]
    assert b["max_bytes_after"] - b["bytes_at_warmup"] <= new_hours * 1600 + 4 * 16384, per_hour
    raw_part = [r["bytes"] - r["hour_rows"] * 1200 for r in per_hour[3:]]
    assert max(raw_part) - min(raw_part) < 0.1 * per_hour[3]["bytes"], per_hour
    assert max(r["free_pages"] for r in per_hour[3:]) < 2 * per_hour[3]["free_pages"] + 8
    assert out["rolled_up"] == 20 * 60 * 22


def test_prune_command(tmp_path):
    import typer

    from edgekit.cli.fleet_retention import prune_cmd

    app = typer.Typer()
    app.command("prune")(prune_cmd)
    app.command("other")(lambda: None)  # (a group, as under `edgekit fleet`)
    db = tmp_path / "fleet.db"
    with FleetStore(db) as s:
        store_messages(s, [tele(i + 1, T0 + i * 60.0, window([0.004] * 10)) for i in range(30)]
                       + [tele(100, T0 + 5 * HOUR_S, window([0.004]))])
    runner = CliRunner()
    now = str(T0 + 5 * HOUR_S)
    dry = runner.invoke(app, ["prune", "--db", str(db), "--keep-raw", "2h", "--dry-run", "--json", "--now", now])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["rolled_up"] == 30
    res = runner.invoke(app, ["prune", "--db", str(db), "--keep-raw", "2h", "--vacuum", "--json", "--now", now])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rolled_up"] == 30 and doc["vacuumed"] and doc["bytes_after"] <= doc["bytes_before"]
    bad = runner.invoke(app, ["prune", "--db", str(db), "--keep-raw", "a week"])
    assert bad.exit_code != 0 and "--keep-raw" in bad.output
    missing = runner.invoke(app, ["prune", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code != 0 and not (tmp_path / "none.db").exists()


def test_postgresql_engine(pg_url):
    """The same rollup, merge and prune on the PostgreSQL store (skipped without server binaries, except under CI)."""
    from edgekit.fleet.stores import open_store

    store = open_store(pg_url)
    try:
        assert retention.engine(store) == "postgresql"
        assert hourly(store, "f1", "d1") == []  # (no hour table before the first prune)
        body = window([0.004] * 10)
        store_messages(store, [tele(i + 1, T0 + i * 60.0, body) for i in range(20)]
                       + [tele(100, T0 + 5 * HOUR_S, body)])
        dry = prune(store, 2 * HOUR_S, 86400, T0 + 5 * HOUR_S, dry_run=True)
        assert prune(store, 2 * HOUR_S, 86400, T0 + 5 * HOUR_S, batch_rows=6).rolled_up == dry.rolled_up == 20
        assert prune(store, 2 * HOUR_S, 86400, T0 + 5 * HOUR_S).rolled_up == 0
        store_messages(store, [tele(21, T0 + 100.0, body, historical=True), tele(101, T0 + 5 * HOUR_S + 1, body)])
        assert prune(store, 2 * HOUR_S, 86400, T0 + 5 * HOUR_S).rolled_up == 1  # late: merged into its hour
        (hour,) = hourly(store, "f1", "d1")
        assert hour["messages"] == 21 and hour["inferences"] == 210 and hour["historical"] == 1
        assert math.isclose(hour["p50_ms"], 4.0, rel_tol=0.011)
        # a day later: seq 100 is folded into its hour too, then both hours are past a 2 h rollup retention
        assert prune(store, 2 * HOUR_S, 2 * HOUR_S, T0 + 30 * HOUR_S, vacuum=True).hours_deleted == 2
        assert hourly(store, "f1", "d1") == [] and store.message_count("telemetry") == 1
    finally:
        store.close()


def test_edgekit_fleet_prune_then_history_hourly(tmp_path):
    """Through `edgekit fleet`: prune rolls up old telemetry, `history --hourly` shows the hour it made and
    raw `history` keeps only what is inside the raw retention."""
    from edgekit.cli.app import app as root

    db = tmp_path / "fleet.db"
    with FleetStore(db) as s:
        store_messages(s, [tele(i + 1, T0 + i * 60.0, window([0.004] * 10)) for i in range(30)]
                       + [tele(100, T0 + 5 * HOUR_S, window([0.004]))])
    runner = CliRunner()
    res = runner.invoke(root, ["fleet", "prune", "--db", str(db), "--keep-raw", "2h", "--json",
                               "--now", str(T0 + 5 * HOUR_S)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rolled_up"] == 30
    hours = runner.invoke(root, ["fleet", "history", "d1", "--db", str(db), "--hourly", "--json"])
    assert hours.exit_code == 0, hours.output
    (hour,) = json.loads(hours.stdout)
    assert hour["messages"] == 30 and hour["inferences"] == 300 and math.isclose(hour["p50_ms"], 4.0, rel_tol=0.011)
    raw = runner.invoke(root, ["fleet", "history", "d1", "--db", str(db), "--json"])
    assert [r["seq"] for r in json.loads(raw.stdout)] == [100]
    table = runner.invoke(root, ["fleet", "history", "d1", "--db", str(db), "--hourly"])
    assert table.exit_code == 0 and "300" in table.output
    bad = runner.invoke(root, ["fleet", "history", "d1", "--db", str(db), "--hourly", "--limit", "3"])
    assert bad.exit_code != 0 and "--hourly" in bad.output
