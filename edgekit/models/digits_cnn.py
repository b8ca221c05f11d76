"""A small CNN for scikit-learn's 8×8 digits: the built-in example model."""

from __future__ import annotations

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
