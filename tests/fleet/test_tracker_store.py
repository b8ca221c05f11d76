"""Store, ingest and tracker without a broker: schema, de-dup, gaps, wills, thresholds, refusals, wire codec."""

from __future__ import annotations

import json
import sqlite3

import pytest

from edgekit.fleet import wire
from edgekit.fleet.ingest import Ingestor, telemetry_figures
from edgekit.fleet.store import SCHEMA_VERSION, FleetStore, StoreError
from edgekit.fleet.tracker import FleetTracker, SeqTracker, Thresholds
from edgekit_runtime.contract import fleet_protocol as fp


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def feed(store: FleetStore, tracker: FleetTracker, *messages, retained: bool = False) -> None:
    """Ingest envelopes as a worker would, then let the tracker read them back from the store."""
    ing = Ingestor(fleet="f1")
    for msg in messages:
        assert ing.add(fp.topic(msg["fleet"], msg["device"], msg["kind"]), fp.encode(msg), retained)
    rows, bad = ing.take()
    store.insert_batch(rows, bad)
    tracker.consume(store.tail(tracker.last_id))
    tracker.flush(store)


def env(kind, seq, body=None, boot=1, device="d1", historical=False):
    body = body if body is not None else ({"status": "online"} if kind == "state" else
                                          {"window_s": 1.0, "inferences": 1})
    return fp.envelope(kind, "f1", device, boot, seq, body, ts=1000.0 + seq, historical=historical)


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    store = FleetStore(tmp_path / "fleet.db")
    tracker = FleetTracker(Thresholds(gap_grace_s=5.0), clock=clock)
    yield store, tracker, clock
    store.close()


def test_schema_is_versioned_wal_and_indexed(tmp_path):
    with FleetStore(tmp_path / "a.db") as store:
        db = store.db
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[1]: r[2] for r in db.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE type='index'")}
        assert {"messages_key", "messages_device_time"} <= set(indexes)
        plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT * FROM messages WHERE fleet='f' AND "
                                                 "device='d' AND ts >= 5"))
        assert "messages_device_time" in plan
    db = sqlite3.connect(tmp_path / "a.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this edgekit"):
        FleetStore(tmp_path / "a.db")
    with pytest.raises(StoreError, match="no fleet store"):
        FleetStore(tmp_path / "missing.db", create=False)


def test_duplicates_by_device_boot_seq_are_stored_once(world):
    store, tracker, _ = world
    a = env("telemetry", 2)
    feed(store, tracker, env("state", 1), a, a, env("telemetry", 2, boot=2))
    assert store.message_count() == 3  # (d1, 1, 2) once; (d1, 2, 2) is another boot
    assert store.counters()["duplicates"] == 1
    feed(store, tracker, a)  # a later replay of the same message
    assert store.counters()["duplicates"] == 2 and store.message_count() == 3


def test_gap_reported_after_grace_and_closed_when_replayed(world):
    store, tracker, clock = world
    feed(store, tracker, env("state", 1), env("telemetry", 2), env("telemetry", 5))
    assert store.gaps("f1", "d1") == []  # within the grace period: maybe only reordering
    clock.t += 6
    tracker.flush(store)
    assert [(g["first_seq"], g["last_seq"], g["closed"]) for g in store.gaps("f1", "d1")] == [(3, 4, None)]
    feed(store, tracker, env("telemetry", 4, historical=True))
    assert store.gaps("f1", "d1")[0]["closed"] is None  # 3 still missing
    feed(store, tracker, env("telemetry", 3, historical=True))
    assert store.gaps("f1", "d1")[0]["closed"] == clock.t
    assert store.devices()[0]["missing"] == 0


def test_reordering_within_the_grace_period_is_not_a_gap(world):
    store, tracker, clock = world
    feed(store, tracker, env("telemetry", 1), env("telemetry", 4))
    feed(store, tracker, env("telemetry", 3), env("telemetry", 2))
    clock.t += 10
    tracker.flush(store)
    assert store.gaps("f1", "d1") == []


def test_seq_tracker_splits_and_fills_ranges():
    t = SeqTracker(1, 0.0)
    for s in (10, 5, 2, 9, 3):
        t.add(s, 0.0)
    assert [(r.first, r.last) for r in t.missing] == [(4, 4), (6, 8)]
    assert t.missing_count == 4
    t.add(0, 0.0)  # below the lowest seen (a replay that started earlier): no gap, just a lower start
    assert t.low == 0 and t.missing_count == 4


