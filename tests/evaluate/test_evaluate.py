"""edgekit.evaluate: metrics against sklearn, baselines, robustness, plots and report.md (small data, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from edgekit.errors import ConfigError
from edgekit.evaluate import (baseline_metrics, calibration, classification_metrics, evaluate, perturb,
                              regression_metrics, robustness_table, slice_metrics, write_report)
from edgekit.evaluate.metrics import naive_forecasts, to_probabilities


class FnPredictor:
    """A predictor from a function of the raw batch."""

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn

    def predict(self, raw):
        return np.asarray(self.fn(np.asarray(raw)), dtype=np.float32)


def _random_classification(n=300, k=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.5 * np.eye(k)[y] * rng.random((n, 1))
    return y, logits


# ----------------------------------------------------------------------------- metrics
def test_classification_metrics_match_sklearn():
    y, logits = _random_classification()
    m = classification_metrics(logits, y)
    pred = logits.argmax(1)
    probs = to_probabilities(logits)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred) * 100)
    assert 20 < m["accuracy"] < 100  # the random data is neither hopeless nor perfect
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_precision"] == pytest.approx(precision_score(y, pred, average=avg, zero_division=0))
        assert m[f"{avg}_recall"] == pytest.approx(recall_score(y, pred, average=avg, zero_division=0))
        assert m[f"{avg}_f1"] == pytest.approx(f1_score(y, pred, average=avg, zero_division=0))
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    recall = recall_score(y, pred, average=None)
    assert [r["recall"] for r in m["per_class"]] == pytest.approx(list(recall))
    assert sum(r["support"] for r in m["per_class"]) == len(y)
    assert np.array(m["confusion"]).trace() == (pred == y).sum()
    assert len(m["reliability"]) == 15 and sum(b["count"] for b in m["reliability"]) == len(y)
    json.dumps(m)


def test_perfect_predictions_and_probabilities_input():
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[y]
    m = classification_metrics(probs, y, labels=["a", "b", "c"])
    assert m["accuracy"] == 100.0
    assert m["macro_f1"] == 1.0 and m["roc_auc_ovr"] == 1.0
    assert m["ece"] == pytest.approx(0.0)
    assert [r["label"] for r in m["per_class"]] == ["a", "b", "c"]


def test_roc_auc_is_none_when_a_class_is_missing():
    y = np.array([0, 1, 0, 1])
    m = classification_metrics(np.random.default_rng(0).normal(size=(4, 3)), y)
    assert m["roc_auc_ovr"] is None
    json.dumps(m)


def test_ece_small_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(1)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.random(n) < conf  # right exactly as often as the confidence says
    y = np.where(correct, 0, 1)
    probs = np.stack([conf, 1 - conf], axis=1)
    assert calibration(probs, y)["ece"] < 0.02
    y_bad = np.where(rng.random(n) < 0.5, 0, 1)  # 50 % right at 50–100 % confidence
    assert calibration(probs, y_bad)["ece"] > 0.2


def test_regression_metrics_and_mape_ignores_zero_targets():
    y = np.array([0.0, 2.0, 4.0, -5.0])
    pred = np.array([1.0, 3.0, 4.0, -4.0])
    m = regression_metrics(pred[:, None], y)
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt(3 / 4))
    assert m["mape"] == pytest.approx((50 + 0 + 20) / 3)
    assert regression_metrics(np.ones(3), np.zeros(3))["mape"] is None


def test_seasonal_naive_is_exact_on_a_seasonal_series():
    season, lookback, horizon = 12, 24, 6
    t = np.arange(400)
    series = 10 + 3 * np.sin(2 * np.pi * t / season) + (t % season == 0) * 2.0
    starts = np.arange(0, len(t) - lookback - horizon)
    x = np.stack([series[s : s + lookback] for s in starts])[:, None, :]
    y = np.stack([series[s + lookback : s + lookback + horizon] for s in starts])
    base = baseline_metrics(x, y, season=season)
    assert base["seasonal_naive"]["mae"] == pytest.approx(0.0, abs=1e-9)
    assert base["naive"]["mae"] > 1.0
    f = naive_forecasts(x, horizon, season)
    assert np.allclose(f["naive"], x[:, 0, -1:])
    long = naive_forecasts(x, horizon, season=30)  # season > lookback: naive only, no error
    assert set(long) == {"naive"} and np.array_equal(long["naive"], f["naive"])
    assert set(baseline_metrics(x, y, season=30)) == {"naive"}


def test_slice_metrics():
    y = np.array([0, 1, 0, 1, 0, 1])
    logits = np.eye(2)[[0, 1, 0, 0, 1, 1]]  # right, right, right, wrong, wrong, right
    rows = slice_metrics(np.array(["a", "a", "a", "b", "b", "b"]), y, logits, "classification")
    assert [(r["slice"], r["n"], r["accuracy"]) for r in rows] == [("a", 3, 100.0), ("b", 3, pytest.approx(100 / 3))]
    reg = slice_metrics(np.arange(100.0), np.zeros(100), np.arange(100.0), "regression")
    assert len(reg) == 5 and sum(r["n"] for r in reg) == 100
    assert reg[0]["mae"] < reg[-1]["mae"]


# ----------------------------------------------------------------------------- robustness
def _bright_images(n=120, seed=0):
    """Two classes of 8x8 uint8 images: a bright left half or a bright right half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.zeros((n, 1, 8, 8), np.uint8)
    x[y == 0, :, :, :4] = 200
    x[y == 1, :, :, 4:] = 200
    return x, y


