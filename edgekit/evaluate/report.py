"""Evaluate predictors on a test split (metrics, baselines, robustness, slices, worst examples, PNGs)
and write the run's ``report.md`` beside the PNGs."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CalibrationError, ConfigError
from .plots import (plot_confusion_matrix, plot_learning_curves, plot_per_class_recall, plot_predicted_vs_actual,
                    plot_reliability, plot_robustness, plot_worst_images, plot_worst_series)
from .metrics import TASKS, baseline_metrics, class_names, compute, headline, score, slice_metrics, to_probabilities
from .robustness import robustness_table

log = logging.getLogger(__name__)

N_WORST = 16


def evaluate(predictors: Sequence[Any], raw: np.ndarray, y: np.ndarray, *, task: str, kind: str,
             labels: Sequence[str] | None = None, meta: np.ndarray | None = None, season: int | None = None,
             history: Sequence[Mapping[str, Any]] | None = None, out_dir: Path, robustness: bool = True,
             seed: int = 0, n_worst: int = N_WORST) -> dict[str, Any]:
    """Evaluate each predictor on the same raw test data; write the PNGs into ``out_dir``.

    Returns a JSON-ready dict: "task", "kind", "n", "labels", "predictors" (names in order),
    "metrics" ({name: metrics}), "primary" (the first predictor's metrics: what metrics.json reports),
    "baselines" (forecast: naive / seasonal_naive), "robustness" (table or None), "slices"
    ({name: rows} when ``meta`` is given), "worst" (the first predictor's highest-loss examples) and
    "plots" (file names relative to ``out_dir``).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", hint=f"use one of {', '.join(TASKS)}")
    if not predictors:
        raise ConfigError("nothing to evaluate: no predictors given")
    names = [p.name for p in predictors]
    if len(set(names)) != len(names):
        raise ConfigError(f"predictor names must differ to be compared side by side, got {names}",
                          hint="give each model or bundle its own name")
    raw, y = np.asarray(raw), np.asarray(y)
    if len(raw) != len(y) or len(raw) == 0:
        raise CalibrationError(f"{len(raw)} test inputs for {len(y)} targets",
                               hint="pass the raw test inputs and their targets (the same number, at least one)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    outputs = {p.name: p.predict(raw) for p in predictors}
    metrics = {name: compute(task, out, y, labels) for name, out in outputs.items()}
    first = names[0]
    result: dict[str, Any] = {"task": task, "kind": kind, "n": int(len(y)), "predictors": names,
                              "metric": headline(task)[0], "metrics": metrics, "primary": metrics[first]}
    if task == "classification":
        k = outputs[first].shape[1]
        result["labels"] = class_names(k, labels)
    else:
        result["labels"] = None
    result["baselines"] = _baselines(task, raw, y, season)
    result["season"] = season
    if robustness:
        clean = {name: score(task, out, y) for name, out in outputs.items()}
        result["robustness"] = robustness_table(predictors, raw, y, task=task, kind=kind, seed=seed, clean=clean)
    else:
        result["robustness"] = None
    result["slices"] = ({name: slice_metrics(meta, y, out, task) for name, out in outputs.items()}
                        if meta is not None else None)
    result["worst"] = _worst(task, outputs[first], y, result["labels"], n_worst)
    result["plots"] = _plots(result, outputs, raw, y, history, out_dir)
    return _jsonable(result)


def _baselines(task: str, raw: np.ndarray, y: np.ndarray, season: int | None) -> dict[str, Any] | None:
    if task != "forecast":
        return None
    if raw.ndim != 3:
        log.info("no naive baselines: forecast inputs are not windows (N, C, lookback)")
        return None
    return baseline_metrics(raw, y, season)


def _worst(task: str, out: np.ndarray, y: np.ndarray, labels: list[str] | None, n: int) -> list[dict[str, Any]]:
    """The ``n`` highest-loss samples: cross-entropy (classification) or mean absolute error."""
    if task == "classification":
        probs = to_probabilities(out)
        yi = y.astype(np.int64)
        loss = -np.log(np.clip(probs[np.arange(len(yi)), yi], 1e-12, 1.0))
        pred = probs.argmax(axis=1)
        order = np.argsort(-loss, kind="stable")[:n]
        return [{"index": int(i), "true": labels[yi[i]] if labels else int(yi[i]),
                 "pred": labels[pred[i]] if labels else int(pred[i]), "loss": float(loss[i]),
                 "confidence": float(probs[i, pred[i]])} for i in order]
    yy = y.astype(np.float64).reshape(len(y), -1)
    pp = np.asarray(out, np.float64).reshape(len(y), -1)
    loss = np.mean(np.abs(pp - yy), axis=1)
    order = np.argsort(-loss, kind="stable")[:n]
    return [{"index": int(i), "true": _short(yy[i]), "pred": _short(pp[i]), "loss": float(loss[i])} for i in order]


def _short(v: np.ndarray) -> float | list[float]:
    return float(v[0]) if v.size == 1 else [float(x) for x in v]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "model"


def _plots(result: dict[str, Any], outputs: dict[str, np.ndarray], raw: np.ndarray, y: np.ndarray,
           history: Sequence[Mapping[str, Any]] | None, out_dir: Path) -> dict[str, Any]:
    task, kind, metrics = result["task"], result["kind"], result["metrics"]
    files: dict[str, Any] = {}

    def rel(path: Path) -> str:
        return Path(path).relative_to(out_dir).as_posix()

    if task == "classification":
        files["confusion"] = {}
        for name, m in metrics.items():
            path = plot_confusion_matrix(m["confusion"], result["labels"], out_dir / f"confusion_{_slug(name)}.png",
                                          title=f"confusion matrix: {name}")
            files["confusion"][name] = rel(path)
        files["reliability"] = rel(plot_reliability(metrics, out_dir / "reliability.png"))
        files["per_class_recall"] = rel(plot_per_class_recall({n: m["per_class"] for n, m in metrics.items()},
                                                               out_dir / "per_class_recall.png"))
    else:
        files["predicted_vs_actual"] = rel(plot_predicted_vs_actual(
            y, {n: np.asarray(o).reshape(y.shape) for n, o in outputs.items()}, out_dir / "predicted_vs_actual.png"))
    if history:
        files["learning_curves"] = rel(plot_learning_curves(history, out_dir / "learning_curves.png"))
    if result["worst"]:
        if kind == "image" and raw.ndim == 4:
            files["worst"] = rel(plot_worst_images(raw, result["worst"], out_dir / "worst_examples.png"))
        elif raw.ndim in (2, 3):
            first = outputs[result["predictors"][0]]
            files["worst"] = rel(plot_worst_series(raw, result["worst"], out_dir / "worst_examples.png", task=task,
                                                    y=y.reshape(len(y), -1), pred=np.asarray(first).reshape(len(y), -1)))
    if result.get("robustness"):
        files["robustness"] = rel(plot_robustness(result["robustness"], out_dir / "robustness.png"))
    return files


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf floats become None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- report.md
PERCENT_KEYS = {"accuracy", "mape"}
CLASSIFICATION_ROWS = [("accuracy", "accuracy (%)"), ("macro_precision", "macro precision"),
                       ("macro_recall", "macro recall"), ("macro_f1", "macro F1"),
                       ("weighted_precision", "weighted precision"), ("weighted_recall", "weighted recall"),
                       ("weighted_f1", "weighted F1"), ("roc_auc_ovr", "ROC-AUC (one-vs-rest)"),
                       ("ece", "ECE (15 bins)")]
REGRESSION_ROWS = [("rmse", "RMSE"), ("mae", "MAE"), ("mape", "MAPE (%, non-zero targets)"), ("r2", "R²")]


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "–"
        if key in PERCENT_KEYS:
            return f"{v:.2f}"
        if v == 0 or 1e-3 <= abs(v) <= 1:
            return f"{v:.4f}"
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _image(title: str, file: str | None) -> list[str]:
    return [f"![{title}]({file})", ""] if file else []


def write_report(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.md`` from the trainer's summary (any key may be missing); returns its path.

    ``summary``: {"run", "task", "kind", "arch", "seed", "world_size", "epochs_run", "best_epoch",
    "split_report", "evaluation": :func:`evaluate`'s result, "notes": [...]}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev: Mapping[str, Any] = summary.get("evaluation") or {}
    task = summary.get("task") or ev.get("task")
    kind = summary.get("kind") or ev.get("kind")
    lines = [f"# Evaluation report: {summary.get('run') or out_dir.name}", ""]
    facts = [("task", task), ("data kind", kind), ("architecture", summary.get("arch")),
             ("seed", summary.get("seed")), ("processes (world size)", summary.get("world_size")),
             ("epochs run", summary.get("epochs_run")), ("best epoch", summary.get("best_epoch")),
             ("test samples", ev.get("n")), ("evaluated", ", ".join(ev.get("predictors") or []) or None)]
    lines += _table(["", ""], [(k, _fmt(v)) for k, v in facts if v is not None])
    lines += _split_section(summary.get("split_report"))
    if ev:
        lines += _metrics_section(ev, task)
        lines += _baseline_section(ev)
        lines += _per_class_section(ev)
        lines += _calibration_section(ev)
        plots_ = ev.get("plots") or {}
        if plots_.get("learning_curves"):
            lines += ["## Learning curves", "", *_image("learning curves", plots_["learning_curves"])]
        lines += _robustness_section(ev)
        lines += _slices_section(ev)
        lines += _worst_section(ev, task)
    else:
        lines += ["No evaluation was run.", ""]
    return save_report(out_dir, lines, summary.get("notes"))


def save_report(out_dir: Path, lines: Sequence[str], notes: Sequence[str] | None = None) -> Path:
    """``out_dir/report.md``: ``lines``, then a Notes section where there are notes; returns its path."""
    lines = list(lines)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _split_section(split: Mapping[str, Any] | None) -> list[str]:
    if not split:
        return []
    lines = ["## Data split", ""]
    if split.get("method"):
        lines += [f"Method: **{split['method']}**.", ""]
    sizes = split.get("sizes")
    if isinstance(sizes, Mapping) and sizes:
        lines += _table(["split", "samples"], [(k, v) for k, v in sizes.items()])
    rest = {k: v for k, v in split.items() if k not in ("method", "sizes")
            and isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    lines += [f"- {k}: {_fmt(v)}" for k, v in rest.items()]
    return lines + ([""] if rest else [])


def _metrics_section(ev: Mapping[str, Any], task: str | None) -> list[str]:
    metrics: Mapping[str, Mapping[str, Any]] = ev.get("metrics") or {}
    if not metrics:
        return []
    names = list(metrics)
    rows_spec = CLASSIFICATION_ROWS if task == "classification" else REGRESSION_ROWS
    rows = [[label, *[_fmt(metrics[n].get(key), key) for n in names]] for key, label in rows_spec
            if any(metrics[n].get(key) is not None for n in names)]
    lines = ["## Test metrics", ""] + _table(["metric", *names], rows)
    steps = {n: m.get("mae_by_step") for n, m in metrics.items() if m.get("mae_by_step")}
    if steps:
        horizon = max(len(v) for v in steps.values())
        lines += ["MAE per horizon step:", ""]
        lines += _table(["step", *steps], [[str(i + 1), *[_fmt(v[i] if i < len(v) else None) for v in steps.values()]]
                                           for i in range(horizon)])
    return lines


def _baseline_section(ev: Mapping[str, Any]) -> list[str]:
    base = ev.get("baselines")
    metrics = ev.get("metrics") or {}
    if not base:
        return []
    season = ev.get("season")
    titles = {"naive": "naive (last value)", "seasonal_naive": f"seasonal naive (season {season})"}
    rows = [[n, *[_fmt(m.get(k), k) for k in ("rmse", "mae", "mape")]] for n, m in metrics.items()]
    rows += [[titles.get(b, b), *[_fmt(m.get(k), k) for k in ("rmse", "mae", "mape")]] for b, m in base.items()]
    lines = ["## Baselines", ""] + _table(["forecast", "RMSE", "MAE", "MAPE (%)"], rows)
    if metrics:
        name, m = next(iter(metrics.items()))
        ref_name = "seasonal_naive" if "seasonal_naive" in base else "naive"
        ref = base[ref_name].get("mae")
        if m.get("mae") is not None and ref is not None:
            verdict = "beats" if m["mae"] < ref else "does not beat"
            lines += [f"{name} {verdict} the {titles[ref_name]} baseline on MAE "
                      f"({_fmt(m['mae'])} vs {_fmt(ref)}).", ""]
    return lines


def _per_class_section(ev: Mapping[str, Any]) -> list[str]:
    metrics = ev.get("metrics") or {}
    per_class = {n: m["per_class"] for n, m in metrics.items() if m.get("per_class")}
    if not per_class:
        return []
    names = list(per_class)
    first = per_class[names[0]]
    multi = len(names) > 1
    header = ["class", "support", "precision", *([f"recall ({n})" for n in names] if multi else ["recall"]), "F1"]
    rows = []
    for i, r in enumerate(first):
        recalls = [_fmt(per_class[n][i]["recall"]) if i < len(per_class[n]) else "–" for n in names]
        rows.append([str(r.get("label", r.get("class"))), _fmt(r.get("support")), _fmt(r.get("precision")),
                     *recalls, _fmt(r.get("f1"))])
    lines = ["## Per class", ""]
    if multi:
        lines += [f"Precision and F1 of {names[0]}; recall of each model.", ""]
    lines += _table(header, rows)
    plots_ = ev.get("plots") or {}
    lines += _image("recall per class", plots_.get("per_class_recall"))
    for name, file in (plots_.get("confusion") or {}).items():
        lines += _image(f"confusion matrix: {name}", file)
    return lines


def _calibration_section(ev: Mapping[str, Any]) -> list[str]:
    metrics = ev.get("metrics") or {}
    eces = {n: m.get("ece") for n, m in metrics.items() if m.get("ece") is not None}
    if not eces:
        return []
    lines = ["## Calibration", "", "Expected calibration error of the top-1 confidence (15 equal-width bins; "
             "0 is perfectly calibrated).", ""]
    lines += _table(["model", "ECE"], [[n, _fmt(v)] for n, v in eces.items()])
    return lines + _image("reliability diagram", (ev.get("plots") or {}).get("reliability"))


def _robustness_section(ev: Mapping[str, Any]) -> list[str]:
    table = ev.get("robustness")
    if not table or not table.get("rows"):
        return []
    names = list(table["rows"][0]["values"])
    metric = table.get("metric", "metric")
    better = "higher" if table.get("higher_is_better", True) else "lower"
    lines = ["## Robustness", "",
             f"{metric} ({better} is better) under perturbations of the test inputs"
             f" ({table.get('n', '?')} samples, seeded).", ""]
    rows = [[r["perturbation"].replace("_", " "), "–" if r["perturbation"] == "clean" else _fmt(r["strength"]),
             *[_fmt(r["values"].get(n), metric) for n in names]] for r in table["rows"]]
    lines += _table(["perturbation", "strength", *names], rows)
    return lines + _image("robustness", (ev.get("plots") or {}).get("robustness"))


def _slices_section(ev: Mapping[str, Any]) -> list[str]:
    slices = ev.get("slices")
    if not slices:
        return []
    lines = ["## Slices", ""]
    for name, rows in slices.items():
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("slice", "n")]
        lines += [f"{name}:", ""]
        lines += _table(["slice", "n", *keys], [[r["slice"], _fmt(r["n"]), *[_fmt(r.get(k), k) for k in keys]]
                                                for r in rows])
    return lines


def _worst_section(ev: Mapping[str, Any], task: str | None) -> list[str]:
    worst = ev.get("worst") or []
    if not worst:
        return []
    name = (ev.get("predictors") or ["the model"])[0]
    lines = ["## Worst examples", "", f"The test samples with the highest loss under {name}.", ""]
    if task == "classification":
        rows = [[_fmt(w["index"]), _fmt(w["true"]), _fmt(w["pred"]), _fmt(w.get("confidence")), _fmt(w["loss"])]
                for w in worst]
        lines += _table(["index", "true", "predicted", "confidence", "loss"], rows)
    else:
        lines += _table(["index", "MAE"], [[_fmt(w["index"]), _fmt(w["loss"])] for w in worst])
    return lines + _image("worst examples", (ev.get("plots") or {}).get("worst"))