def test_status_rules_stale_will_and_new_boot(world):
    store, tracker, _ = world
    feed(store, tracker, env("state", 1, boot=7))
    dev = tracker.devices[("f1", "d1")]
    assert (dev.status, dev.boot) == ("online", 7)
    feed(store, tracker, env("state", 0, {"status": "offline"}, boot=6))  # stale: an older boot's will
    assert dev.status == "online" and dev.stale_wills == 1 and tracker.stale_wills == 1
    feed(store, tracker, env("state", 0, {"status": "offline"}, boot=7))  # this boot's will
    assert (dev.status, dev.offline_reason) == ("offline", "last will")
    feed(store, tracker, env("telemetry", 9, boot=7))  # same boot, while offline: stored, not "online"
    assert dev.status == "offline"
    feed(store, tracker, env("telemetry", 1, boot=8))  # a newer boot: it is back
    assert (dev.status, dev.boot) == ("online", 8)
    feed(store, tracker, env("state", 2, {"status": "offline", "reason": "stopped"}, boot=8))
    assert (dev.status, dev.offline_reason) == ("offline", "stopped")
    kinds = [(a["kind"], a["closed"] is None) for a in store.alerts("f1", "d1")]
    assert kinds == [("offline", False), ("offline", True)]


def test_wills_are_kept_per_connection_and_an_earlier_connections_will_is_stale(world, tmp_path):
    """Agents name the MQTT connection of each `state` (body.connection): every connection's will is stored (under
    seq -connection; the boot's wills all have seq 0 on the wire), so a second death in one boot shows, and a will
    of an earlier connection arriving after a later connection's "online" (a broker the device left published it
    late) is stale, counted, never applied. The figure survives a monitor restart."""
    store, tracker, clock = world
    will = lambda c: env("state", 0, {"status": "offline", "connection": c})  # noqa: E731
    online = lambda seq, c: env("state", seq, {"status": "online", "connection": c})  # noqa: E731
    feed(store, tracker, online(1, 1))
    dev = tracker.devices[("f1", "d1")]
    feed(store, tracker, will(1))
    assert (dev.status, dev.offline_reason) == ("offline", "last will")
    feed(store, tracker, online(5, 2), will(1))  # back on connection 2; connection 1's will re-delivered (QoS 1)
    assert dev.status == "online" and dev.stale_wills == 0
    feed(store, tracker, will(2))  # the second death in this boot
    assert (dev.status, dev.offline_reason) == ("offline", "last will")
    feed(store, tracker, online(9, 4), will(3))  # connection 3's will, published late by another broker
    assert dev.status == "online" and dev.stale_wills == 1
    assert [(r["seq"], r["body"]["connection"]) for r in store.history("f1", "d1", kinds=["state"])
            if r["body"]["status"] == "offline"] == [(-1, 1), (-2, 2), (-3, 3)]
    assert store.counters().get("duplicates") == 1  # connection 1's will, delivered twice
    assert [a["closed"] is not None for a in store.alerts("f1", "d1")] == [True, True]
    feed(store, tracker, online(12, 6))
    restarted = FleetTracker(Thresholds(), clock=clock)  # the monitor restarts: the connection is in the store
    restarted.restore(store)
    assert restarted.devices[("f1", "d1")].connection == 6
    feed(store, restarted, will(5))
    assert restarted.devices[("f1", "d1")].status == "online" and restarted.devices[("f1", "d1")].stale_wills == 2
    # an agent that does not name its connection: seq 0 as before, arrival order decides
    feed(store, tracker, env("state", 0, {"status": "offline"}, device="old"))
    assert [r["seq"] for r in store.history("f1", "old")] == [0]
    assert tracker.devices[("f1", "old")].status == "offline"


def test_historical_messages_do_not_move_live_figures(world):
    store, tracker, _ = world
    body = lambda p99: {"window_s": 1.0, "inferences": 5, "latency_ms": {"p50": 1.0, "p99": p99}}  # noqa: E731
    feed(store, tracker, env("telemetry", 10, body(7.0)))
    feed(store, tracker, env("telemetry", 4, body(500.0), historical=True))
    dev = tracker.devices[("f1", "d1")]
    assert dev.figures["p99_ms"] == 7.0 and dev.alerts == {} and dev.historical == 1


def test_thresholds_open_and_close_alerts(world):
    store, tracker, _ = world
    tracker.thresholds = Thresholds(p99_ms=10.0, drift_psi=0.2, error_rate=0.1, min_calls=10)

    def tel(seq, p99=5.0, psi=0.1, errors=0, calls=20):
        return env("telemetry", seq, {"window_s": 1.0, "inferences": calls - errors, "calls": calls,
                                      "errors": errors, "latency_ms": {"p50": 1.0, "p99": p99},
                                      "drift": {"inputs": {"a": {"psi": psi}, "b": {"psi": psi / 2}}}})

    feed(store, tracker, tel(1, p99=12.0, psi=0.25, errors=3))
    assert sorted(tracker.devices[("f1", "d1")].alerts) == ["drift", "error_rate", "p99"]
    feed(store, tracker, tel(2, p99=11.0, psi=0.3, errors=3))  # still over: no new rows
    assert len(store.alerts()) == 3
    feed(store, tracker, tel(3))
    assert tracker.devices[("f1", "d1")].alerts == {}
    assert all(a["closed"] is not None for a in store.alerts())


