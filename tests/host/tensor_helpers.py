"""A tiny 1-D CNN and a synthetic 3-class sequence set, importable by a build as ``tensor_helpers:build``.

The windows come in raw "sensor units" (per-channel offsets and scales far from 0/1),
so a bundle whose manifest lacked the fitted normalisation would misclassify them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

CHANNELS, LENGTH, CLASSES = 3, 64, 3
OFFSET = np.array([500.0, -2.0, 40.0])  # e.g. an ADC count, a gyroscope, a temperature
SPREAD = np.array([120.0, 0.05, 8.0])


def build(channels: int = CHANNELS, classes: int = CLASSES, width: int = 16) -> nn.Module:
    """Conv1d-BN-ReLU ×2, global average pooling, Linear: (N, channels, L) → (N, classes) logits."""
    return nn.Sequential(
        nn.Conv1d(channels, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, classes),
    )


def windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw float64 windows (n, 3, 64) and labels: class k is a sine of frequency 2+3k cycles with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    t = np.arange(LENGTH) / LENGTH
    freq = (2 + 3 * y)[:, None, None] * rng.uniform(0.9, 1.1, (n, CHANNELS, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, CHANNELS, 1))
    x = np.sin(2 * np.pi * freq * t + phase) + rng.normal(0, 0.3, (n, CHANNELS, LENGTH))
    return x * SPREAD[None, :, None] + OFFSET[None, :, None], y.astype(np.int64)


def fit_normalization(raw: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over the samples and time (axis 1 is the channel)."""
    return raw.mean(axis=(0, 2)).tolist(), raw.std(axis=(0, 2)).tolist()


def train(x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Adam on normalised float32 windows, batch 32; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()
