"""The headline metric under input perturbations at three strengths (plus clean), seeded.

Images ((N, C, H, W), uint8 or float in any range): Gaussian noise, blur, rotation, brightness,
contrast; strengths are fractions of the data's own range (min to max), results stay in that range. Series (N, C, L), forecast windows and tabular rows (N, F): Gaussian noise and offset in
per-channel standard deviations, and sample dropout (a dropped sample holds the previous value,
as a sensor that missed a reading does; tabular: the feature is zeroed).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CalibrationError
from .metrics import headline, score

log = logging.getLogger(__name__)

# perturbation -> strengths (weakest first), per data family
IMAGE_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.16),  # std, fraction of the data's range
    "blur": (0.5, 1.0, 1.5),  # Gaussian sigma in pixels
    "rotation": (10.0, 20.0, 30.0),  # degrees
    "brightness": (0.1, 0.2, 0.3),  # added, fraction of the data's range
    "contrast": (0.8, 0.6, 0.4),  # factor around each image's mean
}
SERIES_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.1, 0.25, 0.5),  # std, in per-channel std units
    "dropout": (0.05, 0.1, 0.2),  # fraction of samples lost
    "offset": (0.25, 0.5, 1.0),  # added, in per-channel std units
}
MAX_SAMPLES = 2000


def levels_for(kind: str) -> dict[str, tuple[float, ...]]:
    """The perturbations and strengths used for a data kind."""
    return IMAGE_LEVELS if kind == "image" else SERIES_LEVELS


def perturb(raw: np.ndarray, kind: str, perturbation: str, strength: float,
            rng: np.random.Generator) -> np.ndarray:
    """A perturbed copy of ``raw`` with the same shape and dtype."""
    table = levels_for(kind)
    if perturbation not in table:
        raise CalibrationError(f"no perturbation {perturbation!r} for {kind} data",
                               hint=f"use one of {', '.join(table)}")
    if kind == "image":
        return _perturb_images(raw, perturbation, strength, rng)
    return _perturb_series(raw, perturbation, strength, rng)


def _value_range(raw: np.ndarray) -> tuple[float, float, float]:
    """``lo``, ``hi`` and the span of the image data (span 1.0 when the data is constant)."""
    lo, hi = float(np.min(raw)), float(np.max(raw))
    return lo, hi, (hi - lo) or 1.0


def _per_plane(raw: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.empty_like(raw)
    for i in range(raw.shape[0]):
        for c in range(raw.shape[1]):
            out[i, c] = fn(raw[i, c])
    return out


def _perturb_images(raw: np.ndarray, name: str, s: float, rng: np.random.Generator) -> np.ndarray:
    import cv2

    if raw.ndim != 4:
        raise CalibrationError(f"images must be (N, C, H, W), got shape {raw.shape}")
    lo, hi, span = _value_range(raw)
    x = raw.astype(np.float32)
    if name == "gaussian_noise":
        x = x + rng.normal(0.0, s * span, size=x.shape).astype(np.float32)
    elif name == "brightness":
        x = x + s * span
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + (x - mean) * s
    elif name == "blur":
        x = _per_plane(x, lambda p: cv2.GaussianBlur(p, (0, 0), sigmaX=s, borderType=cv2.BORDER_REFLECT))
    elif name == "rotation":
        h, w = x.shape[2:]
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), s, 1.0)
        x = _per_plane(x, lambda p: cv2.warpAffine(p, m, (w, h), flags=cv2.INTER_LINEAR,
                                                   borderMode=cv2.BORDER_CONSTANT, borderValue=lo))
    x = np.clip(x, lo, hi)
    return np.rint(x).astype(np.uint8) if raw.dtype == np.uint8 else x.astype(raw.dtype)


def _perturb_series(raw: np.ndarray, name: str, s: float, rng: np.random.Generator) -> np.ndarray:
    if raw.ndim not in (2, 3):
        raise CalibrationError(f"series must be (N, C, L) and tabular rows (N, F), got shape {raw.shape}")
    x = raw.astype(np.float64)
    axes = (0, 2) if x.ndim == 3 else (0,)
    std = x.std(axis=axes, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    if name == "gaussian_noise":
        x = x + rng.normal(0.0, 1.0, size=x.shape) * s * std
    elif name == "offset":
        x = x + s * std
    elif name == "dropout":
        lost = rng.random(x.shape[:1] + x.shape[2:] if x.ndim == 3 else x.shape) < s
        if x.ndim == 2:
            x = np.where(lost, 0.0, x)
        else:  # (N, L) mask, all channels at once: hold the last kept sample (the first sample is never lost)
            lost[:, 0] = False
            idx = np.where(lost, 0, np.arange(x.shape[2])[None, :])
            idx = np.maximum.accumulate(idx, axis=1)
            x = np.take_along_axis(x, np.broadcast_to(idx[:, None, :], x.shape), axis=2)
    return x.astype(raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float32)


def robustness_table(predictors: Sequence[Any], raw: np.ndarray, y: np.ndarray, *, task: str, kind: str,
                     seed: int = 0, clean: dict[str, float] | None = None,
                     max_samples: int = MAX_SAMPLES) -> dict[str, Any]:
    """The headline metric of each predictor per perturbation and strength.

    Every predictor sees the same perturbed inputs. At most ``max_samples`` test samples (a seeded
    subset) are used. ``clean``: the clean scores when already computed on the same samples.
    Returns {"metric", "higher_is_better", "n", "rows": [{"perturbation", "level", "strength",
    "values": {predictor name: value}}]} with a "clean" row first.
    """
    raw = np.asarray(raw)
    y = np.asarray(y)
    if len(raw) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(raw), max_samples, replace=False))
        raw, y, clean = raw[keep], y[keep], None
    metric, higher = headline(task)
    if clean is None:
        clean = {p.name: score(task, p.predict(raw), y) for p in predictors}
    rows = [{"perturbation": "clean", "level": 0, "strength": 0.0, "values": dict(clean)}]
    for pi, (name, strengths) in enumerate(levels_for(kind).items()):
        for level, strength in enumerate(strengths, start=1):
            rng = np.random.default_rng([seed, pi, level])
            x = perturb(raw, kind, name, strength, rng)
            rows.append({"perturbation": name, "level": level, "strength": float(strength),
                         "values": {p.name: score(task, p.predict(x), y) for p in predictors}})
    log.debug("robustness: %d rows on %d samples", len(rows), len(raw))
    return {"metric": metric, "higher_is_better": higher, "n": int(len(raw)), "rows": rows}
