"""Metrics for classification (from logits or probabilities) and regression/forecast (with naive baselines).

Everything returned is JSON-ready: plain floats, ints, lists and dicts; a metric that is not
defined for the data (ROC-AUC with a class missing, MAPE with all targets zero) is ``None``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from ..errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

ECE_BINS = 15
TASKS = ("classification", "regression", "forecast")


# ----------------------------------------------------------------------------- classification
def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable softmax."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def to_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(N, K) logits or probabilities → probabilities (rows already in [0, 1] summing to 1 stay as they are)."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2:
        raise CalibrationError(f"classification outputs must be (N, classes), got shape {out.shape}")
    if out.size and out.min() >= 0 and out.max() <= 1 and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        return out
    return softmax(out)


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Top-1 accuracy in %."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y, pred) * 100)


def roc_auc_ovr(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC-AUC; None when a class has no sample in ``y`` (it is undefined then)."""
    from sklearn.metrics import roc_auc_score

    k = probs.shape[1]
    present = np.unique(y)
    if len(present) < k or len(present) < 2:
        log.info("ROC-AUC skipped: %d of %d classes present in the evaluated data", len(present), k)
        return None
    if k == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=np.arange(k)))


def calibration(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error (top-1 confidence, equal-width bins) and the bins of a reliability diagram.

    ``ece`` is in [0, 1]; each bin has its range, count, mean confidence and accuracy (None when empty).
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if count:
            c, a = float(conf[mask].mean()), float(correct[mask].mean())
            ece += count / len(y) * abs(a - c)
        else:
            c = a = None
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": bins}


def per_class_table(y: np.ndarray, pred: np.ndarray, num_classes: int,
                    labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per class: label, precision, recall, f1, support."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y, pred, labels=np.arange(num_classes), zero_division=0)
    names = class_names(num_classes, labels)
    return [{"class": i, "label": names[i], "precision": float(p[i]), "recall": float(r[i]),
             "f1": float(f[i]), "support": int(s[i])} for i in range(num_classes)]


def class_names(num_classes: int, labels: Sequence[str] | None) -> list[str]:
    """``labels`` when they cover every class, else "0", "1", …"""
    if labels is not None and len(labels) == num_classes:
        return [str(v) for v in labels]
    return [str(i) for i in range(num_classes)]


def classification_metrics(outputs: np.ndarray, y: np.ndarray, labels: Sequence[str] | None = None,
                           n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Accuracy (%), macro/weighted precision, recall, F1, ROC-AUC (OvR), per-class table, confusion, ECE."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    probs = to_probabilities(outputs)
    y = _labels_of(y, len(probs))
    k = probs.shape[1]
    if y.size and (y.min() < 0 or y.max() >= k):
        raise CalibrationError(f"labels span {y.min()}..{y.max()} but the model has {k} outputs",
                               hint="evaluate with the labels the model was trained on")
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = {"n": int(len(y)), "accuracy": accuracy(y, pred)}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=np.arange(k), average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    out["roc_auc_ovr"] = roc_auc_ovr(y, probs)
    cal = calibration(probs, y, n_bins)
    out["ece"] = cal["ece"]
    out["reliability"] = cal["bins"]
    out["per_class"] = per_class_table(y, pred, k, labels)
    out["confusion"] = confusion_matrix(y, pred, labels=np.arange(k)).tolist()
    return out


def _labels_of(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise CalibrationError(f"expected {n} integer labels, got shape {y.shape}")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- regression / forecast
def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - y) ** 2)))


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - y)))


def mape(y: np.ndarray, pred: np.ndarray) -> float | None:
    """Mean absolute percentage error in %, over the non-zero targets (None when every target is zero)."""
    y = np.asarray(y, np.float64)
    mask = np.abs(y) > 1e-12
    if not mask.any():
        return None
    return float(np.mean(np.abs((np.asarray(pred, np.float64)[mask] - y[mask]) / y[mask])) * 100)


def error_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """rmse, mae, mape of predictions already shaped like ``y``."""
    return {"rmse": rmse(y, pred), "mae": mae(y, pred), "mape": mape(y, pred)}


