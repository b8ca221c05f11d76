"""PSI and KS against the reference histogram the compiler records in the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.build.stages.package import input_statistics
from edgekit_runtime.agent import DriftMonitor, ks_statistic, psi
from edgekit_runtime.agent.drift import PSI_EPSILON, Reference


def _stats(seed=0):
    calib = np.random.default_rng(seed).normal(0.0, 1.0, size=(500, 1, 8, 8)).astype(np.float32)
    return {"x": input_statistics(calib)}


def textbook_psi(expected, actual, epsilon: float = 0.0) -> float:
    """PSI = sum over bins of (a - e) * ln(a / e), on shares smoothed as (x + eps) / (1 + k * eps)."""
    e = np.asarray(expected, np.float64) / np.sum(expected)
    a = np.asarray(actual, np.float64) / np.sum(actual)
    e = (e + epsilon) / (1 + epsilon * len(e))
    a = (a + epsilon) / (1 + epsilon * len(a))
    return float(sum((ai - ei) * np.log(ai / ei) for ai, ei in zip(a, e)))


def test_psi_and_ks_basics():
    a = np.array([10, 20, 30, 40])
    assert psi(a, a) == pytest.approx(0.0, abs=1e-12) and ks_statistic(a, a * 3) == 0.0
    assert ks_statistic(np.array([1, 0]), np.array([0, 1])) == 1.0
    assert ks_statistic(a, np.array([40, 30, 20, 10])) == pytest.approx(0.4)  # |0.1+0.2 - (0.4+0.3)|


def test_psi_is_the_textbook_value_of_a_fixed_case():
    e, a = np.array([10, 20, 30, 40]), np.array([40, 30, 20, 10])
    # by hand: 0.3 ln 4 + 0.1 ln 1.5 + (-0.1) ln(2/3) + (-0.3) ln(1/4) = 0.6 ln 4 + 0.2 ln 1.5
    by_hand = 0.6 * np.log(4) + 0.2 * np.log(1.5)
    assert by_hand == pytest.approx(0.912870, abs=1e-6)
    assert textbook_psi(e, a) == pytest.approx(by_hand, rel=1e-12)
    assert psi(e, a, epsilon=0.0) == pytest.approx(by_hand, rel=1e-12)  # a log10 or log2 PSI is far off
    # the default smoothing moves it by well under 0.1 %, exactly as the formula says
    assert psi(e, a) == pytest.approx(textbook_psi(e, a, PSI_EPSILON), rel=1e-12)
    assert psi(e, a) == pytest.approx(by_hand, rel=1e-3)
    # an empty bin stays finite through the smoothing, and still follows the formula
    empty = np.array([0, 0, 0, 100])
    assert psi(e, empty) == pytest.approx(textbook_psi(e, empty, PSI_EPSILON), rel=1e-12)
    assert np.isfinite(psi(e, empty))


def _two_bin_monitor(psi_threshold: float) -> DriftMonitor:
    stats = {"x": {"histogram": {"edges": [0.0, 1.0, 2.0], "counts": [5000, 5000]}, "mean": 1.0, "std": 0.5}}
    return DriftMonitor(stats, ["x"], psi_threshold=psi_threshold, min_values=10_000)


def _window(share_low: float) -> np.ndarray:
    """10,000 values, ``share_low`` of them in the low bin [0, 1), the rest in [1, 2)."""
    low = round(10_000 * share_low)
    return np.concatenate([np.full(low, 0.5), np.full(10_000 - low, 1.5)]).astype(np.float32)


@pytest.mark.parametrize("share_low, alarm", [(0.71, False), (0.72, True)])
def test_alarm_at_the_default_psi_threshold(share_low, alarm):
    """Against a 50/50 reference: 71/29 reads PSI 0.188 (just under 0.2), 72/28 reads 0.208 (just over)."""
    mon = _two_bin_monitor(0.2)
    values = _window(share_low)
    for chunk in np.split(values, 10):  # below max_values_per_inference: every value is counted
        mon.add(chunk)
    report, changes = mon.evaluate()
    x = report["inputs"]["x"]
    expected = textbook_psi([5000, 5000], [share_low, 1 - share_low], PSI_EPSILON)
    assert x["psi"] == pytest.approx(expected, rel=1e-9) and abs(expected - 0.2) < 0.015
    assert x["alarm"] is alarm and [c["type"] for c in changes] == (["drift_alarm"] if alarm else [])


@pytest.mark.parametrize("factor, alarm", [(1.01, False), (0.99, True)])
def test_alarm_just_inside_and_just_outside_a_threshold(factor, alarm):
    """The same window, with the threshold 1 % above its PSI (quiet) and 1 % below (alarm)."""
    values = _window(0.65)
    mon = _two_bin_monitor(textbook_psi([1, 1], [0.65, 0.35], PSI_EPSILON) * factor)
    for chunk in np.split(values, 10):
        mon.add(chunk)
    report, _ = mon.evaluate()
    assert report["inputs"]["x"]["alarm"] is alarm


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
