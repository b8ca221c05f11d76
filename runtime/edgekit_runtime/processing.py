"""Pre- and post-processing driven by the manifest (OpenCV + numpy only).

The host uses these same functions to build calibration and validation tensors
from images, so the device sees exactly what the model was calibrated on.

Two kinds of preprocessing (``Preprocess.type``): ``image`` (decoded uint8 images:
colour, resize, normalise, layout) and ``tensor`` (format 1.2: arrays already shaped
like the model input, e.g. sensor windows (C, L), tabular rows (F,), forecasting
windows; only ``(x * scale - mean) / std`` per channel along axis 1, then the dtype).

The specs are the manifest's typed sections, :class:`~.contract.manifest.Preprocess`
and :class:`~.contract.manifest.Postprocess`, whose defaults are the format's; a
JSON object (as the host's config writes it) is parsed into them first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .contract.errors import ErrorCode, InputError
from .contract.manifest import DENSE_POSTPROCESS, Postprocess, Preprocess

LETTERBOX_FILL = 114  # grey of the letterbox padding, in 0-255 pixel values (before scale/mean/std)
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


def cv2_module():
    """OpenCV, or an :class:`InputError` that says how to install it (for modules beside this one)."""
    return _cv2()


def read_image(path: str | os.PathLike, color: str = "rgb") -> np.ndarray:
    """Read an image file as uint8 HxW (gray) or HxWx3 in ``color`` order.

    Gray is converted from the colour decode as :func:`preprocess_image` converts an RGB array (a
    codec's own grayscale decode differs by ±1), so a file and its decoded array give the same input.
    """
    cv2 = _cv2()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} does not exist", code=ErrorCode.INPUT_MISSING)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(
            f"{path} is not a readable image", code=ErrorCode.INPUT_UNREADABLE,
            hint=f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}",
        )
    if color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif color == "gray":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
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


@dataclass(frozen=True)
class ImageMeta:
    """Where one image went in preprocessing: enough to map boxes and masks back onto the original.

    A network-input pixel coordinate is ``original * scale + offset`` on each axis (letterbox:
    ``scale`` the contract's ``min(H/h0, W/w0)``, ``offset`` the padding; stretch: ``W/w0``,
    ``H/h0``, no offset; shorter_center_crop: the resize ratio, minus the crop's left/top).
    ``resized_*``: the image's size after resizing, before it was padded or cropped.
    """

    width: int  # original image, pixels
    height: int
    input_width: int  # the network input (preprocess.size)
    input_height: int
    resize: str  # "stretch" | "shorter_center_crop" | "letterbox"
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    resized_width: int
    resized_height: int

    @classmethod
    def identity(cls, height: int, width: int) -> "ImageMeta":
        """An image that already was the network input: results stay in network-input pixels."""
        return cls(width, height, width, height, "stretch", 1.0, 1.0, 0.0, 0.0, width, height)

    @property
    def pad_x(self) -> int:
        """Letterbox: columns of padding left of the image (0 otherwise)."""
        return int(self.offset_x) if self.resize == "letterbox" else 0

    @property
    def pad_y(self) -> int:
        """Letterbox: rows of padding above the image (0 otherwise)."""
        return int(self.offset_y) if self.resize == "letterbox" else 0

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes ``(N, 4)`` (x0, y0, x1, y1) in network-input pixels → original-image pixels, clipped to the image."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.empty_like(b)
        out[:, 0::2] = (b[:, 0::2] - self.offset_x) / self.scale_x
        out[:, 1::2] = (b[:, 1::2] - self.offset_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.height, out=out[:, 1::2])
        return out.astype(np.float32)

    def visible_region(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """The part of the network input that shows the image, and the part of the original it shows:
        ``((x0, y0, x1, y1) network pixels, (x0, y0, x1, y1) original pixels)``, end-exclusive."""
        nx0 = max(0, int(round(self.offset_x)))
        ny0 = max(0, int(round(self.offset_y)))
        nx1 = min(self.input_width, int(round(self.offset_x)) + self.resized_width)
        ny1 = min(self.input_height, int(round(self.offset_y)) + self.resized_height)
        if self.resize != "shorter_center_crop":
            return (nx0, ny0, nx1, ny1), (0, 0, self.width, self.height)

        def back(v: float, scale: float, offset: float, side: int) -> int:
            return min(side, max(0, int(round((v - offset) / scale))))

        orig = (back(nx0, self.scale_x, self.offset_x, self.width), back(ny0, self.scale_y, self.offset_y, self.height),
                back(nx1, self.scale_x, self.offset_x, self.width), back(ny1, self.scale_y, self.offset_y, self.height))
        return (nx0, ny0, nx1, ny1), orig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for logs and results."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def letterbox_geometry(height0: int, width0: int, height: int, width: int) -> tuple[float, int, int, int, int]:
    """``(scale, new_w, new_h, pad_x, pad_y)`` of a ``height0`` x ``width0`` image letterboxed to
    ``height`` x ``width``: aspect kept, ``scale = min(H/h0, W/w0)``, resized to
    ``round(w0*scale)`` x ``round(h0*scale)``, centred."""
    scale = min(height / height0, width / width0)
    new_w = min(width, max(1, round(width0 * scale)))
    new_h = min(height, max(1, round(height0 * scale)))
    return scale, new_w, new_h, (width - new_w) // 2, (height - new_h) // 2


def _resize(image: np.ndarray, spec: Preprocess) -> tuple[np.ndarray, ImageMeta]:
    cv2 = _cv2()
    height, width = spec.size
    h0, w0 = image.shape[:2]
    interp = getattr(cv2, _INTERPOLATION[spec.interpolation])
    if spec.resize == "shorter_center_crop":
        ratio = max(height / h0, width / w0)
        rw, rh = max(width, round(w0 * ratio)), max(height, round(h0 * ratio))
        image = cv2.resize(image, (rw, rh), interpolation=interp)
        top, left = (rh - height) // 2, (rw - width) // 2
        meta = ImageMeta(w0, h0, width, height, "shorter_center_crop", rw / w0, rh / h0, -left, -top, rw, rh)
        return image[top : top + height, left : left + width], meta
    if spec.resize == "letterbox":
        scale, new_w, new_h, pad_x, pad_y = letterbox_geometry(h0, w0, height, width)
        meta = ImageMeta(w0, h0, width, height, "letterbox", scale, scale, pad_x, pad_y, new_w, new_h)
        if (new_h, new_w) == (height, width) == (h0, w0):
            return image, meta
        resized = image if (new_h, new_w) == (h0, w0) else cv2.resize(image, (new_w, new_h), interpolation=interp)
        canvas = np.full((height, width, *image.shape[2:]), LETTERBOX_FILL, dtype=image.dtype)
        canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
        return canvas, meta
    meta = ImageMeta(w0, h0, width, height, "stretch", width / w0, height / h0, 0.0, 0.0, width, height)
    if image.shape[:2] == (height, width):
        return image, meta
    return cv2.resize(image, (width, height), interpolation=interp), meta


def preprocess_image(image: np.ndarray, spec: Preprocess | Mapping[str, Any],
                     meta: list[ImageMeta] | None = None) -> np.ndarray:
    """One decoded image (uint8) → one model input *without* the batch axis.

    ``meta``: a list to which the image's :class:`ImageMeta` is appended (how it was resized,
    padded or cropped), for post-processing that maps results back onto the original image.
    """
    spec = as_preprocess(spec)
    image, where = _resize(_convert_color(np.asarray(image), spec.color), spec)
    if meta is not None:
        meta.append(where)
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


def preprocess_tensor(x: np.ndarray, spec: Preprocess | Mapping[str, Any]) -> np.ndarray:
    """A batch of raw tensors (batch first) → ``(x * scale - mean) / std`` per channel on axis 1, as ``dtype``."""
    spec = as_preprocess(spec)
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise InputError(f"tensor preprocessing needs a real numeric array, not dtype {x.dtype}",
                         code=ErrorCode.INPUT_BAD_DTYPE)
    x = x.astype(np.float32) * np.float32(spec.scale)
    for name, op in (("mean", np.subtract), ("std", np.divide)):
        values = getattr(spec, name)
        if values is None:
            continue
        v = np.asarray(values, dtype=np.float32)
        if len(v) > 1:
            if x.ndim < 2 or x.shape[1] != len(v):
                raise InputError(
                    f"preprocess.{name} has {len(v)} values (one per channel on axis 1) but the batch has shape "
                    f"{x.shape}", code=ErrorCode.INPUT_BAD_SHAPE)
            v = v.reshape(1, len(v), *([1] * (x.ndim - 2)))
        x = op(x, v)
    return np.ascontiguousarray(x, dtype=spec.dtype)


def _shape_text(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _fits(shape: Sequence[int], want: Sequence[int | str]) -> bool:
    return len(shape) == len(want) and all(not isinstance(w, int) or w == s for s, w in zip(shape, want))


def _tensor_batch(items: Any, input_shape: Sequence[int | str] | None) -> np.ndarray:
    """Samples (arrays or ``.npy`` paths) and/or batches → one raw batch, checked against the input shape.

    With ``input_shape`` (batch first) an array of the input's rank is a batch and one of rank − 1
    a single sample; without it, a lone array is a batch and each item of a list one sample.
    """
    sample = list(input_shape[1:]) if input_shape is not None else None
    expected = (f"one sample of shape {_shape_text(sample)} or a batch of shape {_shape_text(input_shape)}"
                if sample is not None else "")

    def as_batch(a: np.ndarray, lone: bool, where: str) -> np.ndarray:
        if sample is None:
            return a if lone else a[None]
        if _fits(a.shape, sample):
            return a[None]
        if a.ndim == len(sample) + 1 and _fits(a.shape[1:], sample):
            return a
        raise InputError(f"{where} has shape {a.shape}; the model takes {expected}", code=ErrorCode.INPUT_BAD_SHAPE)

    if isinstance(items, np.ndarray):
        return as_batch(items, True, "the array")
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    batches = []
    for i, item in enumerate(items):
        where = f"input {i}"
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.suffix.lower() != ".npy":
                raise InputError(f"{path} is not a .npy file; tensor preprocessing reads .npy files or arrays",
                                 code=ErrorCode.INPUT_UNSUPPORTED)
            if not path.is_file():
                raise InputError(f"{path} does not exist", code=ErrorCode.INPUT_MISSING)
            try:
                item = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{path} is not a readable .npy file ({exc})",
                                 code=ErrorCode.INPUT_UNREADABLE) from None
            where = str(path)
        elif not isinstance(item, np.ndarray):
            if isinstance(item, (list, tuple)) or np.isscalar(item):
                item = np.asarray(item)
            else:
                raise InputError(f"cannot preprocess a {type(item).__name__}", code=ErrorCode.INPUT_UNSUPPORTED)
        batches.append(as_batch(item, False, where))
    if not batches:
        raise InputError("no inputs given", code=ErrorCode.INPUT_MISSING)
    shapes = {b.shape[1:] for b in batches}
    if len(shapes) > 1:
        raise InputError(f"the samples have different shapes {sorted(shapes)}; "
                         f"the model takes {expected or 'one shape'}", code=ErrorCode.INPUT_BAD_SHAPE)
    return np.concatenate(batches)


def preprocess_batch(items: Iterable[str | os.PathLike | np.ndarray] | np.ndarray,
                     spec: Preprocess | Mapping[str, Any] | None,
                     input_shape: Sequence[int | str] | None = None,
                     meta: list[ImageMeta] | None = None) -> np.ndarray:
    """Inputs → one batch tensor, as ``spec`` says.

    ``image``: image paths and/or decoded images. ``tensor``: raw arrays (one sample each,
    shaped like the model input without the batch axis), ``.npy`` paths, or one batched
    array. ``input_shape``: the model input's shape, batch first (symbolic dimensions as
    strings); tensors of another shape are refused with ``INPUT_BAD_SHAPE`` naming it.
    ``meta``: for images, a list that gets one :class:`ImageMeta` per image, in batch order
    (original size, scale, padding or crop); tensors add nothing to it.
    """
    if spec is not None:
        spec = as_preprocess(spec)
    if spec is None:
        raise InputError("this bundle has no preprocessing; pass tensors to run()", code=ErrorCode.INPUT_UNSUPPORTED)
    if spec.type == "tensor":
        return preprocess_tensor(_tensor_batch(items, input_shape), spec)
    if spec.type != "image":
        raise InputError(
            f"this runtime does not know preprocessing of type {spec.type!r} (it applies "
            f"'image' and 'tensor'); pass preprocessed tensors to run(), or upgrade edgekit-runtime",
            code=ErrorCode.INPUT_UNSUPPORTED,
        )
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):  # decoded as arrays are taken to be: gray or RGB
            item = read_image(item, "gray" if spec.color == "gray" else "rgb")
        elif not isinstance(item, np.ndarray):
            raise InputError(f"cannot preprocess a {type(item).__name__}", code=ErrorCode.INPUT_UNSUPPORTED)
        out.append(preprocess_image(item, spec, meta))
    if not out:
        raise InputError("no inputs given", code=ErrorCode.INPUT_MISSING)
    return np.stack(out)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def postprocess(output: np.ndarray, spec: Postprocess | Mapping[str, Any] | None,
                labels: Sequence[str] | None, meta: Sequence[ImageMeta | None] | None = None) -> list[dict]:
    """Batch output → one result per item (classification: top-k with labels; detection: boxes;
    segmentation: a mask), as ``spec.type`` says; other types give the raw output per item.

    ``meta``: one :class:`ImageMeta` per item (from :func:`preprocess_batch`), for detection and
    segmentation, whose boxes and masks are mapped back onto the original images
    (:meth:`ImageMeta.identity` keeps them in network-input pixels).
    """
    spec = as_postprocess(spec)
    if spec is not None and spec.type in DENSE_POSTPROCESS:
        if meta is None or len(meta) != len(output) or any(m is None for m in meta):
            raise InputError(f"{spec.type} post-processing needs each image's ImageMeta (from preprocess_batch's "
                             f"meta=) to map results onto the original image", code=ErrorCode.INPUT_MISSING)
        from .detection import postprocess as dense_postprocess  # detection imports this module

        return [dense_postprocess(row, m, spec, labels) for row, m in zip(output, meta)]
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
