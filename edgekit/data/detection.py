"""Detection and segmentation data as users keep it: COCO ``annotations.json`` or YOLO ``labels/*.txt``, and
PNG label masks.

A data folder holds ``train/`` and optionally ``val/`` and ``test/``; each split has ``images/`` and
either ``annotations.json`` (COCO: ``bbox`` is ``[x, y, width, height]`` in pixels, ``category_id``
any integers) or ``labels/<image stem>.txt`` (YOLO: ``class cx cy w h`` per line, normalised to the
image size, class indices from 0), and for segmentation ``masks/<image stem>.png`` holding a class
index per pixel (0 background, ``255`` ignored). Class names come from the COCO categories or, for
YOLO, from ``classes.txt`` (or ``data.yaml``'s ``names``) next to the splits.

Everything is read into :class:`Record` s with boxes as ``x0, y0, x1, y1`` in pixels of the image file and
class indices from 0 (COCO categories are mapped in ascending id order); a malformed file is refused
with its path and line (:class:`~edgekit.errors.CalibrationError`), never skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IGNORE = 255  # a mask value that no loss or metric counts (borders, unlabelled pixels)


@dataclass
class Record:
    image: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1 pixels
    labels: np.ndarray  # (N,) int64 from 0
    mask: Path | None = None  # segmentation: class index per pixel, 0 background

    def read_mask(self) -> np.ndarray:
        import cv2

        if self.mask is None:
            raise CalibrationError(f"{self.image} has no mask", hint=f"add masks/{self.image.stem}.png")
        m = cv2.imread(str(self.mask), cv2.IMREAD_UNCHANGED)
        if m is None or m.ndim != 2:
            raise CalibrationError(f"{self.mask} is not a one-channel PNG label image",
                                   hint="save the mask as 8-bit grey: the class index per pixel, 0 background")
        if m.shape != (self.height, self.width):
            raise CalibrationError(f"{self.mask} is {m.shape[1]}×{m.shape[0]}; its image is "
                                   f"{self.width}×{self.height}", hint="masks have their image's size")
        return m


@dataclass
class Split:
    name: str
    records: list[Record]
    classes: list[str]
    source: str  # "coco" | "yolo"

    def __len__(self) -> int:
        return len(self.records)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises several types for unreadable files
        raise CalibrationError(f"{path} cannot be read as an image ({exc})",
                               hint="remove or replace the file") from None


def _images(root: Path) -> dict[str, Path]:
    folder = root / "images"
    if not folder.is_dir():
        raise CalibrationError(f"{root} has no images/ folder", hint="put the split's images in images/")
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _coco(root: Path, classes: list[str] | None) -> tuple[list[Record], list[str]]:
    path = root / "annotations.json"
    try:
        doc = json.loads(path.read_text())
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        images, anns = doc["images"], doc.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{path} is not a COCO annotation file ({type(exc).__name__}: {exc})",
                               hint="it needs 'images', 'categories' and 'annotations'") from None
    names = [c["name"] for c in cats]
    if classes is not None and names != classes:
        raise CalibrationError(f"{path} has categories {names}; the other splits have {classes}",
                               hint="every split uses the same categories")
    index = {c["id"]: i for i, c in enumerate(cats)}
    files = _images(root)
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    records = []
    for im in images:
        if im["file_name"] not in files:
            raise CalibrationError(f"{path} lists {im['file_name']!r}, which is not in {root / 'images'}")
        boxes, labels = [], []
        for a in by_image.get(im["id"], []):
            if a.get("iscrowd", 0):
                continue  # crowd regions are neither objects to find nor false positives (COCO's rule)
            if a["category_id"] not in index:
                raise CalibrationError(f"{path}: annotation {a.get('id')} has category_id {a['category_id']}, "
                                       f"not among the categories")
            x, y, w, h = (float(v) for v in a["bbox"])
            if w <= 0 or h <= 0:
                raise CalibrationError(f"{path}: annotation {a.get('id')} has an empty bbox {a['bbox']}")
            boxes.append([x, y, x + w, y + h])
            labels.append(index[a["category_id"]])
        records.append(Record(files[im["file_name"]], int(im["width"]), int(im["height"]),
                              np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)))
    return records, names


def _yolo_classes(data_root: Path) -> list[str]:
    txt = data_root / "classes.txt"
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    yml = data_root / "data.yaml"
    if yml.is_file():
        import yaml

        names = (yaml.safe_load(yml.read_text()) or {}).get("names")
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
    raise CalibrationError(f"{data_root} has YOLO labels but no class names",
                           hint="add classes.txt (one name per line) or data.yaml with names")


def _yolo(root: Path, classes: list[str]) -> list[Record]:
    records = []
    for name, image in _images(root).items():
        w, h = _image_size(image)
        label_file = root / "labels" / f"{image.stem}.txt"
        boxes, labels = [], []
        lines = label_file.read_text().splitlines() if label_file.is_file() else []  # no file: no objects
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                c, cx, cy, bw, bh = int(parts[0]), *(float(v) for v in parts[1:5])
            except (ValueError, TypeError):
                raise CalibrationError(f"{label_file}:{n}: {line!r} is not 'class cx cy w h'") from None
            if len(parts) != 5 or not 0 <= c < len(classes) or bw <= 0 or bh <= 0:
                raise CalibrationError(f"{label_file}:{n}: {line!r} is not 'class cx cy w h' with a class below "
                                       f"{len(classes)} and a positive size",
                                       hint="segment polygons are not read: give boxes")
            boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            labels.append(c)
        records.append(Record(image, w, h, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)))
    return records


def load_split(data_root: Path, split: str, classes: list[str] | None = None,
               masks: bool = False) -> Split | None:
    """``data_root/split`` as records, or None where the split does not exist."""
    root = Path(data_root) / split
    if not root.is_dir():
        return None
    if (root / "annotations.json").is_file():
        records, names = _coco(root, classes)
        source = "coco"
    elif (root / "labels").is_dir() or masks:
        names = classes or _yolo_classes(Path(data_root))
        records, source = _yolo(root, names), "yolo"
    else:
        raise CalibrationError(f"{root} has neither annotations.json (COCO) nor labels/ (YOLO)",
                               hint="see docs/detection.md for the data layout")
    if masks:
        for r in records:
            path = root / "masks" / f"{r.image.stem}.png"
            if not path.is_file():
                raise CalibrationError(f"{r.image.name} has no mask {path}", hint="segmentation needs a mask per image")
            r.mask = path
    if not records:
        raise CalibrationError(f"{root / 'images'} holds no images")
    return Split(split, records, names, source)


def load_detection_data(data_root: Path, masks: bool = False) -> dict[str, Split]:
    """train (required), val and test where present, all with the train split's classes."""
    root = Path(data_root)
    if not root.is_dir():
        raise CalibrationError(f"{root} does not exist", hint="give the folder that holds train/ (and val/, test/)")
    train = load_split(root, "train", None, masks)
    if train is None:
        raise CalibrationError(f"{root} has no train/ folder", hint="the data folder holds train/, val/ and test/")
    out = {"train": train}
    for name in ("val", "test"):
        split = load_split(root, name, train.classes, masks)
        if split is not None:
            out[name] = split
    return out


