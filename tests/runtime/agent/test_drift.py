"""PSI and KS against the reference histogram the compiler records in the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.build.stages.package import input_statistics
from edgekit_runtime.agent import DriftMonitor, ks_statistic, psi
from edgekit_runtime.agent.drift import Reference


def _stats(seed=0):
    calib = np.random.default_rng(seed).normal(0.0, 1.0, size=(500, 1, 8, 8)).astype(np.float32)
    return {"x": input_statistics(calib)}


def test_psi_and_ks_basics():
    a = np.array([10, 20, 30, 40])
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12) and ks_statistic(a, a * 3) == 0.0
    # the textbook PSI of two shares, with an empty bin kept finite by the smoothing
    assert 0 < psi(a, np.array([40, 30, 20, 10])) < 10
    assert np.isfinite(psi(a, np.array([0, 0, 0, 100])))
    assert ks_statistic(np.array([1, 0]), np.array([0, 1])) == 1.0


def test_values_outside_the_reference_range_go_to_the_edge_bins():
    ref = Reference.from_stats("x", {"histogram": {"edges": [0.0, 1.0, 2.0, 3.0], "counts": [1, 1, 1]}})
    assert ref.uniform
    assert ref.bin_counts(np.array([-5.0, 0.0, 0.99, 1.0, 2.5, 3.0, 99.0])).tolist() == [3, 1, 3]
    uneven = Reference.from_stats("x", {"histogram": {"edges": [0.0, 1.0, 5.0], "counts": [1, 1]}})
    assert not uneven.uniform
    assert uneven.bin_counts(np.array([-1.0, 0.5, 1.0, 4.0, 5.0, 6.0])).tolist() == [2, 4]


def test_unshifted_inputs_stay_below_the_threshold_and_shifted_raise_an_alarm():
    mon = DriftMonitor(_stats(), ["x"], psi_threshold=0.2, min_values=2000)
    rng = np.random.default_rng(7)
    for _ in range(50):
        mon.add(rng.normal(0, 1, size=(1, 1, 8, 8)).astype(np.float32))
    report, changes = mon.evaluate()
    x = report["inputs"]["x"]
    assert report["available"] and x["judged"] and x["values"] == 3200
    assert x["psi"] < 0.05 and x["ks"] < 0.05 and not x["alarm"] and changes == []
    assert abs(x["mean_shift_sigma"]) < 0.1

    for _ in range(50):
        mon.add({"x": rng.normal(1.0, 1, size=(1, 1, 8, 8)).astype(np.float32)})
    report, changes = mon.evaluate()
    x = report["inputs"]["x"]
    assert x["psi"] > 0.2 and x["ks"] > 0.2 and x["alarm"]
    assert [c["type"] for c in changes] == ["drift_alarm"] and changes[0]["input"] == "x"
    assert x["mean_shift_sigma"] == pytest.approx(1.0, abs=0.15)

    # still drifted: no second alarm; back to normal: cleared once
    for _ in range(50):
        mon.add(rng.normal(1.0, 1, size=(1, 1, 8, 8)).astype(np.float32))
    assert mon.evaluate()[1] == []
    for _ in range(50):
        mon.add(rng.normal(0.0, 1, size=(1, 1, 8, 8)).astype(np.float32))
    assert [c["type"] for c in mon.evaluate()[1]] == ["drift_cleared"]


def test_a_window_with_too_few_values_keeps_accumulating():
    mon = DriftMonitor(_stats(), ["x"], min_values=1000)
    mon.add(np.zeros((1, 1, 8, 8), np.float32) + 3)  # 64 values, all far off
    report, changes = mon.evaluate()
    assert report["inputs"]["x"] == {"pending_values": 64, "judged": False, "alarm": False} and changes == []
    for _ in range(15):
        mon.add(np.zeros((1, 1, 8, 8), np.float32) + 3)
    report, changes = mon.evaluate()
    assert report["inputs"]["x"]["judged"] and report["inputs"]["x"]["values"] == 1024 and changes


def test_large_inputs_are_subsampled_and_non_finite_values_counted():
    mon = DriftMonitor(_stats(), ["x"], min_values=10, max_values_per_inference=100)
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    mon.add(x)
    report, _ = mon.evaluate()
    assert report["inputs"]["x"]["values"] + report["inputs"]["x"]["non_finite"] <= 100


@pytest.mark.parametrize("stats, reason", [
    (None, "no input_stats"),
    ({"x": {"count": 1, "mean": 0.5, "std": 0.1, "min": 0.0, "max": 1.0}}, "has no histogram"),
    ({"y": _stats()["x"]}, "no entry for input 'x'"),
])
def test_no_reference_means_drift_unavailable(stats, reason):
    mon = DriftMonitor(stats, ["x"])
    mon.add(np.zeros((1, 4), np.float32))
    report, changes = mon.evaluate()
    assert report["available"] is False and reason in report["reason"] and changes == []
