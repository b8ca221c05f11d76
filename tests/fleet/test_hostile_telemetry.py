"""Hostile telemetry: whatever one device topic carries, the monitor counts it, acknowledges it, and keeps
recording the others; rows an older edgekit stored out of range never break `fleet history`/`fleet plot`."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.fleet.ingest import JSON_BACKEND
from edgekit.fleet.queries import device_history, plot_device_history
from edgekit.fleet.store import MESSAGE_COLUMNS, FleetStore
from edgekit_runtime.contract import fleet_protocol as fp

pytestmark = pytest.mark.timeout(90)
TOPIC = "edgekit/v1/f1/evil/telemetry"


def _env(seq: int = 1, **over) -> dict:
    msg = {"schema": 1, "kind": "telemetry", "fleet": "f1", "device": "evil", "boot": 1, "seq": seq,
           "ts": time.time(), "historical": False, "body": {"window_s": 1.0, "inferences": 5}}
    body = over.pop("body", {})
    msg.update(over)
    msg["body"] = {**msg["body"], **body} if isinstance(body, dict) else body
    return msg


def _nested(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


def hostile_cases() -> list[tuple[str, bytes, str]]:
    """(what, payload on TOPIC, malformed reason expected)."""
    nan_reason = "not_json" if JSON_BACKEND == "orjson" else "out_of_range"  # (orjson refuses NaN itself)
    cases = [
        ("seq 2^63", _env(seq=2**63), "out_of_range"),
        ("seq 2^64", _env(seq=2**64), "out_of_range" if JSON_BACKEND != "orjson" else "bad_envelope"),
        ("boot 2^63", _env(boot=2**63), "out_of_range"),
        ("inferences 2^63", _env(body={"inferences": 2**63}), "out_of_range"),
        ("calls 2^63 - 1", _env(body={"calls": 2**63 - 1}), "out_of_range"),
        ("errors summing 2^63", _env(body={"errors": {"201": 2**62, "202": 2**62}}), "out_of_range"),
        ("errors 2^63", _env(body={"errors": 2**63}), "out_of_range"),
        ("negative seq", _env(seq=-1), "out_of_range"),
        ("negative inferences", _env(body={"inferences": -3}), "out_of_range"),
        ("negative errors", _env(body={"errors": -1}), "out_of_range"),
        ("negative p99", _env(body={"latency_ms": {"p99": -4.0}}), "out_of_range"),
        ("p99 of a million hours", _env(body={"latency_ms": {"p99": 3.6e12}}), "out_of_range"),
        ("NaN p99", json.dumps(_env(body={"latency_ms": {"p50": 1.0, "p99": float("nan")}})), nan_reason),
        ("inf p50", json.dumps(_env(body={"latency_ms": {"p50": float("inf")}})), nan_reason),
        ("window 1e308 s", _env(body={"window_s": 1e308}), "out_of_range"),
        ("temperature 1e308", _env(body={"system": {"temperature_c": {"cpu": 1e308}}}), "out_of_range"),
        ("ts 1e308", _env(ts=1e308), "out_of_range"),
        ("ts -1e308", _env(ts=-1e308), "out_of_range"),
        ("a 10,000-character string", _env(body={"note": "x" * 10_000}), "too_large"),
        ("a 300 KB payload", _env(body={"pad": ["y" * 1000] * 300}), "too_large"),
        ("nested 100 deep", _env(body={"deep": _nested(100)}), "too_large"),
        ("nested 5,000 deep", json.dumps(_env(body={"deep": 0})).replace('"deep": 0', '"deep": ' + "[" * 5000
                                                                           + "]" * 5000),
         "not_json" if JSON_BACKEND == "orjson" else "bad_envelope"),
        ("a 10,000-item list", _env(body={"many": list(range(10_000))}), "too_large"),
        ("a 10,000-key object", _env(body={"errors_by_code": {str(i): 1 for i in range(10_000)}}), "too_large"),
        ("seq as a string", _env(seq="5"), "bad_envelope"),
        ("ts as a string", _env(ts="now"), "bad_envelope"),
        ("inferences as a string", _env(body={"inferences": "many"}), "bad_envelope"),
        ("latency as a string", _env(body={"latency_ms": "fast"}), "bad_envelope"),
        ("body as a list", _env(body=[1, 2]), "bad_envelope"),
    ]
    out = []
    for what, msg, reason in cases:
        text = msg if isinstance(msg, str) else json.dumps(msg)
        out.append((what, text.encode(), reason))
    return out


def _good(fleet, seq: int, fleet_tools) -> None:
    fleet.publish("telemetry", "good", seq, fleet_tools.telemetry_body(p99=4.0 + seq % 3))


def _malformed_total(fleet) -> int:
    return sum(v["count"] for v in fleet.query(lambda s: s.malformed()).values())


def test_every_hostile_case_is_counted_acknowledged_and_the_good_device_keeps_being_recorded(fleet, fleet_tools):
    cases = hostile_cases()
    expected: dict[str, int] = {}
    for _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    # a persistent session: what the broker does not get a PUBACK for, it delivers again at the next start
    opts = {"client_id": "mon-hostile", "session_expiry": 300}
    run = fleet.start_monitor(**opts)
    seq = 0
    for _, payload, _ in cases:
        seq += 1
        _good(fleet, seq, fleet_tools)
        fleet.raw(TOPIC, payload)
    seq += 1
    _good(fleet, seq, fleet_tools)
    fleet.wait_device("good", lambda d: d["seq"] == seq and d["messages"] == seq, timeout=15,
                      what=f"good's {seq} windows")
    fleet.wait(lambda: _malformed_total(fleet) == len(cases), timeout=10, what=f"{len(cases)} refusals")
    counts = {k: v["count"] for k, v in fleet.query(lambda s: s.malformed()).items()}
    assert counts == expected
    run.check()  # still running
    with fleet.store() as s:
        assert s.message_counts("f1", "evil") == {}
        assert s.message_counts("f1", "good") == {"telemetry": seq}
        assert all(isinstance(r["ts"], float) for r in s.history("f1", "good"))
    assert run.monitor.ingest_stats[1].refused == len(cases)

    # away: the broker queues the fleet's messages for the session, hostile ones included
    run.stop()
    for what, payload, _ in cases[:6]:
        seq += 1
        _good(fleet, seq, fleet_tools)
        fleet.raw(TOPIC, payload)
    # back: the queue is delivered, refused, acknowledged; the good device is caught up
    run = fleet.start_monitor(**opts)
    fleet.wait_device("good", lambda d: d["seq"] == seq, timeout=15, what="good caught up after the restart")
    fleet.wait(lambda: _malformed_total(fleet) == len(cases) + 6, timeout=10, what="the queued refusals")
    run.stop()
    # and once more: nothing is delivered again (they were acknowledged), no crash loop
    seq += 1
    _good(fleet, seq, fleet_tools)
    run = fleet.start_monitor(**opts)
    fleet.wait_device("good", lambda d: d["seq"] == seq, timeout=15, what="good after the second restart")
    time.sleep(0.5)  # (time for a re-delivery to show, if there were one)
    run.check()
    assert _malformed_total(fleet) == len(cases) + 6
    assert fleet.query(lambda s: s.message_counts("f1", "good")) == {"telemetry": seq}


def test_a_device_clock_far_off_is_stored_at_the_receive_time_and_counted(fleet, fleet_tools):
    fleet.start_monitor()
    now = time.time()
    body = fleet_tools.telemetry_body
    fleet.publish("telemetry", "skewed", 1, body(), ts=now + 3 * 86400)  # a clock 3 days ahead
    fleet.publish("telemetry", "skewed", 2, body(), ts=100.0)  # a board without RTC, booted in 1970
    fleet.publish("telemetry", "skewed", 3, body(), ts=now - 3 * 86400, historical=True)  # replayed: the past
    fleet.publish("telemetry", "skewed", 4, body(), ts=now - 30)  # within the window: kept as sent
    fleet.wait_device("skewed", lambda d: d["messages"] == 4)
    fleet.wait(lambda: fleet.query(lambda s: s.counters()).get("clock_skew") == 2, what="2 skewed clocks")
    rows = {r["seq"]: r for r in fleet.query(lambda s: s.history("f1", "skewed"))}
    for seq in (1, 2):
        assert abs(rows[seq]["ts"] - rows[seq]["received"]) < 1e-6
    assert rows[1]["device_ts"] == pytest.approx(now + 3 * 86400) and rows[2]["device_ts"] == 100.0
    assert rows[3]["ts"] == pytest.approx(now - 3 * 86400) and "device_ts" not in rows[3]
    assert rows[4]["ts"] == pytest.approx(now - 30) and "device_ts" not in rows[4]
    assert fleet.query(lambda s: s.malformed()) == {}


def _row(seq: int, ts: float, p99: float = 5.0, **over) -> tuple:
    rec = {"fleet": "f1", "device": "old", "kind": "telemetry", "boot": 1, "seq": seq, "ts": ts,
           "received": time.time(), "historical": 0, "retained": 0, "p50_ms": 2.0, "p99_ms": p99,
           "inferences": 5, "calls": 5, "errors": 0, "temp_c": None, "cpu_percent": None, "drift_psi": 0.05,
           "payload": json.dumps({"ts": ts, "body": {"window_s": 1.0, "inferences": 5}})}
    rec.update(over)
    return tuple(rec[c] for c in MESSAGE_COLUMNS)


def test_rows_an_older_version_stored_out_of_range_do_not_break_history_or_plot(tmp_path):
    db = tmp_path / "fleet.db"
    FleetStore(db).close()
    now = time.time()
    con = sqlite3.connect(db)  # as an older edgekit wrote them: nothing was checked
    con.executemany(f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(MESSAGE_COLUMNS))})",
                    [_row(1, now - 20), _row(2, 1e308), _row(3, -1e308), _row(4, now - 10, p99=float("inf")),
                     _row(5, now - 5, payload="[" * 3000 + "]" * 3000), _row(6, now)])
    con.execute("INSERT INTO devices VALUES ('f1', 'old', 'online', 1, 6, NULL, ?, 1e308, '{}')", (now - 20,))
    con.commit()
    con.close()
    rows = device_history(db, "old")
    assert [r["seq"] for r in rows] == [1, 4, 5, 6]
    assert rows[1]["p99_ms"] is None and rows[2]["body"] is None
    out = plot_device_history(db, "old", tmp_path / "old.png")
    assert out["windows"] == 4 and out["left_out"] == 2 and (tmp_path / "old.png").stat().st_size > 1000
    runner = CliRunner()
    for args in (["fleet", "history", "old", "--db", str(db)], ["fleet", "history", "old", "--db", str(db), "--json"],
                 ["fleet", "ls", "--db", str(db)], ["fleet", "show", "old", "--db", str(db)],
                 ["fleet", "plot", "old", "--db", str(db), "--out", str(tmp_path / "cli.png")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert "left out" in result.output or (tmp_path / "cli.png").exists()


def test_a_row_sqlite_refuses_does_not_lose_the_rest_of_its_batch(tmp_path):
    with FleetStore(tmp_path / "fleet.db") as store:
        now = time.time()
        rows = [_row(1, now), _row(2**63, now), _row(3, now), _row(4, now, inferences=2**64), _row(1, now)]
        assert store.insert_batch(rows, counters={"clock_skew": 1}) == 2
        assert store.last_refused == 2
        assert store.message_count() == 2
        assert store.counters() == {"clock_skew": 1, "duplicates": 1}
        refused = store.malformed()["store_refused"]
        assert refused["count"] == 2 and "OverflowError" in refused["last_error"]
        assert refused["last_topic"] == "edgekit/v1/f1/old/telemetry"
        assert store.insert_batch([_row(5, now)]) == 1 and store.last_refused == 0


def test_the_agents_own_telemetry_passes_the_limits(tmp_path):
    from edgekit.fleet.ingest import Ingestor
    from edgekit.fleet.simulate import synthetic_manifest
    from edgekit_runtime.agent import AgentConfig, AgentCore
    import numpy as np

    cfg = AgentConfig.from_dict({"device_id": "d1", "fleet": "f1", "broker_url": "mqtt://127.0.0.1",
                                 "state_dir": str(tmp_path / "s"), "spool_sync": "normal", "drift_min_values": 256})
    core = AgentCore(cfg, system_stats=True, lock=False, model_manifest=synthetic_manifest())
    try:
        rng = np.random.default_rng(0)
        for i in range(300):
            core.record_inference(10 ** rng.uniform(-1, 3) / 1000, {"x": rng.standard_normal((1, 256)).astype(np.float32)})
        core.record_inference(0.001, error_code=201)
        msg = core.tick()
    finally:
        core.close()
    payload = fp.encode(msg)
    fp.check_limits(msg)
    fp.check_telemetry(msg["body"])
    ing = Ingestor(fleet="f1")
    assert ing.add(fp.topic("f1", "d1", "telemetry"), payload), ing.malformed
