"""Evaluation of trained models and bundles: metrics, baselines, robustness, slices, plots and report.md.

``evaluate(predictors, raw_test, y_test, task=..., kind=..., out_dir=...)`` runs each predictor (a torch
module with its normalization, or a signed bundle through the device runtime) on the same raw test
data and returns a JSON-ready summary; ``write_report(out_dir, summary)`` turns it into report.md
beside the PNGs.
"""

from .metrics import (baseline_metrics, calibration, classification_metrics, naive_forecasts, regression_metrics,
                      slice_metrics)
from .predictors import BundlePredictor, Predictor, TorchPredictor
from .report import evaluate, write_report
from .robustness import perturb, robustness_table

__all__ = [
    "BundlePredictor",
    "Predictor",
    "TorchPredictor",
    "baseline_metrics",
    "calibration",
    "classification_metrics",
    "evaluate",
    "naive_forecasts",
    "perturb",
    "regression_metrics",
    "robustness_table",
    "slice_metrics",
    "write_report",
]
