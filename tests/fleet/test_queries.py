"""Fleet history as data (:mod:`edgekit.fleet.queries`): times people type, and a missing store."""

from __future__ import annotations

import datetime as dt

import pytest

from edgekit.errors import ConfigError
from edgekit.fleet.queries import device_detail, list_devices, parse_time
from edgekit.fleet.store import FleetStore, StoreError


def test_parse_time_reads_durations_iso_times_and_unix_seconds():
    now = 1_800_000_000.0
    assert parse_time(None, now) is None
    assert parse_time("30s", now) == now - 30 and parse_time("10m", now) == now - 600
    assert parse_time("10min", now) == now - 600 and parse_time(" 2h ", now) == now - 7200
    assert parse_time("1.5d", now) == now - 1.5 * 86400
    assert parse_time("1799990000", now) == 1_799_990_000.0
    utc = dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.timezone.utc)
    assert parse_time("2026-11-24T10:00+00:00", now) == utc.timestamp()
    with pytest.raises(ConfigError, match="--until 'yesterday'"):
        parse_time("yesterday", now, option="--until")


def test_queries_on_an_empty_and_a_missing_store(tmp_path):
    db = tmp_path / "f.db"
    with pytest.raises(StoreError, match="no fleet store"):
        list_devices(db)
    FleetStore(db).close()
    assert list_devices(db) == []
    with pytest.raises(StoreError, match="not in"):
        device_detail(db, "cam-1")
