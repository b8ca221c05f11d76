"""Datasets for the trainer, with augmentation on the training split only.

Images use torchvision's v2 transforms; sequences get jitter, scaling, time warp and window slicing
(vectorised torch, random per sample); tabular rows a small Gaussian jitter; forecasts none.
Augmentation works on raw-scale data (``raw * scale``, e.g. 0–1 images) before the normalization, and
draws from the global torch RNG, so the trainer's per-epoch reseeding makes runs reproducible.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config.train import AugmentConfig
from .data import Prepared

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sequences
def _resample(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, L) read at fractional positions ``pos`` (B, L') by linear interpolation."""
    length = x.shape[-1]
    pos = pos.clamp(0, length - 1)
    lo = pos.floor().long().clamp(max=length - 1)
    hi = (lo + 1).clamp(max=length - 1)
    w = (pos - lo.to(pos.dtype)).unsqueeze(1)
    idx_lo = lo.unsqueeze(1).expand(-1, x.shape[1], -1)
    idx_hi = hi.unsqueeze(1).expand(-1, x.shape[1], -1)
    return torch.gather(x, 2, idx_lo) * (1 - w) + torch.gather(x, 2, idx_hi) * w


def time_warp(x: torch.Tensor, strength: float, knots: int = 4) -> torch.Tensor:
    """A smooth random warp of the time axis per sample (speeds ``1 ± strength`` at a few knots)."""
    b, _, length = x.shape
    if length < 2 or strength <= 0:
        return x
    speed = (1 + strength * torch.randn(b, 1, knots + 2)).clamp(min=0.1)
    speed = F.interpolate(speed, size=length - 1, mode="linear", align_corners=True)[:, 0]  # (B, L-1)
    pos = torch.cat([torch.zeros(b, 1), torch.cumsum(speed, dim=1)], dim=1)
    pos = pos / pos[:, -1:] * (length - 1)
    return _resample(x, pos)


def window_slice(x: torch.Tensor, keep: float) -> torch.Tensor:
    """A random window of ``keep`` of the length per sample, stretched back to the full length."""
    b, _, length = x.shape
    width = max(2, int(round(keep * length)))
    if keep >= 1 or width >= length:
        return x
    start = torch.randint(0, length - width + 1, (b, 1)).to(x.dtype)
    pos = start + torch.linspace(0, width - 1, length).unsqueeze(0)
    return _resample(x, pos)


def augment_sequences(x: torch.Tensor, cfg: AugmentConfig, channel_std: torch.Tensor, *,
                      label_preserving_only: bool = False) -> torch.Tensor:
    """Jitter (in per-channel std units), scaling, time warp, window slice of a raw batch (B, C, L).

    ``label_preserving_only`` (regression targets): jitter only.
    """
    std = channel_std.to(x.dtype).view(1, -1, 1)
    if not label_preserving_only:
        if cfg.window_slice < 1:
            x = window_slice(x, cfg.window_slice)
        if cfg.time_warp > 0:
            x = time_warp(x, cfg.time_warp)
        if cfg.scaling > 0:
            x = x * (1 + cfg.scaling * torch.randn(x.shape[0], x.shape[1], 1, dtype=x.dtype))
    if cfg.jitter > 0:
        x = x + cfg.jitter * std * torch.randn_like(x)
    return x


# ----------------------------------------------------------------------------- images
def image_transform(cfg: AugmentConfig, size: list[int], channels: int, *, color_ok: bool = True):
    """torchvision v2 pipeline for one float (C, H, W) image in 0–1, or None when nothing is on."""
    from torchvision.transforms import v2

    steps = []
    if cfg.resized_crop < 1:
        steps.append(v2.RandomResizedCrop(size=tuple(size), scale=(cfg.resized_crop, 1.0), antialias=True))
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(p=cfg.vflip))
    if cfg.rotation > 0:
        steps.append(v2.RandomRotation(degrees=cfg.rotation))
    if cfg.color_jitter > 0 and color_ok and channels in (1, 3):
        steps.append(v2.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                    saturation=cfg.color_jitter if channels == 3 else None))
    if cfg.erasing > 0:
        steps.append(v2.RandomErasing(p=cfg.erasing, value=0))
    return v2.Compose(steps) if steps else None


