"""benchmarks/telemetry_ingest.py end to end on a small fleet: SQLite and PostgreSQL side by side, every
acknowledged message stored, and a run that lost one makes the script fail."""

from __future__ import annotations

import json

import pytest

from benchmarks import telemetry_ingest as bench

pytestmark = pytest.mark.timeout(180)


def test_a_small_live_run_on_both_stores_loses_nothing_and_reports_both(mqtt_broker, pg_server, tmp_path):
    # (mqtt_broker, pg_server: Mosquitto and PostgreSQL are here, or the test skips, or fails under CI)
    out = tmp_path / "ingest"
    assert bench.main(["--devices", "40", "--messages", "20", "--pg", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    runs = {r["store"]: r for r in report["runs"]}
    assert set(runs) == {"sqlite", "postgresql"}
    for r in runs.values():
        assert (r["mode"], r["devices"], r["published"], r["acked"], r["stored"], r["lost"]) == \
            ("live", 40, 840, 840, 840, 0)
        assert r["duplicates_dropped"] == 0 and r["monitor_summary"]["missing"] == 0
    assert bench.PG_ROLE in runs["postgresql"]["cpu_us_per_stored_message"]
    assert bench.PG_ROLE not in runs["sqlite"]["cpu_us_per_stored_message"]
    md = out.with_suffix(".md").read_text()
    assert "| sqlite | live | 1 | 40 |" in md and "| postgresql | live | 1 | 40 |" in md
    assert "runs on the same cores" in md.replace("**", "")


def test_a_lost_message_or_a_live_duplicate_fails_the_run():
    ok = {"store": "sqlite", "mode": "live", "target_rate": None, "lost": 0, "duplicates_dropped": 0}
    assert bench.failures([ok, {**ok, "mode": "catch-up", "duplicates_dropped": 40}]) == []
    assert bench.failures([{**ok, "lost": 1}]) == ["sqlite live: 1 acknowledged message(s) not stored"]
    assert bench.failures([{**ok, "store": "postgresql", "duplicates_dropped": 2}]) == \
        ["postgresql live: 2 duplicate(s) in a live run"]
