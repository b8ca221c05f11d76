"""The evaluation's PNGs (matplotlib, Agg canvas, no pyplot state); each function returns the path it wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

MAX_ANNOTATED_CLASSES = 20


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path,
                     title: str = "") -> Path:
    """Row-normalised confusion matrix (colour: recall share), counts annotated for ≤ 20 classes."""
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = min(14.0, 2.5 + 0.45 * k)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class")
    ticks = np.arange(k)
    ax.set_xticks(ticks, [str(v) for v in labels][:k], rotation=45 if k > 8 else 0, ha="right" if k > 8 else "center")
    ax.set_yticks(ticks, [str(v) for v in labels][:k])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= MAX_ANNOTATED_CLASSES:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (rows normalised, counts shown)")
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Accuracy vs confidence per bin for each predictor ({name: {"ece", "reliability": bins}})."""
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, m in curves.items():
        bins = [b for b in m.get("reliability", []) if b.get("count")]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", lw=1.2,
                label=f"{name} (ECE {m.get('ece', float('nan')):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Train vs validation loss, the validation metrics and the learning rate per epoch."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]

    def series(key: str) -> list[float]:
        return [float(h[key]) if h.get(key) is not None else math.nan for h in history]

    val_metrics = sorted({k for h in history for k in h if k.startswith("val_") and k != "val_loss"})
    has_lr = any(h.get("lr") is not None for h in history)
    panels = 1 + bool(val_metrics) + has_lr
    fig = _figure(4.5 * panels, 3.8)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    ax = axes[0]
    for key in ("train_loss", "val_loss"):
        if any(key in h for h in history):
            ax.plot(epochs, series(key), marker=".", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    i = 1
    if val_metrics:
        ax = axes[i]
        for key in val_metrics:
            ax.plot(epochs, series(key), marker=".", label=key[4:])
        ax.set_xlabel("epoch")
        ax.set_title("validation metrics")
        ax.legend(fontsize=8)
        i += 1
    if has_lr:
        ax = axes[i]
        lr = series("lr")
        ax.plot(epochs, lr, color="tab:green")
        if all(v > 0 for v in lr if not math.isnan(v)):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title("learning rate")
    return _save(fig, path)


def plot_predicted_vs_actual(y: np.ndarray, preds: Mapping[str, np.ndarray], path: Path) -> Path:
    """Scatter of predicted against actual values (every horizon step) with the identity line."""
    y = np.asarray(y, dtype=np.float64).ravel()
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    lo, hi = float(np.min(y)), float(np.max(y))
    for name, p in preds.items():
        p = np.asarray(p, dtype=np.float64).ravel()
        ax.scatter(y, p, s=8, alpha=0.5, label=name)
        lo, hi = min(lo, float(p.min())), max(hi, float(p.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title("predicted vs actual")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_worst_images(raw: np.ndarray, worst: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """A gallery of the highest-loss images, titled true → predicted ({"index", "true", "pred", "loss"}).

    Three-channel images are shown in colour, others as channel 0 in gray.
    """
    n = len(worst)
    cols = min(8, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = _figure(1.6 * cols, 1.9 * rows)
    for i, w in enumerate(worst):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = np.asarray(raw[w["index"]])
        img = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]  # not RGB: show channel 0
        if img.dtype != np.uint8:
            img = np.clip(img.astype(np.float64) / (255.0 if img.max() > 1.5 else 1.0), 0, 1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(f"{w['true']} → {w['pred']}\nloss {w['loss']:.2f}", fontsize=7)
        ax.axis("off")
    fig.suptitle("worst test examples (true → predicted)")
    return _save(fig, path)


def plot_worst_series(raw: np.ndarray, worst: Sequence[Mapping[str, Any]], path: Path, *, task: str,
                 y: np.ndarray | None = None, pred: np.ndarray | None = None) -> Path:
    """Small multiples of the worst series: the input channels; for forecasts the target channel's
    window followed by the true and predicted horizon (at most 8 panels)."""
    worst = list(worst)[:8]
    n = len(worst)
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = _figure(3.6 * cols, 2.4 * rows)
    for i, w in enumerate(worst):
        ax = fig.add_subplot(rows, cols, i + 1)
        x = np.asarray(raw[w["index"]], dtype=np.float64)
        x = x[None, :] if x.ndim == 1 else x
        if task == "forecast" and y is not None and pred is not None:
            past = x[0]
            t0 = len(past)
            fut = np.arange(t0, t0 + np.asarray(y[w["index"]]).size)
            ax.plot(np.arange(t0), past, color="tab:blue", lw=1, label="input")
            ax.plot(fut, np.ravel(y[w["index"]]), color="black", lw=1.2, label="actual")
            ax.plot(fut, np.ravel(pred[w["index"]]), color="tab:red", lw=1.2, ls="--", label="predicted")
            if i == 0:
                ax.legend(fontsize=6)
            ax.set_title(f"#{w['index']}  MAE {w['loss']:.3g}", fontsize=8)
        else:
            for c in range(min(len(x), 8)):
                ax.plot(x[c], lw=0.8)
            ax.set_title(f"#{w['index']}  {w['true']} → {w['pred']}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("worst test examples")
    return _save(fig, path)


def plot_robustness(table: Mapping[str, Any], path: Path) -> Path:
    """The metric against strength, one panel per perturbation, one line per predictor (clean at 0)."""
    rows = table["rows"]
    clean = next((r for r in rows if r["perturbation"] == "clean"), None)
    names = list(dict.fromkeys(r["perturbation"] for r in rows if r["perturbation"] != "clean"))
    cols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig = _figure(4 * cols, 3.2 * nrows)
    for i, pert in enumerate(names):
        ax = fig.add_subplot(nrows, cols, i + 1)
        sub = [r for r in rows if r["perturbation"] == pert]
        if clean:
            sub = [{**clean, "level": 0}, *sub]
        for pred in sub[-1]["values"]:
            ax.plot([r["level"] for r in sub], [r["values"].get(pred) for r in sub], marker="o", lw=1.2, label=pred)
        ax.set_xticks([r["level"] for r in sub], ["clean" if r["level"] == 0 else f"{r['strength']:g}" for r in sub])
        ax.set_title(pert.replace("_", " "))
        ax.set_xlabel("strength")
        ax.set_ylabel(table.get("metric", "metric"))
        if i == 0:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_per_class_recall(per_class: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Recall per class, grouped bars per predictor ({name: per-class rows})."""
    names = list(per_class)
    first = per_class[names[0]]
    k = len(first)
    width = 0.8 / max(1, len(names))
    fig = _figure(min(16.0, 3 + 0.45 * k * max(1, len(names)) ** 0.5), 3.8)
    ax = fig.add_subplot()
    x = np.arange(k)
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [r["recall"] for r in per_class[name]], width, label=name)
    ax.set_xticks(x, [str(r["label"]) for r in first], rotation=45 if k > 8 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title("recall per class")
    ax.legend(fontsize=8)
    return _save(fig, path)