# ----------------------------------------------------------------------------- dataset
class PreparedDataset(Dataset):
    """``(normalized x, y)`` of one split; the training split is augmented when ``augment`` says so."""

    def __init__(self, p: Prepared, split: str, augment: AugmentConfig | None):
        self.x = p.x[split]
        self.y = p.y[split]
        self.kind = p.kind
        self.scale = float(p.norm.scale)
        shape = (-1,) + (1,) * (self.x.ndim - 2)
        self.mean = torch.tensor(p.norm.mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(p.norm.std, dtype=torch.float32).view(shape)
        self.y_dtype = torch.int64 if p.task == "classification" else torch.float32
        self.label_preserving_only = p.task != "classification"
        self.augment = augment if (split == "train" and augment is not None and augment.enabled) else None
        self.transform = None
        if self.augment is not None and self.kind == "image":
            lo, hi = float(self.x.min()) * self.scale, float(self.x.max()) * self.scale
            color_ok = lo >= 0 and hi <= 1  # v2's colour jitter clamps to 0-1
            if not color_ok and self.augment.color_jitter > 0:
                log.info("images are not in 0-1 after scaling (%.3g..%.3g): colour jitter is off", lo, hi)
            self.transform = image_transform(self.augment, list(self.x.shape[2:]), self.x.shape[1],
                                             color_ok=color_ok)
        if self.kind == "forecast":
            self.augment = None

    def __len__(self) -> int:
        return len(self.x)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.augment
        if self.kind == "image":
            return self.transform(x) if self.transform is not None else x
        if self.kind == "sequence":
            return augment_sequences(x[None], cfg, self.std.view(-1), label_preserving_only=self.label_preserving_only)[0]
        if self.kind == "tabular" and cfg.jitter > 0:
            return x + cfg.jitter * self.std * torch.randn_like(x)
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.asarray(self.x[i], dtype=np.float32)) * self.scale
        if self.augment is not None:
            x = self._augment(x)
        x = (x - self.mean) / self.std
        return x.float(), torch.as_tensor(self.y[i], dtype=self.y_dtype)


def make_dataset(p: Prepared, split: str, augment: AugmentConfig | None) -> Dataset:
    """A torch Dataset of ``split``; augmentation only on ``train``."""
    if split not in p.x:
        raise KeyError(f"no split {split!r}; have {sorted(p.x)}")
    return PreparedDataset(p, split, augment)


class _SpanCutMix:
    """CutMix along the last axis of a (B, C, L) or (B, F) batch: a span of ``1 - lam`` from a rolled partner.

    The labels mix by the span actually pasted, as torchvision's CutMix does for image boxes.
    """

    def __init__(self, alpha: float, num_classes: int):
        self.beta = torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha]))
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = x.shape[-1]
        lam = float(self.beta.sample())
        width = int(round((1 - lam) * length))
        start = int(torch.randint(0, length - width + 1, (1,)))
        mixed = x.clone()
        mixed[..., start:start + width] = x.roll(1, 0)[..., start:start + width]
        lam = 1 - width / length
        one_hot = F.one_hot(y, num_classes=self.num_classes).to(x.dtype)
        return mixed, one_hot * lam + one_hot.roll(1, 0) * (1 - lam)


def batch_mixer(augment: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on a batch ``(x, y)`` → ``(x, soft y)``; None when both are off.

    Images (B, C, H, W) use torchvision's v2 MixUp/CutMix (a random choice when both are on). Sequences
    (B, C, L) and rows (B, F) use v2's MixUp, and CutMix pastes a span of time (of features) instead of a box.
    """
    if augment is None or not augment.enabled or (augment.mixup <= 0 and augment.cutmix <= 0):
        return None
    from torchvision.transforms import v2

    def pick(choices: list) -> Callable:
        return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    mixup = v2.MixUp(alpha=augment.mixup, num_classes=num_classes) if augment.mixup > 0 else None
    image = pick([t for t in (mixup, v2.CutMix(alpha=augment.cutmix, num_classes=num_classes)
                              if augment.cutmix > 0 else None) if t is not None])

    def flat_mixup(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, soft = mixup(x.reshape(x.shape[0], -1, 1, x.shape[-1]), y)  # v2 wants image-shaped batches
        return mixed.reshape(x.shape), soft

    other = pick([t for t in (flat_mixup if mixup is not None else None,
                              _SpanCutMix(augment.cutmix, num_classes) if augment.cutmix > 0 else None)
                  if t is not None])

    def mixer(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image(x, y) if x.ndim == 4 else other(x, y)

    return mixer


__all__ = ["PreparedDataset", "augment_sequences", "batch_mixer", "image_transform", "make_dataset", "time_warp",
           "window_slice"]
