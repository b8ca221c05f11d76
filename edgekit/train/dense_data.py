"""Detection and segmentation data for the trainer: letterboxed images, targets that move with the pixels.

Every image is letterboxed to the network input (aspect kept, padded with grey 114, centred — what the
device's ``letterbox`` preprocessing does), and its boxes (or mask) go through the same transform. Boxes
are kept as a fixed-size ``(M, 5)`` array per image — ``class, x0, y0, x1, y1`` in input pixels, class −1
for padding — so batches stack like any other tensor; masks as ``(H, W)`` class indices (0 background,
:data:`IGNORE` for the letterbox padding and for pixels an augmentation invents).

Augmentation (training split only; random draws from the global torch RNG, which the trainer reseeds
per epoch, so runs are reproducible): horizontal flip, scale jitter with a random placement (zoom in:
a crop; zoom out: the image on a grey canvas) where boxes are clipped and dropped below a visible share,
and colour jitter (brightness, contrast, saturation). Vertical flips and rotations are not applied: most
scenes have an up, and rotated boxes are not tight boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgekit_runtime.processing import LETTERBOX_FILL, letterbox_geometry
from torch.utils.data import Dataset

from ..config.train import AugmentConfig, DataConfig, SplitConfig
from ..data.detection import IGNORE, Record, Split, load_detection_data
from ..errors import ConfigError

PAD_VALUE = LETTERBOX_FILL  # the device's letterbox fill: training sees the padding the device will show it
MIN_VISIBLE = 0.4  # a box cut by an augmentation is kept only if this share of its area is still in the image


@dataclass
class Letterbox:
    """How an original image maps into the network input: ``x_in = x_orig * scale + pad_x``."""

    width: int
    height: int
    scale: float
    pad_x: int
    pad_y: int


def letterbox_params(width: int, height: int, size: tuple[int, int]) -> Letterbox:
    """The runtime's own letterbox geometry (``edgekit_runtime.processing.letterbox_geometry``)."""
    scale, _, _, pad_x, pad_y = letterbox_geometry(height, width, size[0], size[1])
    return Letterbox(width, height, scale, pad_x, pad_y)


def letterbox_image(image: np.ndarray, size: tuple[int, int], interpolation: int | None = None,
                    fill: int = PAD_VALUE) -> tuple[np.ndarray, Letterbox]:
    """Letterbox ``image`` as the device does: bilinear (the manifest's ``interpolation: linear``) unless
    told otherwise (masks: nearest)."""
    import cv2

    p = letterbox_params(image.shape[1], image.shape[0], size)
    _, nw, nh, _, _ = letterbox_geometry(p.height, p.width, size[0], size[1])
    interp = cv2.INTER_LINEAR if interpolation is None else interpolation
    resized = image if (nh, nw) == image.shape[:2] else cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.full((size[0], size[1], *image.shape[2:]), fill, dtype=image.dtype)
    canvas[p.pad_y : p.pad_y + nh, p.pad_x : p.pad_x + nw] = resized
    return canvas, p


