"""`fleet simulate`: the agent's own code on synthetic inferences, seen by a real monitor; the dashboard."""

from __future__ import annotations

import pytest
from rich.console import Console

from edgekit.fleet.dashboard import render
from edgekit.fleet.simulate import SimulatedFleet, SimulationPlan
from edgekit.fleet.tracker import Thresholds

pytestmark = pytest.mark.timeout(60)


def test_simulated_devices_report_like_agents(fleet, tmp_path):
    run = fleet.start_monitor(fleet="sim", thresholds=Thresholds(drift_psi=0.2, p99_ms=1000, error_rate=0.5))
    plan = SimulationPlan(fleet="sim", devices=3, rate=4.0, duration_s=2.5, inferences_per_s=40, latency_ms=8.0,
                          error_rate=0.05, drift_after_s=0.5, drift_share=0.5, state_dir=tmp_path / "devices")
    # seed 0: devices 0 and 2 drift, device 1 does not (see SimulatedDevice)
    summary = SimulatedFleet(fleet.settings, plan).run()
    assert summary["devices"] == 3 and summary["boots"] == [1] and summary["messages"] >= 3 * 8
    for name in ("sim0000", "sim0001", "sim0002"):
        dev = fleet.wait_device(name, lambda d: d["status"] == "offline", fleet="sim", what=f"{name} stopped")
        assert dev["offline_reason"] == "stopped" and dev["missing"] == 0 and dev["model"] == "simulated 1.0"
        assert 4.0 < dev["figures"]["p99_ms"] < 40.0  # the agent's sketch of ~8 ms lognormal latencies
    fleet.wait(lambda: fleet.query(lambda s: s.message_count()) >= summary["messages"], what="every message stored")
    stored = fleet.query(lambda s: s.message_count())
    assert stored == summary["messages"]  # every device's seq 1..N: nothing lost, nothing twice
    drifted = sorted({a["device"] for a in fleet.query(lambda s: s.alerts("sim")) if a["kind"] == "drift"})
    assert drifted == ["sim0000", "sim0002"]
    events = fleet.query(lambda s: s.history("sim", "sim0000", kinds=["event"]))
    assert {"drift_alarm", "error"} <= {e["body"]["type"] for e in events}
    console = Console(record=True, width=220)
    console.print(render(run.monitor))
    screen = console.export_text()
    assert "sim0000" in screen and "offline" in screen and "drift" in screen
    run.stop()
    # the same devices again: their persisted boot counters go up
    again = SimulatedFleet(fleet.settings, SimulationPlan(fleet="sim", devices=3, rate=4.0, duration_s=0.6,
                                                          state_dir=tmp_path / "devices")).run()
    assert again["boots"] == [2]