def _halves(raw):
    """Logits from which half is brighter, with a tight margin so perturbations flip it."""
    x = raw.astype(np.float32) / 255
    d = x[:, :, :, :4].mean(axis=(1, 2, 3)) - x[:, :, :, 4:].mean(axis=(1, 2, 3))
    return np.stack([d, -d], axis=1) * 10


def test_perturbations_keep_shape_dtype_and_are_seeded():
    x, _ = _bright_images(8)
    for name in ("gaussian_noise", "blur", "rotation", "brightness", "contrast"):
        a = perturb(x, "image", name, 0.5 if name != "rotation" else 20, np.random.default_rng(3))
        b = perturb(x, "image", name, 0.5 if name != "rotation" else 20, np.random.default_rng(3))
        assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(a, b)
        assert not np.array_equal(a, x), name
    s = np.random.default_rng(0).normal(size=(4, 3, 50)).astype(np.float32)
    held = perturb(s, "sequence", "dropout", 0.5, np.random.default_rng(0))
    assert held.shape == s.shape and held.dtype == np.float32
    changed = (held != s).any(axis=1)
    assert changed.any() and np.all(held[:, :, 1:][np.broadcast_to(changed[:, None, 1:], held[:, :, 1:].shape)]
                                    == held[:, :, :-1][np.broadcast_to(changed[:, None, 1:], held[:, :, 1:].shape)])
    off = perturb(s, "sequence", "offset", 1.0, np.random.default_rng(0))
    assert np.allclose((off - s).mean(axis=(0, 2)), s.std(axis=(0, 2)), rtol=1e-4)


def test_image_perturbations_use_the_data_range():
    from sklearn.datasets import load_digits

    x = load_digits().images[:40, None].astype(np.float32)  # floats 0..16
    for name, s in (("gaussian_noise", 0.04), ("brightness", 0.1), ("rotation", 10.0), ("blur", 0.5)):
        z = perturb(x, "image", name, s, np.random.default_rng(0))
        assert z.dtype == np.float32 and z.min() >= 0.0 and z.max() <= 16.0, name
        assert 0 < np.abs(z - x).mean() < 0.15 * 16, name
    assert np.abs(perturb(x, "image", "brightness", 0.1, np.random.default_rng(0)) - x).max() <= 1.6 + 1e-5


@pytest.mark.parametrize("channels, dtype", [(2, np.uint8), (4, np.float32)])
def test_worst_images_gallery_takes_any_channel_count(tmp_path, channels, dtype):
    from edgekit.evaluate.plots import plot_worst_images

    raw = (np.random.default_rng(0).random((4, channels, 8, 8)) * 200).astype(dtype)
    worst = [{"index": i, "true": "a", "pred": "b", "loss": 1.0} for i in range(3)]
    path = plot_worst_images(raw, worst, tmp_path / "worst.png")
    assert path.is_file() and path.stat().st_size > 0


def test_noise_lowers_accuracy_of_a_simple_predictor():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.integers(0, 256, (300, 1, 8, 8)).astype(np.uint8)
    x[:, 0, 0, 0] = np.where(y == 0, 150, 100)  # the class is one pixel, 25 grey levels off the threshold

    def one_pixel(raw):
        d = raw[:, 0, 0, 0].astype(np.float32) - 125
        return np.stack([d, -d], axis=1)

    p = FnPredictor("pixel", one_pixel)
    table = robustness_table([p], x, y, task="classification", kind="image", seed=0)
    rows = {(r["perturbation"], r["level"]): r["values"]["pixel"] for r in table["rows"]}
    assert rows[("clean", 0)] == 100.0
    assert rows[("gaussian_noise", 3)] < 90.0
    assert rows[("gaussian_noise", 3)] < rows[("gaussian_noise", 1)]
    again = robustness_table([p], x, y, task="classification", kind="image", seed=0)
    assert again == table
    assert table["metric"] == "accuracy" and table["higher_is_better"]


