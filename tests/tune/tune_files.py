"""Tune files for the tests: trials that train and compile in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TARGET = "onnxruntime-cpu"


def tune_settings(data: Path, **extra: Any) -> dict[str, Any]:
    """A tune file whose trials are tiny: ResNetSmall 8/16 wide, 1–2 epochs, one fine-tuning epoch after pruning."""
    doc: dict[str, Any] = {
        "train": str(REPO / "examples" / "digits-train.yaml"),
        "fixed": {
            "train": {"data.path": str(data), "model.kwargs": {"widths": [8, 16]}, "train.batch_size": 64,
                      "optim.schedule": "constant", "optim.warmup_epochs": 0, "augment.enabled": False},
            "compile": {"prune.finetune_epochs": 1, "prune.round_to": 4, "accuracy.max_accuracy_drop": 30,
                        "quantize.qat": "off"},
        },
        "search": {
            "train": {"optim.lr": {"log_float": [0.005, 0.03]}, "train.epochs": {"int": [1, 2]}},
            "compile": {"prune.ratio": {"float": [0.0, 0.6]}},
        },
        "objectives": {"budgets_ms": [0.02, 0.05, 1.0]},
        "pruner": {"startup_trials": 4},
        "sampler": {"startup_trials": 4},
        "heartbeat_s": 2,
        "grace_s": 6,
    }
    for key, value in extra.items():
        doc[key] = value
    return doc


def write_tune(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
