"""Pre- and post-processing driven by the manifest (OpenCV + numpy only).

The host uses these same functions to build calibration and validation tensors
from images, so the device sees exactly what the model was calibrated on.

The specs are the manifest's typed sections, :class:`~.contract.manifest.Preprocess`
and :class:`~.contract.manifest.Postprocess`, whose defaults are the format's; a
JSON object (as the host's config writes it) is parsed into them first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .contract.errors import ErrorCode, InputError
from .contract.manifest import Postprocess, Preprocess

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
_INTERPOLATION = {"area": "INTER_AREA", "linear": "INTER_LINEAR", "nearest": "INTER_NEAREST", "cubic": "INTER_CUBIC"}


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise InputError(
            f"reading images needs OpenCV ({exc})",
            code=ErrorCode.INPUT_UNSUPPORTED,
            hint="pip install opencv-python-headless",
        ) from None
    return cv2


def read_image(path: str | os.PathLike, color: str = "rgb") -> np.ndarray:
    """Read an image file as uint8 HxW (gray) or HxWx3 in ``color`` order."""
    cv2 = _cv2()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} does not exist", code=ErrorCode.INPUT_MISSING)
    flag = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        raise InputError(
            f"{path} is not a readable image", code=ErrorCode.INPUT_UNREADABLE,
            hint=f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}",
        )
    if color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted for reproducibility."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _convert_color(image: np.ndarray, color: str) -> np.ndarray:
    """Arrays are taken to be gray (HxW / HxWx1) or RGB (HxWx3)."""
    cv2 = _cv2()
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image if color == "gray" else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"an image must be HxW or HxWx3, got shape {image.shape}", code=ErrorCode.INPUT_BAD_SHAPE)
    if color == "gray":
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if color == "bgr":
        return image[:, :, ::-1]
    return image


def as_preprocess(spec: Preprocess | Mapping[str, Any]) -> Preprocess:
    """The typed spec; a JSON object is parsed (format defaults for what it leaves out)."""
    return spec if isinstance(spec, Preprocess) else Preprocess.from_dict(dict(spec))


def as_postprocess(spec: Postprocess | Mapping[str, Any] | None) -> Postprocess | None:
    """The typed spec (or None: raw outputs); a JSON object is parsed (format defaults for what it leaves out)."""
    return spec if spec is None or isinstance(spec, Postprocess) else Postprocess.from_dict(dict(spec))


def _resize(image: np.ndarray, spec: Preprocess) -> np.ndarray:
    cv2 = _cv2()
    height, width = spec.size
    interp = getattr(cv2, _INTERPOLATION[spec.interpolation])
    if spec.resize == "shorter_center_crop":
        h, w = image.shape[:2]
        ratio = max(height / h, width / w)
        image = cv2.resize(image, (max(width, round(w * ratio)), max(height, round(h * ratio))), interpolation=interp)
        h, w = image.shape[:2]
        top, left = (h - height) // 2, (w - width) // 2
        return image[top : top + height, left : left + width]
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=interp)


def preprocess_image(image: np.ndarray, spec: Preprocess | Mapping[str, Any]) -> np.ndarray:
    """One decoded image (uint8) → one model input *without* the batch axis."""
    spec = as_preprocess(spec)
    image = _resize(_convert_color(np.asarray(image), spec.color), spec)
    x = image.astype(np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    x *= float(spec.scale)
    if spec.mean is not None:
        x -= np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        x /= np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=spec.dtype)


def preprocess_batch(items: Iterable[str | os.PathLike | np.ndarray],
                     spec: Preprocess | Mapping[str, Any] | None) -> np.ndarray:
    """Image paths and/or decoded images → one batch tensor."""
    if spec is not None:
        spec = as_preprocess(spec)
    if spec is None or spec.type != "image":
        raise InputError(
            "this bundle has no image preprocessing; pass tensors to run()",
            code=ErrorCode.INPUT_UNSUPPORTED,
        )
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = read_image(item, spec.color)
        elif not isinstance(item, np.ndarray):
            raise InputError(f"cannot preprocess a {type(item).__name__}", code=ErrorCode.INPUT_UNSUPPORTED)
        out.append(preprocess_image(item, spec))
    if not out:
        raise InputError("no inputs given", code=ErrorCode.INPUT_MISSING)
    return np.stack(out)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def postprocess(output: np.ndarray, spec: Postprocess | Mapping[str, Any] | None,
                labels: Sequence[str] | None) -> list[dict]:
    """Batch output → one result per item (classification: top-k with labels)."""
    spec = as_postprocess(spec)
    if spec is None or spec.type != "classification":
        return [{"output": row.tolist()} for row in output]
    scores = softmax(output.astype(np.float32)) if spec.softmax else output.astype(np.float32)
    k = min(spec.top_k, scores.shape[-1])
    results = []
    for row in scores.reshape(scores.shape[0], -1):
        top = np.argsort(-row, kind="stable")[:k]
        results.append(
            {
                "top_k": [
                    {"index": int(i), "label": labels[i] if labels and i < len(labels) else str(int(i)),
                     "score": float(row[i])}
                    for i in top
                ]
            }
        )
    return results
