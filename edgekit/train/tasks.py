"""The task registry: what a task predicts, which data kinds it takes, how a model is selected.

Each task names the kinds of data it trains on, the size of the model's output for a prepared
data set, the validation metrics computed every epoch and the one early stopping and
best-checkpoint selection watch. Detection and segmentation register here with their own
metrics (mAP, mIoU) without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError


def _classification_metrics(out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = out.argmax(1)
    return {"accuracy": float((pred == y).mean() * 100.0),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}


def _regression_metrics(out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    out = out.reshape(len(out), -1)
    y = y.reshape(len(y), -1)
    err = out - y
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}


@dataclass(frozen=True)
class Task:
    name: str
    kinds: tuple[str, ...]
    monitor: str  # default validation metric for early stopping and the best checkpoint
    mode: str  # "max" or "min"
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    classifies: bool
    # detection/segmentation: the loss takes the targets as they are (boxes, masks) and the metrics need the
    # run's settings (strides, classes), so the run gives the trainer its own metrics function
    dense: bool = False
    selectable: tuple[str, ...] = ()  # metrics train.monitor may name besides the defaults of its kind

    def out_dim(self, y_train: np.ndarray, labels: list[str] | None) -> int:
        if self.classifies:
            return len(labels or [])
        return int(np.prod(y_train.shape[1:])) if y_train.ndim > 1 else 1


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


register(Task("classification", ("image", "sequence", "tabular"), "accuracy", "max", _classification_metrics, True))
register(Task("regression", ("image", "sequence", "tabular"), "rmse", "min", _regression_metrics, False))
register(Task("forecast", ("forecast",), "rmse", "min", _regression_metrics, False))


def _dense_metrics(out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    raise ConfigError("detection and segmentation metrics need the run's settings: use the run's metrics function")


register(Task("detection", ("image",), "map50", "max", _dense_metrics, False, dense=True, selectable=("map50", "map")))
register(Task("segmentation", ("image",), "miou", "max", _dense_metrics, False, dense=True,
              selectable=("miou", "dice")))
DENSE_TASKS = tuple(name for name, task in TASKS.items() if task.dense)
"""Tasks whose targets are boxes or masks: trained by :mod:`edgekit.train.dense`, gated on mAP/mIoU."""


def get_task(name: str, kind: str | None = None) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; edgekit trains {', '.join(sorted(TASKS))}")
    task = TASKS[name]
    if kind is not None and kind not in task.kinds:
        raise ConfigError(f"task {name!r} does not train on {kind} data (it takes {', '.join(task.kinds)}); "
                          f"set data.task or data.kind")
    return task


def monitor_mode(task: Task, monitor: str | None) -> tuple[str, str]:
    """The metric early stopping watches and its direction ("loss" is always minimised)."""
    name = monitor or task.monitor
    if name == "loss":
        return name, "min"
    if task.dense:
        if name not in task.selectable:
            raise ConfigError(f"train.monitor {name!r} is not a {task.name} metric; it has "
                              f"{', '.join(task.selectable)}, loss")
        return name, "max"
    if name in ("accuracy", "macro_f1"):
        if not task.classifies:
            raise ConfigError(f"train.monitor {name!r} is a classification metric; {task.name} has rmse, mae, loss")
        return name, "max"
    if name in ("rmse", "mae"):
        if task.classifies:
            raise ConfigError(f"train.monitor {name!r} is a regression metric; {task.name} has accuracy, "
                              f"macro_f1, loss")
        return name, "min"
    raise ConfigError(f"train.monitor {name!r} is not one of loss, accuracy, macro_f1, rmse, mae")
