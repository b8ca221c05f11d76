"""A run folder as a model source: ``edgekit compile runs/NAME --target T``.

The run remembers its model (``model.pt``: architecture, shapes, labels, the fitted
preprocessing) and its data (``train.yaml`` + the data's sha256 in ``metrics.json``). The
build calibrates on the training split and gates the accuracy budget on the validation
split (top-1 for classifiers; MAE in the target's units for regression and forecasts, by default
at most 5 % of the targets' standard deviation worse than FP32); the test split stays untouched
for the report. ``--calibration``/``--validation``
override either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .tasks import DENSE_TASKS

CALIBRATION_SAMPLES = 300
# regression/forecast runs: the MAE budget as a share of the training targets' standard deviation
REGRESSION_BUDGET = 0.05


def is_run_folder(path: str | Path | None) -> bool:
    """A folder with ``model.pt`` (a finished run also has ``metrics.json``; see :func:`read_meta`)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "model.pt").is_file()


def read_meta(run_dir: Path) -> dict[str, Any]:
    """model.pt's metadata (everything but the weights)."""
    from .models import read_checkpoint

    if not (run_dir / "model.pt").is_file():
        raise ConfigError(f"{run_dir} is not a finished run: it has no model.pt (train it with edgekit train)")
    if not (run_dir / "metrics.json").is_file():
        raise ConfigError(f"{run_dir} has not finished training (no metrics.json): let it finish, or continue "
                          f"it with edgekit train --resume")
    return {k: v for k, v in read_checkpoint(run_dir / "model.pt").items() if k != "model"}


def build_settings(run_dir: Path) -> dict[str, Any]:
    """Build-file settings for compiling ``run_dir`` (flags and a build file override them)."""
    run_dir = Path(run_dir).resolve()
    meta = read_meta(run_dir)
    if meta["task"] in DENSE_TASKS:
        return _dense_settings(run_dir, meta)
    classifies = meta["task"] == "classification"
    labels = meta.get("labels")
    data = {"source": "edgekit.train.data:split_arrays"}
    settings: dict[str, Any] = {
        "model": {
            "source": "edgekit.train.models:from_checkpoint",
            "kwargs": {"path": str(run_dir / "model.pt")},
            "checkpoint": str(run_dir / "model.pt"),
            "name": meta.get("name") or run_dir.name,
            "input_shape": [1, *meta["input_shape"]],
            "labels": labels if classifies else None,
        },
        "preprocess": meta["preprocess"],
        "postprocess": ({"type": "classification", "softmax": True, "top_k": min(5, len(labels or [1]))}
                        if classifies else {"type": "none"}),
        # evenly spaced over the training split (every class), not its first samples
        "calibration": {**data, "kwargs": {"run": str(run_dir), "split": "train", "labels": False,
                                           "count": CALIBRATION_SAMPLES}},
    }
    settings["validation"] = {**data, "kwargs": {"run": str(run_dir), "split": "val"}}
    # the optimize passes (pruning, distillation) fine-tune with this run's splits and recipe
    settings["finetune"] = {"run": str(run_dir)}
    if not classifies:
        # gated on the validation MAE in the target's units: INT8 may add at most 5 % of the target's spread
        std = meta.get("y_stats")[1] if meta.get("y_stats") else [1.0]
        settings["accuracy"] = {"metric": "mae",
                                "max_accuracy_drop": round(REGRESSION_BUDGET * float(sum(std) / len(std)), 6)}
    return settings


# detection/segmentation runs: INT8 may lose at most this many mAP50 / mIoU points against FP32
DENSE_BUDGET = 1.0


def _dense_settings(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A detection or segmentation run: calibrated on its training images, gated on mAP50 (mIoU) of its
    validation split, scored through the device's own decode and NMS; the bundle carries the run's
    letterbox preprocessing and its post-processing."""
    data = {"source": "edgekit.train.dense_data:run_arrays"}
    return {
        "model": {"source": "edgekit.train.models:from_checkpoint", "kwargs": {"path": str(run_dir / "model.pt")},
                  "checkpoint": str(run_dir / "model.pt"), "name": meta.get("name") or run_dir.name,
                  "input_shape": [1, *meta["input_shape"]], "labels": meta.get("labels")},
        "preprocess": meta["preprocess"],
        "postprocess": meta["postprocess"],
        "calibration": {**data, "kwargs": {"run": str(run_dir), "split": "train", "labels": False,
                                           "count": CALIBRATION_SAMPLES}},
        "validation": {**data, "kwargs": {"run": str(run_dir), "split": "val"}},
        "accuracy": {"metric": "map50" if meta["task"] == "detection" else "miou", "max_accuracy_drop": DENSE_BUDGET},
    }


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """``run_dir/metrics.json`` (numpy scalars and arrays, paths written as JSON values)."""
    import json

    from edgekit_runtime.fileio import atomic_write

    atomic_write(Path(run_dir) / "metrics.json", json.dumps(metrics, indent=2, default=json_default).encode(),
                 durable=False)


def json_default(o: Any) -> Any:
    """``json.dumps(default=)`` for metrics.json: numpy scalars and arrays, paths."""
    if isinstance(o, np.generic):  # np.integer → int, np.floating → float, np.bool_ → bool
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