def align(outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Model outputs reshaped like the targets ((N,) or (N, T)); a size mismatch is an error."""
    out = np.asarray(outputs, np.float64)
    y = np.asarray(y)
    if out.size != y.size or len(out) != len(y):
        raise CalibrationError(f"the model gives outputs of shape {out.shape} for targets of shape {y.shape}",
                               hint="evaluate with the data (and horizon) the model was trained on")
    return out.reshape(y.shape)


def regression_metrics(outputs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """rmse, mae, mape (%), r2; for multi-step targets also the MAE per horizon step."""
    from sklearn.metrics import r2_score

    y = np.asarray(y, np.float64)
    pred = align(outputs, y)
    out: dict[str, Any] = {"n": int(len(y)), **error_metrics(y, pred)}
    out["r2"] = float(r2_score(y.reshape(len(y), -1), pred.reshape(len(y), -1))) if len(y) > 1 else None
    if y.ndim == 2 and y.shape[1] > 1:
        out["mae_by_step"] = [float(v) for v in np.mean(np.abs(pred - y), axis=0)]
    return out


def naive_forecasts(raw: np.ndarray, horizon: int, season: int | None = None) -> dict[str, np.ndarray]:
    """Baseline forecasts from raw windows (N, C, lookback), target channel 0 (real units).

    ``naive``: the last value repeated over the horizon; ``seasonal_naive`` (when ``season`` is given):
    the last ``season`` values tiled over the horizon; left out when the season exceeds the lookback.
    """
    x = np.asarray(raw, np.float64)
    if x.ndim != 3:
        raise CalibrationError(f"forecast inputs must be windows (N, C, lookback), got shape {x.shape}")
    lookback = x.shape[2]
    out = {"naive": np.repeat(x[:, 0, -1:], horizon, axis=1)}
    if season and season > lookback:
        log.info("no seasonal-naive baseline: the season (%d) is longer than the lookback window (%d)",
                 season, lookback)
    elif season:
        reps = math.ceil(horizon / season)
        out["seasonal_naive"] = np.tile(x[:, 0, -season:], (1, reps))[:, :horizon]
    return out


def baseline_metrics(raw: np.ndarray, y: np.ndarray, season: int | None = None) -> dict[str, dict[str, Any]]:
    """rmse/mae/mape of the naive (and seasonal-naive) forecasts against the targets (N, horizon)."""
    y = np.asarray(y, np.float64)
    y2 = y.reshape(len(y), -1)
    return {name: error_metrics(y2, f) for name, f in naive_forecasts(raw, y2.shape[1], season).items()}


# ----------------------------------------------------------------------------- shared
def compute(task: str, outputs: np.ndarray, y: np.ndarray, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The task's metrics for one predictor's outputs."""
    if task == "classification":
        return classification_metrics(outputs, y, labels)
    if task in ("regression", "forecast"):
        return regression_metrics(outputs, y)
    raise ConfigError(f"no metrics for task {task!r}", hint=f"use one of {', '.join(TASKS)}")


def score(task: str, outputs: np.ndarray, y: np.ndarray) -> float:
    """The one number robustness and slices compare: accuracy (%) or MAE."""
    if task == "classification":
        return accuracy(np.asarray(y), np.asarray(outputs).argmax(axis=1))
    return mae(np.asarray(y, np.float64), align(outputs, y))


def headline(task: str) -> tuple[str, bool]:
    """(metric name, higher is better) of :func:`score`."""
    return ("accuracy", True) if task == "classification" else ("mae", False)


MAX_SLICES = 20


def slice_metrics(meta: np.ndarray, y: np.ndarray, pred: np.ndarray, task: str) -> list[dict[str, Any]]:
    """The metric per value of ``meta`` (one slice per value; numeric meta with many values → 5 quantile bins).

    ``pred``: model outputs (N, K) or, for classification, predicted class ids (N,). Rows: slice, n and
    accuracy + macro_f1 (classification) or rmse + mae (regression/forecast).
    """
    from sklearn.metrics import f1_score

    meta = np.asarray(meta)
    y = np.asarray(y)
    if len(meta) != len(y):
        raise CalibrationError(f"meta has {len(meta)} values for {len(y)} samples",
                               hint="give one metadata value per sample")
    keys, order = _slice_keys(meta)
    rows = []
    for key in order:
        mask = keys == key
        row: dict[str, Any] = {"slice": str(key), "n": int(mask.sum())}
        if task == "classification":
            p = np.asarray(pred)
            ids = p[mask].argmax(axis=1) if p.ndim == 2 else p[mask]
            row["accuracy"] = accuracy(y[mask], ids)
            row["macro_f1"] = float(f1_score(y[mask], ids, average="macro", zero_division=0))
        else:
            yy = y[mask].astype(np.float64)
            pp = align(np.asarray(pred)[mask], yy)
            row.update(rmse=rmse(yy, pp), mae=mae(yy, pp))
        rows.append(row)
    return rows


def _slice_keys(meta: np.ndarray) -> tuple[np.ndarray, list]:
    """(slice key per sample, the keys in table order)."""
    if meta.dtype == object:
        meta = meta.astype(str)
    values = np.unique(meta)
    if len(values) <= MAX_SLICES or not np.issubdtype(meta.dtype, np.number):
        if len(values) > MAX_SLICES:
            log.warning("meta has %d distinct values; the slice table lists each", len(values))
        return meta, values.tolist()
    edges = np.unique(np.quantile(meta.astype(np.float64), np.linspace(0, 1, 6)))
    which = np.clip(np.searchsorted(edges, meta, side="right") - 1, 0, len(edges) - 2)
    names = np.array([f"[{edges[i]:.4g}, {edges[i + 1]:.4g}{']' if i == len(edges) - 2 else ')'}"
                      for i in range(len(edges) - 1)])
    return names[which], names.tolist()