# ----------------------------------------------------------------------------- evaluate + report
HISTORY = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 50 + 10 * e, "lr": 1e-3 / e}
           for e in range(1, 5)]


def test_evaluate_images_two_predictors_writes_plots_and_report(tmp_path):
    x, y = _bright_images(60)
    preds = [FnPredictor("fp32", _halves), FnPredictor("int8", lambda r: _halves(r) * 0.5 + 0.01)]
    meta = np.where(np.arange(60) % 2 == 0, "cam-a", "cam-b")
    ev = evaluate(preds, x, y, task="classification", kind="image", labels=["left", "right"], meta=meta,
                  history=HISTORY, out_dir=tmp_path, seed=0)
    json.dumps(ev)
    assert ev["primary"]["accuracy"] == 100.0 and set(ev["metrics"]) == {"fp32", "int8"}
    assert ev["slices"]["fp32"][0]["slice"] == "cam-a"
    assert ev["worst"] and ev["worst"][0]["loss"] >= ev["worst"][-1]["loss"]
    files = [*ev["plots"]["confusion"].values(), ev["plots"]["reliability"], ev["plots"]["per_class_recall"],
             ev["plots"]["learning_curves"], ev["plots"]["worst"], ev["plots"]["robustness"]]
    for f in files:
        assert (tmp_path / f).stat().st_size > 1000, f
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    report = write_report(tmp_path, {"run": "digits", "task": "classification", "kind": "image", "arch": "resnet_small",
                                     "seed": 0, "split_report": {"method": "stratified", "sizes": {"train": 1, "test": 60}},
                                     "evaluation": ev, "notes": ["a note"]})
    text = report.read_text()
    assert "# Evaluation report: digits" in text
    assert "| metric | fp32 | int8 |" in text
    assert "recall (int8)" in text and "## Calibration" in text and "## Robustness" in text
    assert "## Slices" in text and "cam-b" in text and "- a note" in text
    for f in files:
        assert f"]({f})" in text


def test_evaluate_forecast_with_baselines_and_series_plots(tmp_path):
    season, lookback, horizon = 12, 24, 4
    t = np.arange(300)
    series = (100 + 20 * np.sin(2 * np.pi * t / season) + 0.1 * t).astype(np.float32)
    starts = np.arange(0, len(t) - lookback - horizon)
    x = np.stack([series[s : s + lookback] for s in starts])[:, None, :]
    y = np.stack([series[s + lookback : s + lookback + horizon] for s in starts])
    seasonal = FnPredictor("seasonal+trend", lambda r: np.tile(r[:, 0, -season:], 2)[:, :horizon] + 1.2)
    ev = evaluate([seasonal], x, y, task="forecast", kind="forecast", season=season, out_dir=tmp_path,
                  robustness=True, seed=1)
    json.dumps(ev)
    assert ev["baselines"]["seasonal_naive"]["mae"] == pytest.approx(1.2, rel=1e-3)
    assert ev["primary"]["mae"] == pytest.approx(0.0, abs=1e-3)
    assert len(ev["primary"]["mae_by_step"]) == horizon
    assert {r["perturbation"] for r in ev["robustness"]["rows"]} == {"clean", "gaussian_noise", "dropout", "offset"}
    for key in ("predicted_vs_actual", "worst", "robustness"):
        assert (tmp_path / ev["plots"][key]).stat().st_size > 1000
    text = write_report(tmp_path, {"evaluation": ev}).read_text()
    assert "beats the seasonal naive (season 12) baseline" in text
    assert "MAE per horizon step" in text


def test_write_report_tolerates_a_bare_summary(tmp_path):
    text = write_report(tmp_path / "r", {}).read_text()
    assert text.startswith("# Evaluation report: r") and "No evaluation was run." in text


def test_evaluate_refuses_duplicate_names(tmp_path):
    p = FnPredictor("same", lambda r: np.zeros((len(r), 2)))
    with pytest.raises(ConfigError, match="differ"):
        evaluate([p, p], np.zeros((2, 3), np.float32), np.array([0, 1]), task="classification", kind="tabular",
                 out_dir=tmp_path)
