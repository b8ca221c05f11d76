"""Each gate at its threshold: a case just inside passes, a case just outside fails (edgekit.build.gates)."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from edgekit.build.gates import (AccuracyCheck, Attempt, FidelityCheck, GateResult, LatencyCheck,
                                 cosine_per_sample, latency_not_representative, refuse, size_gate, top1_agreement,
                                 top1_percent)
from edgekit.config import AccuracyBudget, FidelityGate, LatencyGate, Limits
from edgekit.errors import AccuracyBudgetError, ConfigError, GateError


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("drop, status", [(0.49, "passed"), (0.5, "passed"), (0.51, "failed"), (-1.0, "passed")])
def test_accuracy_budget_just_inside_and_just_outside(drop, status):
    gate = AccuracyCheck(AccuracyBudget(max_accuracy_drop=0.5), None).gate(90.0, 90.0 - drop)
    assert gate.status == status
    assert gate.value == pytest.approx(drop) and gate.threshold == 0.5 and gate.unit == "pt"


def test_accuracy_budget_of_null_is_reported_not_checked():
    gate = AccuracyCheck(AccuracyBudget(max_accuracy_drop=None), None).gate(90.0, 10.0)
    assert gate.status == "not_checked" and gate.value == pytest.approx(80.0)


def test_top1_percent_counts_hits():
    out = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert top1_percent(out, np.array([1, 0, 0, 0])) == pytest.approx(75.0)


def test_reference_at_chance_is_refused_with_a_word_about_labels():
    acc = AccuracyCheck(AccuracyBudget(), None)
    out = np.eye(10)[np.arange(100) % 10]
    y = np.arange(100) % 10
    # 10 classes: chance is 10 %, refused up to 1.25 × chance
    with pytest.raises(GateError, match="at or below chance.*labels"):
        acc.check_reference(out, y, 12.5, "folder")
    acc.check_reference(out, y, 12.6, "folder")  # just above: a weak model, but a real reference
    # two classes: chance 50 %, refused up to chance + 5 pt (not 1.25 × chance = 62.5 %)
    two = np.eye(2)[np.arange(10) % 2]
    with pytest.raises(GateError):
        acc.check_reference(two, np.arange(10) % 2, 55.0, "folder")
    acc.check_reference(two, np.arange(10) % 2, 55.1, "folder")


def test_label_count_that_does_not_fit_the_model_is_refused():
    out = np.zeros((4, 10))
    with pytest.raises(ConfigError, match="10 output classes but 3 labels"):
        AccuracyCheck(AccuracyBudget(), ["a", "b", "c"]).check_reference(out, np.zeros(4, int), 90.0, "v")
    with pytest.raises(ConfigError, match="label 12 but the model has only 10"):
        AccuracyCheck(AccuracyBudget(), None).check_reference(out, np.array([0, 1, 2, 12]), 90.0, "v")


# ----------------------------------------------------------------------------- fidelity
def test_cosine_matches_the_textbook_value():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_per_sample(a, b), [1 / np.sqrt(2), -1.0, 1.0])
    assert top1_agreement(np.array([[0, 1], [1, 0]]), np.array([[0, 1], [0, 1]])) == 0.5


def _pair(cos: float, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Outputs whose every sample has exactly cosine ``cos`` to the reference (angle in one plane)."""
    ref = np.tile([1.0, 0.0, 0.0], (n, 1))
    angle = np.arccos(cos)
    return ref, np.tile([np.cos(angle), np.sin(angle), 0.0], (n, 1))


@pytest.mark.parametrize("cos, status", [(0.9905, "passed"), (0.99, "passed"), (0.9895, "failed")])
def test_fidelity_cosine_just_inside_and_just_outside(cos, status):
    check = FidelityCheck(FidelityGate(min_cosine=0.99))
    figures = check.measure(*_pair(cos))
    assert figures["cosine"] == pytest.approx(cos) and figures["samples"] == 8
    by_name = {g.name: g for g in check.gates(figures)}
    assert by_name["fidelity.cosine"].status == status
    assert by_name["fidelity.top1_agreement"].status == "not_checked"


@pytest.mark.parametrize("agree, status", [(7, "passed"), (6, "failed")])
def test_fidelity_top1_agreement_threshold(agree, status):
    ref = np.tile([2.0, 1.0], (8, 1))
    out = ref.copy()
    out[agree:] = [1.0, 2.0]  # 8 - agree samples change their top-1 class
    check = FidelityCheck(FidelityGate(min_cosine=None, min_top1_agreement=0.85))
    by_name = {g.name: g for g in check.gates(check.measure(ref, out))}
    assert by_name["fidelity.top1_agreement"].status == status  # 7/8 = 0.875 passes, 6/8 = 0.75 fails
    assert by_name["fidelity.cosine"].status == "not_checked"