def is_split_folder(folder: Path) -> bool:
    """A detection/segmentation split: ``images/`` beside ``annotations.json``, ``labels/`` or ``masks/``."""
    folder = Path(folder)
    return (folder / "images").is_dir() and any(
        (folder / name).exists() for name in ("annotations.json", "labels", "masks"))


def load_split_folder(folder: Path, classes: list[str] | None, masks: bool, hint: str) -> Split:
    """One split folder (``images/`` with COCO, YOLO or masks) read for a model whose classes are ``classes``:
    COCO names its categories, which must be those; YOLO's class indices take them as names."""
    folder = Path(folder)
    split = load_split(folder.parent, folder.name, None if (folder / "annotations.json").is_file() else classes,
                       masks=masks)
    if classes is not None and split.classes != list(classes):
        raise CalibrationError(f"{folder} has classes {split.classes}; the model's are {list(classes)}", hint=hint)
    return split


def split_arrays(folder: Path, preprocess: dict, task: str, labels: list[str] | None = None,
                 targets: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """One split folder as a build's calibration or validation data: every image through the device's own
    preprocessing (``edgekit_runtime.processing.preprocess_image``, so a letterbox or stretch is the one the
    bundle will do), and (``targets``) the annotations moved by the same geometry into network-input pixels:
    boxes padded to ``(N, M, 5)`` (``class, x0, y0, x1, y1``, class −1 for padding) for detection, label
    masks ``(N, H, W)`` (:data:`IGNORE` where the input shows no image) for segmentation — what the
    accuracy gate's mAP50/mIoU reads.

    This is how an ONNX detector or segmenter exported by another tool is held to an mAP/mIoU budget: the
    build file declares its ``preprocess`` and ``postprocess``, and ``validation.source`` names such a folder.
    """
    import cv2
    from edgekit_runtime.processing import preprocess_image

    folder = Path(folder)
    task = "detection" if task == "detections" else task  # boxes either way; only the model's output differs
    if task not in ("detection", "segmentation"):
        raise CalibrationError(f"{folder} holds detection/segmentation annotations, but the build's postprocess "
                               f"type is {task!r}", hint="set postprocess.type: detection (or segmentation)")
    # a segmenter's labels are ["background", *classes]: mask value k is labels[k]
    classes = list(labels[1:]) if labels is not None and task == "segmentation" else labels
    split = load_split_folder(folder, classes, masks=targets and task == "segmentation",
                              hint="the build file's model.labels name the model's classes in output order"
                                   + (" (a segmenter's start with 'background')" if task == "segmentation" else ""))
    xs, metas = [], []
    for r in split.records:
        bgr = cv2.imread(str(r.image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise CalibrationError(f"{r.image} cannot be decoded as an image", hint="remove or replace the file")
        xs.append(preprocess_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), preprocess, metas))
    x = np.stack(xs).astype(np.float32)
    if not targets:
        return x, None
    height, width = preprocess["size"]
    if task == "detection":
        y = np.full((len(x), max([len(r.labels) for r in split.records] + [1]), 5), -1.0, np.float32)
        for i, (r, m) in enumerate(zip(split.records, metas)):
            n = len(r.labels)
            y[i, :n, 0] = r.labels
            y[i, :n, 1:] = r.boxes * np.array([m.scale_x, m.scale_y] * 2, np.float32) \
                + np.array([m.offset_x, m.offset_y] * 2, np.float32)
        return x, y
    y = np.full((len(x), height, width), IGNORE, np.uint8)
    for i, (r, m) in enumerate(zip(split.records, metas)):  # the image's resize (nearest: labels stay labels),
        resized = cv2.resize(r.read_mask(), (m.resized_width, m.resized_height), interpolation=cv2.INTER_NEAREST)
        ox, oy = int(round(m.offset_x)), int(round(m.offset_y))  # then its padding (>0) or crop (<0)
        sy, sx = max(0, -oy), max(0, -ox)
        dy, dx = max(0, oy), max(0, ox)
        h, w = min(height - dy, resized.shape[0] - sy), min(width - dx, resized.shape[1] - sx)
        y[i, dy : dy + h, dx : dx + w] = resized[sy : sy + h, sx : sx + w]
    return x, y
