"""The tracker's inline path for in-order live telemetry leaves every device exactly as the general path does.

Two trackers read the same rows (tail layout): one through `consume` (inline path where it applies), one row by
row through the general `_one`; devices, gaps, alerts, alert-listener calls and pending store writes must match.
"""

from __future__ import annotations

import dataclasses
import json
import random

from edgekit.fleet.tracker import FleetTracker, Thresholds


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _rows(seed: int) -> list[tuple]:
    """Rows as `store.tail` returns them: state, in-order and reordered telemetry, gaps, replays, reboots,
    figures crossing every threshold and windows without figures."""
    rng = random.Random(seed)
    rows: list[tuple] = []
    seqs = {f"d{i}": 0 for i in range(6)}
    boots = dict.fromkeys(seqs, 1)
    rid = 0

    def add(device: str, kind: str, seq: int, historical: int = 0, retained: int = 0, figures=(None,) * 8,
            payload=None) -> None:
        nonlocal rid
        rid += 1
        rows.append((rid, "f1", device, kind, boots[device], seq, 1000.0 + rid, 1000.0 + rid, historical, retained,
                     *figures, payload))

    for device in seqs:
        seqs[device] = 1
        add(device, "state", 1, retained=rng.random() < 0.3,
            payload=json.dumps({"body": {"status": "online", "model": {"name": "m", "version": "1"}}}))
    held: list[tuple] = []
    for _ in range(1500):
        device = rng.choice(list(seqs))
        r = rng.random()
        if r < 0.02:  # a reboot: a new boot's online state
            boots[device] += 1
            seqs[device] = 1
            add(device, "state", 1, payload=json.dumps({"body": {"status": "online"}}))
            continue
        if r < 0.04:
            add(device, "state", 0, payload=json.dumps({"body": {"status": "offline"}}))
            continue
        if r < 0.06:
            seqs[device] += 1
            add(device, "event", seqs[device], payload=json.dumps({"body": {"type": "note"}}))
            continue
        seqs[device] += 1
        seq = seqs[device]
        p99 = rng.choice([None, 5.0, 150.0, 99.0])
        figures = (rng.choice([None, 3.0]), p99, rng.choice([None, 50]), rng.choice([None, 0, 10, 50]),
                   rng.choice([None, 0, 5, 30]), rng.choice([None, 50.0]), rng.choice([None, 20.0]),
                   rng.choice([None, 0.05, 0.5]))
        if r < 0.12:  # held back: delivered later (reordering between workers, or a replay)
            held.append((device, seq, figures))
            continue
        add(device, "telemetry", seq, historical=int(r < 0.15), figures=figures)
        if held and rng.random() < 0.2:
            d, s, f = held.pop(rng.randrange(len(held)))
            add(d, "telemetry", s, historical=int(rng.random() < 0.5), figures=f)
    return rows


def _snapshot(tracker: FleetTracker) -> dict:
    devices = {}
    for key, dev in tracker.devices.items():
        d = dataclasses.asdict(dev)
        d["seqs"] = {b: (t.low, t.high, [(r.first, r.last, r.opened) for r in t.missing])
                     for b, t in dev.seqs.items()}
        devices[key] = d
    return {"devices": devices, "messages": tracker.messages, "last_id": tracker.last_id,
            "alerts_new": tracker._alerts_new, "alerts_closed": tracker._alerts_closed, "dirty": tracker._dirty,
            "gaps_closed": tracker._gaps_closed, "stale": tracker._stale_new}


def test_inline_and_general_paths_leave_the_same_fleet():
    for seed in range(4):
        rows = _rows(seed)
        clock = Clock()
        th = Thresholds(p99_ms=100.0, error_rate=0.2, min_calls=5, drift_psi=0.2, gap_grace_s=0.0)
        fast, slow = FleetTracker(th, clock=clock), FleetTracker(th, clock=clock)
        heard_fast: list[dict] = []
        heard_slow: list[dict] = []
        fast.listeners.append(heard_fast.append)
        general = []
        fast._one = lambda row, now, one=fast._one: (general.append(row), one(row, now))  # type: ignore[method-assign]
        missing = 0
        slow.listeners.append(heard_slow.append)
        for i in range(0, len(rows), 97):
            clock.t += 1.0
            fast.consume(rows[i:i + 97])
            for row in rows[i:i + 97]:
                slow._one(row, clock.t)
            slow.last_id = rows[min(i + 97, len(rows)) - 1][0]
            missing = max(missing, sum(d.missing for d in fast.devices.values()))
        assert _snapshot(fast) == _snapshot(slow)
        assert heard_fast == heard_slow
        assert any(e["event"] == "opened" for e in heard_fast) and any(e["event"] == "closed" for e in heard_fast)
        assert missing > 0  # (gaps were exercised)
        assert len(rows) * 0.1 < len(general) < len(rows) * 0.5  # (both paths were exercised)