def test_an_all_zero_fp32_reference_is_refused_before_any_int8_is_judged():
    # a freshly constructed ViT's zero-initialized head answers 0 to every image: any INT8 that also answers 0
    # "agrees" at cosine 1.0 (cosine_per_sample says 1.0 where both are zero), so the gate would pass anything
    check = FidelityCheck(FidelityGate(min_cosine=0.99))
    with pytest.raises(GateError, match="answers 0 in every value for all 6 held-back") as err:
        check.check_reference(np.zeros((6, 1000), np.float32))
    assert "trained weights" in err.value.hint and err.value.report["result"] == "failed: all-zero reference"
    # not refused: a saturated sigmoid's 1.0 for every held-back sample of one class, a class-index output that is
    # 0 for each, one non-zero value, one sample, and a profile that gates nothing on fidelity
    check.check_reference(np.ones((5, 1), np.float32))
    check.check_reference(np.zeros((5, 1), np.int64))
    almost = np.zeros((5, 10), np.float32)
    almost[3, 7] = 1e-6
    check.check_reference(almost)
    check.check_reference(np.zeros((1, 10), np.float32))
    FidelityCheck(FidelityGate(min_cosine=None, min_top1_agreement=None)).check_reference(np.zeros((6, 10)))


# ----------------------------------------------------------------------------- latency and size
def _lat(p50: float, p99: float | None = None) -> dict:
    return {"p50_ms": p50, "p99_ms": p99 or p50 * 2}


@pytest.mark.parametrize("int8_ms, status", [(0.90, "passed"), (1.0, "passed"), (1.019, "not_checked"),
                                             (1.021, "failed"), (2.0, "failed")])
def test_int8_must_not_be_slower_than_fp32_beyond_noise(int8_ms, status):
    check = LatencyCheck(LatencyGate(min_int8_speedup=1.0, noise_ms=0.02), Limits(), None)
    gate = check.speedup_gate(_lat(1.0), _lat(int8_ms))
    assert gate.status == status and gate.value == pytest.approx(1.0 / int8_ms)
    if status == "failed":  # default on_slower: ship FP32, say so, do not refuse
        assert gate.refuses is False and gate.ships_fp32 and "shipping the faster FP32" in gate.detail
    if status == "not_checked":  # never "passed" while slower: within noise it is not judged, and said so
        assert "within latency.noise_ms" in gate.detail and not gate.ships_fp32


def test_int8_that_misses_a_margin_but_is_still_faster_keeps_shipping():
    check = LatencyCheck(LatencyGate(min_int8_speedup=1.5, noise_ms=0.0), Limits(), None)
    gate = check.speedup_gate(_lat(1.0), _lat(0.8))  # 1.25x: misses 1.5x, but FP32 would be slower
    assert gate.status == "failed" and not gate.ships_fp32 and not gate.refuses
    assert "FP32 is slower: shipping INT8" in gate.detail


def test_int8_speedup_margin_is_a_ratio():
    check = LatencyCheck(LatencyGate(min_int8_speedup=1.5, noise_ms=0.0), Limits(), None)
    assert check.speedup_gate(_lat(3.0), _lat(2.0)).status == "passed"  # exactly 1.5x
    assert check.speedup_gate(_lat(3.0), _lat(2.01)).status == "failed"


def test_slower_int8_refuses_the_build_only_when_the_profile_says_fail():
    fail = LatencyCheck(LatencyGate(on_slower="fail"), Limits(), None).speedup_gate(_lat(1.0), _lat(2.0))
    keep = LatencyCheck(LatencyGate(on_slower="keep_int8"), Limits(), None).speedup_gate(_lat(1.0), _lat(2.0))
    assert fail.refuses and "refusing" in fail.detail
    assert not keep.refuses and "keep_int8" in keep.detail
    with pytest.raises(GateError, match="latency.int8_speedup gate failed"):
        refuse([fail], {}, "")
    refuse([keep], {}, "")  # reported, not refused


def test_latency_not_gated_where_the_host_figure_does_not_carry_over():
    assert latency_not_representative(platform.machine(), "x86", "openvino", "openvino") is None
    assert latency_not_representative("any", "generic", "onnxruntime", "onnxruntime") is None
    assert "does not run on this host" in latency_not_representative("aarch64", "jetson", "tensorrt", "onnxruntime")
    assert "device is arm64/aarch64" in latency_not_representative("aarch64", "arm64", "tflite", "tflite")
    check = LatencyCheck(LatencyGate(), Limits(latency_budget_ms=1.0), "not here")
    assert check.speedup_gate(_lat(1.0), _lat(9.0)).status == "not_checked"
    assert check.budget_gate(_lat(1.0, 9.0)).status == "not_checked"


@pytest.mark.parametrize("p99, status", [(9.99, "passed"), (10.0, "passed"), (10.01, "failed")])
def test_latency_budget_on_p99(p99, status):
    check = LatencyCheck(LatencyGate(), Limits(latency_budget_ms=10.0), None)
    gate = check.budget_gate(_lat(1.0, p99))
    assert gate.status == status and not gate.refuses  # the device's install health check enforces it
    assert LatencyCheck(LatencyGate(), Limits(), None).budget_gate(_lat(1.0)) is None