@dataclass
class DensePrepared:
    """A detection or segmentation data set in memory, at the network input size."""

    task: str  # "detection" | "segmentation"
    classes: list[str]  # the data's classes (segmentation outputs add "background" as channel 0)
    size: tuple[int, int]  # network input (height, width)
    images: dict[str, np.ndarray]  # split → (N, H, W, 3) uint8 RGB, letterboxed
    targets: dict[str, np.ndarray]  # detection: (N, M, 5) float32; segmentation: (N, H, W) uint8
    records: dict[str, list[Record]]  # the original files, for evaluation in original image coordinates
    mean: list[float]  # per channel, of the training images scaled to 0..1
    std: list[float]
    source: dict[str, Any] = field(default_factory=dict)
    split_report: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Output labels: the classes, and for segmentation "background" first (channel 0, mask value 0)."""
        return ["background", *self.classes] if self.task == "segmentation" else list(self.classes)

    @property
    def out_dim(self) -> int:
        return len(self.labels)

    def preprocess_manifest(self) -> dict[str, Any]:
        """The bundle's preprocessing: what the device does to a photo before the model."""
        return {"type": "image", "color": "rgb", "size": list(self.size), "resize": "letterbox",
                "interpolation": "linear", "scale": 1 / 255, "mean": self.mean, "std": self.std,
                "layout": "NCHW", "dtype": "float32"}

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 → (N, 3, H, W) float32 as the device preprocessing gives it."""
        x = images.astype(np.float32) / 255.0
        x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def default_size(records: list[Record], multiple: int = 32, limit: int = 640) -> tuple[int, int]:
    """The median longer side, rounded up to ``multiple`` (the detector's largest stride), at most ``limit``."""
    side = float(np.median([max(r.width, r.height) for r in records]))
    side = min(limit, int(math.ceil(side / multiple) * multiple))
    return side, side


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    from ..errors import CalibrationError

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise CalibrationError(f"{path} cannot be decoded as an image", hint="remove or replace the file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _load_split(split: Split, task: str, size: tuple[int, int], max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    images = np.empty((len(split), size[0], size[1], 3), np.uint8)
    if task == "detection":
        targets = np.full((len(split), max_objects, 5), -1.0, np.float32)
    else:
        targets = np.empty((len(split), size[0], size[1]), np.uint8)
    for i, r in enumerate(split.records):
        images[i], p = letterbox_image(_read_rgb(r.image), size)
        if task == "detection":
            n = len(r.labels)
            targets[i, :n, 0] = r.labels
            targets[i, :n, 1:] = r.boxes * p.scale + np.array([p.pad_x, p.pad_y, p.pad_x, p.pad_y], np.float32)
        else:
            targets[i], _ = letterbox_image(r.read_mask(), size, cv2.INTER_NEAREST, fill=IGNORE)
    return images, targets


def prepare_dense(data: DataConfig, split: SplitConfig, seed: int, multiple: int = 32) -> DensePrepared:
    """Read ``data.path`` (train/, val/, test/) into memory at the network input size.

    Without ``val/``, a seeded random ``split.val`` share of ``train/`` validates; ``test/`` is only ever
    used for the final report.
    """
    task = data.task
    splits = load_detection_data(Path(data.path), masks=task == "segmentation")
    report: dict[str, Any] = {"method": "folders", "source": splits["train"].source}
    if "val" not in splits:
        train = splits["train"]
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, int(round(split.val * len(train))))
        if len(train) - n_val < 1:
            raise ConfigError(f"{data.path}/train has {len(train)} image(s): too few to draw a validation split",
                              hint="add images or a val/ folder")
        splits["val"] = Split("val", [train.records[i] for i in sorted(order[:n_val])], train.classes, train.source)
        splits["train"] = Split("train", [train.records[i] for i in sorted(order[n_val:])], train.classes,
                                train.source)
        report["method"] = f"val drawn at random from train/ ({split.val:.0%}, seed {seed})"
    size = tuple(data.image_size) if data.image_size else default_size(splits["train"].records, multiple)
    if size[0] % multiple or size[1] % multiple:
        raise ConfigError(f"data.image_size {list(size)} is not a multiple of {multiple} (the model's largest "
                          f"stride)", hint=f"use e.g. {[int(math.ceil(s / multiple) * multiple) for s in size]}")
    max_objects = max([len(r.labels) for s in splits.values() for r in s.records] + [1])
    images, targets = {}, {}
    for name, s in splits.items():
        images[name], targets[name] = _load_split(s, task, size, max_objects)
    train_px = images["train"].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = train_px.mean(0), np.maximum(train_px.std(0), 1e-3)
    report.update({name: {"images": len(s), "objects": int(sum(len(r.labels) for r in s.records))}
                   for name, s in splits.items()})
    return DensePrepared(task=task, classes=list(splits["train"].classes), size=size, images=images, targets=targets,
                         records={k: s.records for k, s in splits.items()},
                         mean=[round(float(v), 5) for v in mean], std=[round(float(v), 5) for v in std],
                         source={"path": str(data.path), "format": splits["train"].source}, split_report=report)


# ----------------------------------------------------------------------------- augmentation
def _rand() -> float:
    return float(torch.rand(()))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand()


def hflip(image: np.ndarray, target: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    w = image.shape[1]
    image = np.ascontiguousarray(image[:, ::-1])
    if task == "detection":
        target = target.copy()
        real = target[:, 0] >= 0
        x0 = target[real, 1].copy()
        target[real, 1] = w - target[real, 3]
        target[real, 3] = w - x0
    else:
        target = np.ascontiguousarray(target[:, ::-1])
    return image, target


def scale_jitter(image: np.ndarray, target: np.ndarray, task: str, low: float, high: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rescale by a random factor and place at a random offset on a same-size canvas (crop or pad)."""
    import cv2

    h, w = image.shape[:2]
    s = _uniform(low, high)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    ox = round(_uniform(min(0, w - nw), max(0, w - nw)))  # where the scaled image's corner lands
    oy = round(_uniform(min(0, h - nh), max(0, h - nh)))
    m = np.array([[nw / w, 0, ox], [0, nh / h, oy]], np.float32)
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(PAD_VALUE,) * 3)
    if task == "segmentation":
        return out, cv2.warpAffine(target, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=IGNORE)
    t = np.full_like(target, -1.0)
    real = target[:, 0] >= 0
    boxes = target[real, 1:] * np.array([nw / w, nh / h, nw / w, nh / h], np.float32) + np.array([ox, oy, ox, oy],
                                                                                                   np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = np.clip(boxes, 0, [w, h, w, h])
    kept_area = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    keep = (kept_area >= MIN_VISIBLE * np.maximum(area, 1e-6)) & (clipped[:, 2] - clipped[:, 0] >= 2) & \
        (clipped[:, 3] - clipped[:, 1] >= 2)
    n = int(keep.sum())
    t[:n, 0] = target[real, 0][keep]
    t[:n, 1:] = clipped[keep]
    return out, t


def color_jitter(image: np.ndarray, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation, each by a factor in ``1 ± strength``."""
    x = image.astype(np.float32)
    x = x * _uniform(1 - strength, 1 + strength)
    mean = x.mean()
    x = (x - mean) * _uniform(1 - strength, 1 + strength) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * _uniform(1 - strength, 1 + strength) + grey
    return np.clip(x, 0, 255).astype(np.uint8)


class DenseDataset(Dataset):
    """(image tensor, target tensor) pairs of one split; augmented when ``augment`` is given."""

    def __init__(self, p: DensePrepared, split: str, augment: AugmentConfig | None = None):
        self.p, self.split, self.augment = p, split, augment
        self.images, self.targets = p.images[split], p.targets[split]
        self.mean = np.array(p.mean, np.float32)
        self.std = np.array(p.std, np.float32)
        if augment is not None:
            # a flip is safe for scenes (unlike digits or text, where the classification default keeps it off)
            self.flip = augment.hflip if "hflip" in augment.model_fields_set else 0.5
            self.zoom = (augment.resized_crop, 1 / augment.resized_crop) if augment.resized_crop < 1 else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.images[i], self.targets[i]
        a, task = self.augment, self.p.task
        if a is not None:
            if _rand() < self.flip:
                image, target = hflip(image, target, task)
            if self.zoom is not None:
                image, target = scale_jitter(image, target, task, *self.zoom)
            if a.color_jitter > 0:
                image = color_jitter(image, a.color_jitter)
        x = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        y = torch.from_numpy(np.ascontiguousarray(target))
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), (y.long() if task == "segmentation"
                                                                              else y)


def run_arrays(run: str, split: str = "train", count: int | None = None, labels: bool = True):
    """Build-file factory for a detection/segmentation run folder: the normalized images of ``split`` as the
    device preprocesses them, and (``labels``) their padded boxes ``(N, M, 5)`` or masks ``(N, H, W)`` in
    network-input pixels; ``count`` takes that many evenly spaced images."""
    from ..errors import CalibrationError

    p = run_prepared(run)
    if split not in p.images:
        raise CalibrationError(f"the run {run} has no {split} split (it has {', '.join(p.images)})")
    x, y = p.normalize(p.images[split]), p.targets[split]
    if count is not None and count < len(x):
        pick = np.unique(np.linspace(0, len(x) - 1, count).round().astype(np.int64))
        x, y = x[pick], y[pick]
    return (x, y.astype(np.float32)) if labels else x


def run_prepared(run: Path | str) -> DensePrepared:
    """A run folder's data as its training prepared it (the split, the size, the normalisation), read once per
    version of its train.yaml: a build reads calibration and validation of the same run."""
    run_dir = Path(run).resolve()
    return _cached_prepared(str(run_dir), (run_dir / "train.yaml").stat().st_mtime_ns)


def _cached_prepared(run_dir: str, stamp: int) -> DensePrepared:
    import yaml

    from ..config.base import parse
    from ..config.train import TrainConfig
    from ..errors import CalibrationError

    key = (run_dir, stamp)
    if key not in _PREPARED:
        path = Path(run_dir) / "train.yaml"
        cfg = parse(TrainConfig, yaml.safe_load(path.read_text()) or {}, str(path))
        if not Path(cfg.data.path).exists():
            raise CalibrationError(f"the data {cfg.data.path} the run {run_dir} was trained on is not there; "
                                   "pass --calibration/--validation")
        _PREPARED.clear()  # one run at a time: a build reads calibration and validation of the same run
        _PREPARED[key] = prepare_dense(cfg.data, cfg.split, cfg.train.seed)
    return _PREPARED[key]


_PREPARED: dict[tuple, DensePrepared] = {}
