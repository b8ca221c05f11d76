"""Training losses: cross-entropy, focal loss and class weights for imbalance; MSE/Huber on standardized targets.

Regression and forecast models output real units (see :mod:`edgekit.train.models`); the trainer
computes their loss on standardized values, ``loss(standardize(pred, s), standardize(y, s))``,
so the loss scale does not depend on the targets' units.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

CLASSIFICATION_LOSSES = ("cross_entropy", "focal")
REGRESSION_LOSSES = ("mse", "huber")
WEIGHT_MODES = ("inverse", "inverse_sqrt", "effective")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) on logits: ``-sum_c w_c (1 - p_c)^gamma t_c log p_c``, averaged.

    ``target``: class indices (int64, (N,)) or class probabilities (float, (N, C), e.g. from MixUp).
    With ``gamma=0`` it equals ``nn.CrossEntropyLoss(weight, label_smoothing)`` for both target forms
    (hard targets with weights are averaged over the samples' weights, as cross-entropy does).
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | Sequence[float] | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0, got {gamma}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        logp = F.log_softmax(logits.float(), dim=1)
        hard = not target.is_floating_point()
        t = F.one_hot(target, num_classes).float() if hard else target.float()
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        w = self.weight if self.weight is not None else logp.new_ones(num_classes)
        mod = (1 - logp.exp()).clamp(min=0).pow(self.gamma) if self.gamma else 1.0
        per_sample = -(w * mod * t * logp).sum(dim=1)
        if hard and self.weight is not None:
            return per_sample.sum() / self.weight[target].sum()
        return per_sample.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}, weighted={self.weight is not None}"


def make_loss(task: str, *, name: str = "auto", class_weights: np.ndarray | Sequence[float] | None = None,
              focal_gamma: float = 2.0, label_smoothing: float = 0.0) -> nn.Module:
    """The loss for ``task``; ``auto``: cross-entropy for classification, MSE for regression and forecast.

    Classification losses take logits and class indices or probabilities; regression losses take
    standardized predictions and targets (see :func:`standardize`).
    """
    if task == "classification":
        name = "cross_entropy" if name == "auto" else name
        if name not in CLASSIFICATION_LOSSES:
            raise ConfigError(f"loss {name!r} does not fit classification; use one of "
                              f"{', '.join(CLASSIFICATION_LOSSES)}")
        weight = None if class_weights is None else torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
        if name == "focal":
            return FocalLoss(focal_gamma, weight=weight, label_smoothing=label_smoothing)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if task in ("regression", "forecast"):
        name = "mse" if name == "auto" else name
        if name not in REGRESSION_LOSSES:
            raise ConfigError(f"loss {name!r} does not fit {task}; use one of {', '.join(REGRESSION_LOSSES)}")
        if class_weights is not None:
            raise ConfigError(f"class weights apply to classification, not {task}; set loss.class_weights: none")
        if label_smoothing:
            raise ConfigError(f"label smoothing applies to classification, not {task}; set optim.label_smoothing: 0")
        # Huber's delta is one standard deviation of the (standardized) targets.
        return nn.MSELoss() if name == "mse" else nn.HuberLoss(delta=1.0)
    raise ConfigError(f"no loss for task {task!r}; tasks: classification, regression, forecast")


def class_weights(y: np.ndarray, num_classes: int, mode: str = "inverse_sqrt") -> np.ndarray:
    """Per-class loss weights from the training labels, larger for rarer classes, with mean 1.

    ``inverse``: 1/n; ``inverse_sqrt``: 1/sqrt(n); ``effective``: (1 - beta)/(1 - beta^n) with beta 0.999
    (effective number of samples, Cui et al., 2019). A class absent from ``y`` counts as one sample.
    """
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"class weight mode {mode!r} is unknown; modes: {', '.join(WEIGHT_MODES)}")
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes)):
        raise ConfigError(f"class weights need integer labels in [0, {num_classes}) as a 1-D array")
    counts = np.maximum(np.bincount(y, minlength=num_classes), 1).astype(np.float64)
    if mode == "inverse":
        w = 1.0 / counts
    elif mode == "inverse_sqrt":
        w = 1.0 / np.sqrt(counts)
    else:
        beta = 0.999
        w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return (w * num_classes / w.sum()).astype(np.float32)


def fit_y_stats(y: np.ndarray, per_output: bool = True) -> tuple[list[float], list[float]]:
    """(mean, std) of training targets (N,) or (N, T): per output column, or one pair for all (forecasts)."""
    y = np.asarray(y, dtype=np.float64)
    y2 = y.reshape(len(y), -1)
    if per_output:
        mean, std = y2.mean(axis=0), y2.std(axis=0)
    else:
        mean, std = np.array([y2.mean()]), np.array([y2.std()])
    std = np.where(std > 1e-12, std, 1.0)  # a constant target: keep its units
    return [float(v) for v in mean], [float(v) for v in std]


def standardize(t: torch.Tensor, y_stats: tuple[Sequence[float], Sequence[float]] | None) -> torch.Tensor:
    """``(t - mean) / std`` over the last axis (a scalar or per-output stats); ``t`` as is when there are none."""
    if y_stats is None:
        return t
    mean = torch.as_tensor(y_stats[0], dtype=t.dtype, device=t.device)
    std = torch.as_tensor(y_stats[1], dtype=t.dtype, device=t.device)
    if t.dim() == 1 and mean.numel() == 1:
        mean, std = mean.reshape(()), std.reshape(())
    return (t - mean) / std


__all__ = ["FocalLoss", "class_weights", "fit_y_stats", "make_loss", "standardize"]