@pytest.mark.parametrize("size, status", [(2_000_000, "passed"), (2_000_001, "failed")])
def test_size_gate_where_a_profile_sets_a_limit(size, status):
    assert size_gate(Limits(max_model_mb=2.0), size).status == status
    assert size_gate(Limits(), size) is None


# ----------------------------------------------------------------------------- refusal
def test_refuse_names_every_failed_gate_and_marks_the_report():
    report: dict = {}
    results = [GateResult("accuracy", "failed", 2.0, 0.5, "pt", "top1 90 → 88"),
               GateResult("fidelity.cosine", "failed", 0.9, 0.99, "", "cosine 0.9"),
               GateResult("size", "passed", 1.0, 2.0, "MB", "")]
    with pytest.raises(AccuracyBudgetError, match="accuracy, fidelity.cosine gate failed, no bundle written") as info:
        refuse(results, report, "hint")
    assert info.value.report is report and report["result"] == "failed: accuracy gate"


def test_attempts_prefer_fewer_failures_then_smaller_drop():
    def attempt(name, drop, failed):
        return Attempt(name, None, [GateResult("accuracy", "failed" if failed else "passed", drop, 0.5, "pt")],
                       {"accuracy": 90 - drop, "drop": drop})

    best = max([attempt("ptq", 3.0, True), attempt("a", 0.4, False), attempt("b", 0.1, False)], key=lambda a: a.score)
    assert best.strategy == "b" and best.passed
    assert max([attempt("ptq", 2.0, True), attempt("x", 5.0, True)], key=lambda a: a.score).strategy == "ptq"


@pytest.mark.parametrize("value, status", [(10.5, "passed"), (11.0, "passed"), (11.01, "failed"), (9.0, "passed")])
def test_mae_budget_is_how_much_the_error_may_grow(value, status):
    check = AccuracyCheck(AccuracyBudget(metric="mae", max_accuracy_drop=1.0), None)
    g = check.gate(10.0, value)
    assert g.status == status and g.value == pytest.approx(value - 10.0)
    assert "increase" in g.detail


def test_mae_and_rmse_are_in_the_targets_units():
    out = np.array([[1.0, 2.0], [3.0, 6.0]])
    y = np.array([[1.0, 1.0], [3.0, 3.0]], dtype=np.float32)
    assert AccuracyCheck(AccuracyBudget(metric="mae"), None).value(out, y) == pytest.approx(1.0)
    assert AccuracyCheck(AccuracyBudget(metric="rmse"), None).value(out, y) == pytest.approx(np.sqrt(10 / 4))


def test_regression_targets_that_do_not_fit_the_outputs_are_refused():
    check = AccuracyCheck(AccuracyBudget(metric="mae"), None)
    with pytest.raises(ConfigError, match="target value"):
        check.check_reference(np.zeros((4, 6)), np.zeros((4, 3), np.float32), 1.0, "val.npz")
    check.check_reference(np.zeros((4, 6)), np.zeros((4, 6), np.float32), 1.0, "val.npz")  # fits: no error


def test_dense_metrics_decode_raw_outputs_and_refuse_a_reference_at_zero():
    """map50 of raw detector outputs [N, A, 4+C] through the device's decode: a perfect head scores 100 points, the
    same head with its classes swapped scores 0, and a reference of 0 refuses the build with what to check."""
    from edgekit_runtime.detection import anchor_points

    strides, hw = [8, 16, 32], (64, 64)
    points, point_strides = anchor_points(*hw, strides)
    box = np.array([16.0, 16.0, 48.0, 48.0], np.float32)  # one object of class 1 in each image
    raw = np.zeros((2, len(points), 4 + 2), np.float32)
    raw[..., 4:] = -10.0
    centre = np.argmin(((points - 32.0) ** 2).sum(1) + (point_strides != 16) * 1e6)  # a stride-16 point at the centre
    s = point_strides[centre]
    raw[:, centre, :4] = [(points[centre, 0] - 16) / s, (points[centre, 1] - 16) / s, (48 - points[centre, 0]) / s,
                          (48 - points[centre, 1]) / s]
    raw[:, centre, 5] = 10.0
    y = np.array([[[1, *box]], [[1, *box]]], np.float32)
    check = AccuracyCheck(AccuracyBudget(metric="map50", max_accuracy_drop=1.0), ["a", "b"],
                          {"postprocess": {"type": "detection", "strides": strides}, "input_hw": list(hw)})
    assert check.value(raw, y) == pytest.approx(100.0, abs=1e-6)
    swapped = raw[..., [0, 1, 2, 3, 5, 4]]
    assert check.value(swapped, y) == 0.0
    with pytest.raises(GateError, match="scores 0.00 map50 points on val.*trained long enough.*model.labels"):
        check.check_reference(swapped, y, 0.0, "val")
    with pytest.raises(ConfigError, match="set postprocess.type: detection"):
        AccuracyCheck(AccuracyBudget(metric="map50"), ["a", "b"], {"postprocess": None, "input_hw": [64, 64]}
                      ).value(raw, y)
