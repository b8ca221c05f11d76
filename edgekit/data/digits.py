"""scikit-learn's digits (1,797 8×8 grey images, 10 classes) as uint8 images.

The pixel values (0–16) are scaled to 0–255 so that the data behave like any
other image source: the bundle's preprocessing (scale 1/255, mean/std) is the
same whether a device reads a PNG or receives a decoded frame.
Splits are stratified and seeded: train / validation / test = 60 / 20 / 20.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = [str(i) for i in range(10)]
# mean/std of the training split's pixels after scaling to [0, 1]
MEAN = 0.3048
STD = 0.3754


@dataclass
class Split:
    images: np.ndarray  # (N, 8, 8) uint8
    labels: np.ndarray  # (N,) int64


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def splits(seed: int = 0) -> dict[str, Split]:
    """Stratified train/val/test split; the test split is never used to calibrate."""
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images()
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, test_size=0.4, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    return {name: Split(images[i], labels[i]) for name, i in (("train", train), ("val", val), ("test", test))}


def preprocess_spec() -> dict:
    """The manifest preprocessing for the digits model (runtime format)."""
    return {
        "type": "image", "color": "gray", "size": [8, 8], "resize": "stretch", "interpolation": "area",
        "scale": 1 / 255, "mean": [MEAN], "std": [STD], "layout": "NCHW", "dtype": "float32",
    }


def to_tensor(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 8, 8) → float32 (N, 1, 8, 8) through the runtime's own preprocessing."""
    from edgekit_runtime.processing import preprocess_batch

    return preprocess_batch(list(images), preprocess_spec())


def calibration(count: int = 300, seed: int = 0) -> np.ndarray:
    """Factory for build files: ``edgekit.data.digits:calibration`` (train split only)."""
    return to_tensor(splits(seed)["train"].images[:count])


def validation(seed: int = 0, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Factory for build files: ``edgekit.data.digits:validation`` → (x, y)."""
    s = splits(seed)[split]
    return to_tensor(s.images), s.labels
