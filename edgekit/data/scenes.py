"""Seeded scenes with objects and their exact boxes and masks, for detection and segmentation without downloads.

Each scene is a random crop of one of scikit-learn's two sample photos (a real background with real
texture, not a flat colour) with up to ``max_objects`` filled shapes pasted on it — circles, squares,
triangles and stars, each class its own shape, in random colours, sizes and positions. Objects do not
overlap (a placement that touches an earlier object's box, grown by a margin, is drawn again), so every
box is the object's exact extent and every mask pixel belongs to one object.

:func:`write_dataset` writes what a user's own data looks like, in the formats the real loaders read
(:mod:`edgekit.data.detection`)::

    DIR/train/images/*.jpg               DIR/val/...   DIR/test/...
    DIR/train/annotations.json           COCO: images, categories, annotations (bbox [x, y, w, h], polygon)
    DIR/train/labels/*.txt               YOLO: one "class cx cy w h" line per object, normalised (fmt="yolo")
    DIR/train/masks/*.png                class index per pixel, 0 background (segmentation)
    DIR/classes.txt                      one class name per line

The same seed gives the same files on every machine (numpy's PCG64 and OpenCV's deterministic drawing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError

CLASSES = ("circle", "square", "triangle", "star")
SPLITS = {"train": 240, "val": 60, "test": 60}


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1 in pixels (x1/y1 exclusive)
    labels: np.ndarray  # (N,) int64 class index into CLASSES
    masks: np.ndarray  # (N, H, W) bool, one per object
    polygons: list[list[float]] = field(default_factory=list)  # COCO polygon per object [x0, y0, x1, y1, ...]

    def semantic(self) -> np.ndarray:
        """(H, W) uint8: 0 background, class index + 1 where an object is."""
        out = np.zeros(self.image.shape[:2], np.uint8)
        for m, c in zip(self.masks, self.labels):
            out[m] = c + 1
        return out


def backgrounds() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.ascontiguousarray(im) for im in load_sample_images().images]  # two 427×640 RGB photos


def _shape_points(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    """The outline of a polygon shape (None for a circle), rotated by ``angle``."""
    if kind == "square":
        t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, r)
    elif kind == "triangle":
        t = angle + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, r)
    elif kind == "star":
        t = angle + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    else:
        return None
    return np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)


def render_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4,
                 photos: list[np.ndarray] | None = None) -> Scene:
    """One scene: a random crop of a sample photo with 1..``max_objects`` non-overlapping shapes."""
    import cv2

    photos = photos or backgrounds()
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(size, min(photo.shape[:2]) + 1))
    y, x = int(rng.integers(photo.shape[0] - side + 1)), int(rng.integers(photo.shape[1] - side + 1))
    image = cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image)
    boxes, labels, masks, polygons = [], [], [], []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(len(CLASSES)))
            r = float(rng.uniform(0.08, 0.2) * size)
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            pts = _shape_points(CLASSES[label], cx, cy, r, float(rng.uniform(0, 2 * np.pi)))
            mask = np.zeros((size, size), np.uint8)
            if pts is None:
                cv2.circle(mask, (int(round(cx * 16)), int(round(cy * 16))), int(round(r * 16)), 1, -1,
                           lineType=cv2.LINE_8, shift=4)
            else:
                cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            ys, xs = np.nonzero(mask)
            if len(xs) < 16:
                continue
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            margin = 2
            if any(box[0] < t[2] + margin and t[0] < box[2] + margin and box[1] < t[3] + margin
                   and t[1] < box[3] + margin for t in taken):
                continue
            # a colour that stands out from the background under the shape
            under = image[mask.astype(bool)].mean(0)
            colour = np.array([rng.integers(0, 256) for _ in range(3)], np.float64)
            if np.abs(colour - under).sum() < 180:
                colour = np.where(under > 127, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))
            image[mask.astype(bool)] = colour.astype(np.uint8)
            taken.append(box)
            boxes.append(box)
            labels.append(label)
            masks.append(mask.astype(bool))
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polygons.append([float(v) for v in max(contours, key=len).reshape(-1)])
            break
    return Scene(image=image, boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
                 masks=np.array(masks, bool).reshape(-1, size, size), polygons=polygons)


def write_dataset(out: Path, task: Literal["detection", "segmentation"] = "detection",
                  fmt: Literal["coco", "yolo"] = "coco", splits: dict[str, int] | None = None, size: int = 128,
                  seed: int = 0, max_objects: int = 4) -> Path:
    """Write a seeded dataset in the layout ``edgekit train --task detection|segmentation --data DIR`` reads."""
    import cv2

    if task not in ("detection", "segmentation"):
        raise ConfigError(f"scenes are generated for detection or segmentation, not {task!r}")
    if fmt not in ("coco", "yolo"):
        raise ConfigError(f"annotation format {fmt!r} is not coco or yolo")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    photos = backgrounds()
    for i, (split, count) in enumerate((splits or SPLITS).items()):
        rng = np.random.default_rng([seed, i])
        root = out / split
        (root / "images").mkdir(parents=True, exist_ok=True)
        coco: dict = {"images": [], "annotations": [],
                      "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
        for n in range(count):
            scene = render_scene(rng, size, max_objects, photos)
            name = f"{split}_{n:05d}"
            cv2.imwrite(str(root / "images" / f"{name}.jpg"), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            coco["images"].append({"id": n + 1, "file_name": f"{name}.jpg", "width": size, "height": size})
            for box, label, mask, poly in zip(scene.boxes, scene.labels, scene.masks, scene.polygons):
                x0, y0, x1, y1 = (float(v) for v in box)
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": n + 1, "category_id": int(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
                    "segmentation": [poly]})
            if fmt == "yolo":
                (root / "labels").mkdir(exist_ok=True)
                lines = [f"{int(c)} {(b[0] + b[2]) / 2 / size:.6f} {(b[1] + b[3]) / 2 / size:.6f} "
                         f"{(b[2] - b[0]) / size:.6f} {(b[3] - b[1]) / size:.6f}"
                         for b, c in zip(scene.boxes, scene.labels)]
                (root / "labels" / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
            if task == "segmentation":
                (root / "masks").mkdir(exist_ok=True)
                cv2.imwrite(str(root / "masks" / f"{name}.png"), scene.semantic())
        if fmt == "coco":
            (root / "annotations.json").write_text(json.dumps(coco))
    return out