def test_restart_continues_from_the_store(tmp_path):
    clock = Clock()
    with FleetStore(tmp_path / "f.db") as store:
        t1 = FleetTracker(Thresholds(gap_grace_s=0), clock=clock)
        feed(store, t1, env("state", 1), env("telemetry", 2, {"window_s": 1, "inferences": 1,
                                                               "drift": {"psi": 0.9}}))
        t2 = FleetTracker(Thresholds(gap_grace_s=0), clock=clock)
        t2.restore(store)
        dev = t2.devices[("f1", "d1")]
        assert dev.status == "online" and dev.seq == 2 and "drift" in dev.alerts
        feed(store, t2, env("telemetry", 5))  # 3, 4 were sent while the monitor was down
        assert [(g["first_seq"], g["last_seq"]) for g in store.gaps("f1", "d1")] == [(3, 4)]
        assert len(store.alerts()) == 1  # the open drift alert was not opened twice


def test_ingestor_refuses_with_a_reason_and_keeps_going():
    ing = Ingestor(fleet="f1")
    good = fp.encode(env("telemetry", 1))
    cases = [
        ("edgekit/v1/f1/d1/telemetry", b"{not json", "not_json"),
        ("edgekit/v1/f1/d1/telemetry", b"\xff\xff", "not_json"),
        ("edgekit/v1/f1/d1/telemetry", b'"a string"', "bad_envelope"),
        ("edgekit/v1/f1/d1/telemetry", json.dumps({**env("telemetry", 1), "schema": 2}).encode(), "newer_schema"),
        ("edgekit/v1/f1/d1/telemetry", json.dumps({**env("telemetry", 1), "seq": -1}).encode(), "out_of_range"),
        ("edgekit/v1/f1/d2/telemetry", good, "topic_mismatch"),
        ("edgekit/v1/f1/d1/event", good, "topic_mismatch"),
        ("edgekit/v1/f2/d1/telemetry", good, "bad_topic"),  # another fleet than the one watched
        ("edgekit/v1/f1/d1/cmd", good, "not_from_device"),
        ("edgekit/v1/f1/-x/telemetry", good, "bad_topic"),
    ]
    for topic, payload, _ in cases:
        assert ing.add(topic, payload) is False
    assert ing.add("edgekit/v1/f1/d1/telemetry", good) is True
    rows, bad = ing.take()
    assert len(rows) == 1
    expected: dict[str, int] = {}
    for *_, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v[0] for k, v in bad.items()} == expected


def test_telemetry_figures_read_the_agents_own_body(tmp_path):
    from edgekit.fleet.simulate import synthetic_manifest
    from edgekit_runtime.agent import AgentConfig, AgentCore
    import numpy as np

    cfg = AgentConfig.from_dict({"device_id": "d1", "fleet": "f1", "broker_url": "mqtt://127.0.0.1",
                                 "state_dir": str(tmp_path / "s"), "spool_sync": "normal", "drift_min_values": 256})
    core = AgentCore(cfg, system_stats=True, lock=False, model_manifest=synthetic_manifest())
    try:
        rng = np.random.default_rng(0)
        for _ in range(40):
            core.record_inference(0.004, {"x": (rng.standard_normal((1, 256)) + 2.0).astype(np.float32)})
        core.record_inference(0.001, error_code=201)
        body = core.tick()["body"]
    finally:
        core.close()
    p50, p99, inferences, calls, errors, temp, cpu, psi = telemetry_figures(body)
    assert p50 == pytest.approx(4.0, rel=0.02) and p99 == pytest.approx(4.0, rel=0.02)
    assert (inferences, calls, errors) == (40, 41, 1)
    assert psi is not None and psi > 1.0  # inputs shifted by 2 sigma
    assert cpu is None or 0 <= cpu <= 100


def test_wire_reader_splits_packets_across_chunks():
    packets = [wire.publish_packet("edgekit/v1/f/d/telemetry", b"x" * n, 1, pid=n + 1) for n in (0, 5, 200, 20000)]
    stream = b"".join(packets) + wire.PINGREQ_PACKET
    reader = wire.PacketReader()
    out = []
    for i in range(0, len(stream), 7):
        out.extend(reader.feed(stream[i:i + 7]))
    assert [p[0] for p in out] == [wire.PUBLISH] * 4 + [wire.PINGREQ]
    parsed = [wire.parse_publish(flags, body) for _, flags, body in out[:4]]
    assert [(t, pid, len(payload), r) for t, pid, payload, r in parsed] == [
        ("edgekit/v1/f/d/telemetry", n + 1, n, False) for n in (0, 5, 200, 20000)]
    assert reader.buf == b""
    assert wire.reason_text(0x86) == "bad user name or password (0x86)"
