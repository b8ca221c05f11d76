"""A small CNN for scikit-learn's 8×8 digits: the built-in example model."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """conv-bn-relu ×3 with one 2×2 pool, global average pool, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _block(1, width),
            _block(width, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            _block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def build(num_classes: int = 10, width: int = 32) -> DigitsCNN:
    """Factory used by build files: ``edgekit.models.digits_cnn:build``."""
    return DigitsCNN(num_classes=num_classes, width=width)


# (block whose ReLU output gets the outlier channel, that channel): block 0 feeds the second conv,
# block 4 feeds (through the average pool) the classifier
OUTLIERS = ((0, 3), (4, 5))


def with_outliers(state: dict, scale: float = 100.0) -> dict:
    """A state dict of :class:`DigitsCNN` computing the same function with a few activations ``scale`` × larger.

    A channel's BatchNorm scale and shift grow by ``scale`` (ReLU commutes with a positive factor) and the
    next layer's weights for it shrink by as much. Per-channel weights absorb both changes; one per-tensor
    activation scale cannot: the other channels of that tensor fall into a handful of INT8 steps, and only
    the layers reading or writing it are to blame. The mixed-precision tests and benchmark quantize it.
    """
    state = {k: v.clone() for k, v in state.items()}
    consumer = {0: "features.1.0.weight", 4: "classifier.weight"}
    with torch.no_grad():
        for block, ch in OUTLIERS:
            state[f"features.{block}.1.weight"][ch] *= scale
            state[f"features.{block}.1.bias"][ch] *= scale
            state[consumer[block]][:, ch] /= scale
    return state
