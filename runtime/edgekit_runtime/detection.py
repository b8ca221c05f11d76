"""Detection and segmentation post-processing on the device (numpy + OpenCV): decode, NMS, back to the photo.

The one implementation of the detector's output contract (``docs/bundle-format.md``,
``postprocess`` of type ``detection``): the host's training loss and evaluator import
:func:`anchor_points` and :func:`decode` from here instead of restating them, so what is
trained, what is scored and what a device reports cannot drift apart.

Detector output per image: ``(A, 4 + C)`` float32, ``A`` anchor points over the levels of
``strides``; channels ``0:4`` are the distances ``(l, t, r, b)`` from the anchor point to
the box's edges in units of the level's stride, channels ``4:`` class logits (sigmoid each).
Segmenter output per image: ``(K, h, w)`` logits, channel 0 background.

Boxes and masks are mapped from network-input pixels back to the original image with the
:class:`~.processing.ImageMeta` that preprocessing recorded for the image.
"""

from __future__ import annotations

import heapq
from typing import Any, Sequence

import numpy as np

from .contract.errors import ErrorCode, InputError
from .contract.manifest import DENSE_POSTPROCESS, Postprocess
from .processing import ImageMeta, as_postprocess, cv2_module


def anchor_points(height: int, width: int, strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Anchor point centres ``(A, 2)`` (x, y) in network-input pixels and each point's stride ``(A,)``.

    Levels in ``strides`` order, each row-major over its ``(height // s, width // s)`` grid,
    centre ``((j + 0.5) * s, (i + 0.5) * s)``: the order the detector's output rows follow.
    """
    points, point_strides = [], []
    for s in strides:
        s = int(s)
        if s < 1:
            raise InputError(f"a detection stride must be a positive integer, not {s}",
                             code=ErrorCode.INPUT_UNSUPPORTED)
        gh, gw = height // s, width // s
        xs = (np.arange(gw, dtype=np.float32) + 0.5) * s
        ys = (np.arange(gh, dtype=np.float32) + 0.5) * s
        gx, gy = np.meshgrid(xs, ys)  # (gh, gw): rows are i, columns j
        points.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        point_strides.append(np.full(gh * gw, s, dtype=np.float32))
    if not points:
        raise InputError("detection needs at least one stride", code=ErrorCode.INPUT_UNSUPPORTED)
    return np.concatenate(points).astype(np.float32), np.concatenate(point_strides)


def anchor_count(height: int, width: int, strides: Sequence[int]) -> int:
    """``A``: how many rows a detector with these strides outputs for a ``height`` x ``width`` input."""
    return sum((height // int(s)) * (width // int(s)) for s in strides)


def decode_boxes(distances: np.ndarray, points: np.ndarray, stride_per_point: np.ndarray) -> np.ndarray:
    """``(l, t, r, b)`` in stride units at each anchor point → boxes ``(x0, y0, x1, y1)`` in network-input pixels."""
    d = distances.astype(np.float32, copy=False) * stride_per_point[:, None]
    return np.concatenate([points - d[:, :2], points + d[:, 2:]], axis=1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings for large negative logits (float32 in, float32 out)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def decode(raw: np.ndarray, points: np.ndarray, stride_per_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw output ``(A, 4 + C)`` → boxes ``(A, 4)`` (network-input pixels) and scores ``(A, C)``.

    Scores are the sigmoid of the class logits; the training loss and the evaluator decode with this too.
    """
    raw = _check_raw(raw, len(points))
    return decode_boxes(raw[:, :4], points, stride_per_point), sigmoid(raw[:, 4:])


def _check_raw(raw: np.ndarray, anchors: int) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] < 5 or raw.shape[0] != anchors:
        raise InputError(
            f"a detector's output for one image must be (A, 4 + C) with A = {anchors} anchor points here, "
            f"not {raw.shape}", code=ErrorCode.INPUT_BAD_SHAPE,
            hint="postprocess.strides and preprocess.size must be those the model was trained with; rebuild the bundle")
    return raw.astype(np.float32, copy=False)


def box_iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes`` (float32, as torchvision computes it: no +1 on widths)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0)
    h = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area + areas - inter)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None, iou_threshold: float,
                max_detections: int | None = None) -> np.ndarray:
    """Greedy NMS by score, boxes of different classes never suppressing each other: kept indices, best first.

    The same boxes as torchvision's ``batched_nms`` (IoU > ``iou_threshold`` suppresses; ties in score
    keep the earlier index). Boxes of one class are compared on their own coordinates (no class
    offset, whose rounding can flip an IoU at the threshold). Each class keeps its own queue in
    score order and a heap picks the best head: a step is one vectorised IoU against the boxes
    still in play *of that class*, and ``max_detections`` ends the pass once that many are kept,
    which bounds the work (the result is the first ``max_detections`` of the full pass).
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    limit = len(order) if max_detections is None else max(0, int(max_detections))
    if classes is None or not len(order):
        queues = [order]
    else:
        by_class = order[np.argsort(np.asarray(classes)[order], kind="stable")]  # score order kept within a class
        starts = np.flatnonzero(np.diff(np.asarray(classes)[by_class], prepend=np.nan))
        queues = np.split(by_class, starts[1:])
    heap = [(-float(scores[q[0]]), int(q[0]), g) for g, q in enumerate(queues) if q.size]
    heapq.heapify(heap)
    keep: list[int] = []
    while heap and len(keep) < limit:
        _, i, g = heapq.heappop(heap)
        keep.append(i)
        rest = queues[g][1:]
        if rest.size:
            rest = rest[~(box_iou_one(boxes[i], boxes[rest]) > iou_threshold)]
            if rest.size:
                heapq.heappush(heap, (-float(scores[rest[0]]), int(rest[0]), g))
        queues[g] = rest
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy class-agnostic NMS: kept indices, best score first (torchvision ``nms``'s result)."""
    return batched_nms(boxes, scores, None, iou_threshold)


def select(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float,
           max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded boxes ``(A, 4)``, scores ``(A, C)`` → kept ``(boxes (N, 4), scores (N,), classes (N,))``, best first.

    Each anchor point is a candidate for its best class only, kept when that score is at least
    ``score_threshold``; then class-aware greedy NMS and at most ``max_detections``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2 or len(scores) != len(boxes):
        raise InputError(f"scores must be (A, C) beside boxes (A, 4), not {scores.shape} and {np.shape(boxes)}",
                         code=ErrorCode.INPUT_BAD_SHAPE)
    if scores.shape[1] == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    classes = scores.argmax(axis=1)
    best = scores[np.arange(len(scores)), classes]
    return _select_candidates(np.asarray(boxes, dtype=np.float32), best, classes, score_threshold, iou_threshold,
                              max_detections)


def _select_candidates(boxes: np.ndarray, best: np.ndarray, classes: np.ndarray, score_threshold: float,
                       iou_threshold: float, max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.flatnonzero(best >= score_threshold)
    keep = idx[batched_nms(boxes[idx], best[idx], classes[idx], iou_threshold, max_detections)]
    return boxes[keep], best[keep], classes[keep].astype(np.int64)


def postprocess_detection(raw: np.ndarray, meta: ImageMeta, spec: Postprocess | dict[str, Any],
                          labels: Sequence[str] | None) -> dict[str, Any]:
    """One image's detector output ``(A, 4 + C)`` → ``{"detections": [...], "image_size": [w0, h0]}``.

    Each detection is ``{"box": [x0, y0, x1, y1], "class": k, "label": name, "score": s}`` with the
    box in the original image's pixels (undoing the letterbox, stretch or crop recorded in
    ``meta``) and clipped to it; best score first.
    """
    spec = as_postprocess(spec)
    if spec is None or spec.type != "detection":
        raise InputError(f"postprocess_detection needs a detection spec, not {getattr(spec, 'type', None)!r}",
                         code=ErrorCode.INPUT_UNSUPPORTED)
    points, point_strides = _anchors(meta.input_height, meta.input_width, tuple(spec.strides))
    raw = _check_raw(raw, len(points))
    classes_n = raw.shape[1] - 4
    if labels is not None and len(labels) != classes_n:
        raise InputError(f"the detector outputs {classes_n} class scores but the bundle has {len(labels)} labels",
                         code=ErrorCode.INPUT_BAD_SHAPE, hint="rebuild the bundle with the model's own labels")
    logits = raw[:, 4:]
    # The best class by logit is the best by score (sigmoid is monotonic): one sigmoid per anchor, not A x C.
    classes = logits.argmax(axis=1)
    best = sigmoid(logits[np.arange(len(logits)), classes])
    candidates = np.flatnonzero(best >= spec.score_threshold)
    boxes = decode_boxes(raw[candidates, :4], points[candidates], point_strides[candidates])
    keep = batched_nms(boxes, best[candidates], classes[candidates], spec.iou_threshold, spec.max_detections)
    mapped = meta.boxes_to_original(boxes[keep])
    detections = []
    for box, k, s in zip(mapped.tolist(), classes[candidates][keep].tolist(), best[candidates][keep].tolist()):
        detections.append({"box": box, "class": int(k), "label": labels[k] if labels else str(k), "score": s})
    return {"detections": detections, "image_size": [meta.width, meta.height]}


_ANCHORS: dict[tuple[int, int, tuple[int, ...]], tuple[np.ndarray, np.ndarray]] = {}


def _anchors(height: int, width: int, strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Anchor points, computed once per input size and strides (a bundle has one; a host loop many calls)."""
    key = (int(height), int(width), tuple(int(s) for s in strides))
    if key not in _ANCHORS:
        if len(_ANCHORS) > 64:
            _ANCHORS.clear()
        _ANCHORS[key] = anchor_points(*key)
    return _ANCHORS[key]


def postprocess_segmentation(logits: np.ndarray, meta: ImageMeta, labels: Sequence[str] | None) -> dict[str, Any]:
    """One image's segmenter logits ``(K, h, w)`` → ``{"mask", "classes", "image_size"}`` at the original size.

    The logits are resized (bilinear) to the network input, the part that shows the image is cut
    out (the letterbox padding dropped; for a center crop, the part of the photo the network saw),
    resized (bilinear) to that part's size in the original image, and the argmax over channels is
    the mask: ``(h0, w0)`` uint8, 0 background, channel k = mask value k. Pixels the network never
    saw (outside a center crop) are background. ``classes`` counts pixels per label present.
    """
    cv2 = cv2_module()
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3 or logits.shape[0] < 1:
        raise InputError(f"a segmenter's output for one image must be (K, h, w), not {logits.shape}",
                         code=ErrorCode.INPUT_BAD_SHAPE)
    k = logits.shape[0]
    if k > 256:
        raise InputError(f"a segmenter with {k} channels does not fit a uint8 mask (at most 256)",
                         code=ErrorCode.INPUT_BAD_SHAPE)
    if labels is not None and len(labels) != k:
        raise InputError(f"the segmenter outputs {k} channels but the bundle has {len(labels)} labels "
                         f"(background first)", code=ErrorCode.INPUT_BAD_SHAPE,
                         hint="rebuild the bundle with labels ['background', *classes]")
    hwc = np.ascontiguousarray(logits.transpose(1, 2, 0))
    net = resize_channels(cv2, hwc, meta.input_width, meta.input_height)
    (nx0, ny0, nx1, ny1), (ox0, oy0, ox1, oy1) = meta.visible_region()
    mask = np.zeros((meta.height, meta.width), dtype=np.uint8)
    if nx1 > nx0 and ny1 > ny0 and ox1 > ox0 and oy1 > oy0:
        part = resize_channels(cv2, np.ascontiguousarray(net[ny0:ny1, nx0:nx1]), ox1 - ox0, oy1 - oy0)
        mask[oy0:oy1, ox0:ox1] = part.argmax(axis=2).astype(np.uint8)
    counts = np.bincount(mask.ravel(), minlength=k)
    classes = {(labels[i] if labels else str(i)): int(c) for i, c in enumerate(counts.tolist()) if c}
    return {"mask": mask, "classes": classes, "image_size": [meta.width, meta.height]}


def resize_channels(cv2: Any, hwc: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of an ``(h, w, K)`` float32 array, ``K`` kept even when 1 (OpenCV drops a lone channel).

    OpenCV's Python binding takes at most 128 channels an array (fewer in some builds): 64 at a time.
    """
    if hwc.shape[:2] == (height, width):
        return hwc
    parts = [cv2.resize(np.ascontiguousarray(hwc[:, :, i : i + 64]), (width, height), interpolation=cv2.INTER_LINEAR)
             .reshape(height, width, -1) for i in range(0, hwc.shape[2], 64)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def postprocess(raw: np.ndarray, meta: ImageMeta, spec: Postprocess | dict[str, Any],
                labels: Sequence[str] | None) -> dict[str, Any]:
    """One image's first output → its result, by ``spec.type`` (``detection`` or ``segmentation``)."""
    spec = as_postprocess(spec)
    kind = getattr(spec, "type", None)
    if kind == "detection":
        return postprocess_detection(raw, meta, spec, labels)
    if kind == "detections":
        return postprocess_detections(raw, meta, spec, labels)
    if kind == "segmentation":
        return postprocess_segmentation(raw, meta, labels)
    raise InputError(f"detection.postprocess handles {', '.join(map(repr, DENSE_POSTPROCESS))}, not {kind!r}",
                     code=ErrorCode.INPUT_UNSUPPORTED)


def select_rows(rows: np.ndarray, score_threshold: float, max_detections: int) -> np.ndarray:
    """Indices of the ``(N, 6)`` rows (x0, y0, x1, y1, score, class) a graph's own NMS gave that are kept:
    score at least ``score_threshold``, best first (ties in row order), at most ``max_detections``."""
    scores = rows[:, 4]
    kept = np.flatnonzero(scores >= score_threshold)
    return kept[np.argsort(-scores[kept], kind="stable")][:max_detections]


def postprocess_detections(rows: np.ndarray, meta: ImageMeta, spec: Postprocess | dict[str, Any],
                           labels: Sequence[str] | None) -> dict[str, Any]:
    """One image's rows from a graph that ran its own NMS, ``(N, 6)``: ``x0, y0, x1, y1, score, class`` in
    network-input pixels (a YOLO end-to-end export) → the same result as :func:`postprocess_detection`:
    rows scoring at least ``score_threshold``, best first, at most ``max_detections``, boxes on the original
    image. Unused rows (score 0, as such exports pad) fall below any positive threshold."""
    spec = as_postprocess(spec)
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != 6:
        raise InputError(f"a detections output for one image must be (N, 6) rows x0, y0, x1, y1, score, class, "
                         f"not {rows.shape}", code=ErrorCode.INPUT_BAD_SHAPE)
    if not np.isfinite(rows).all():
        raise InputError("the detections output holds NaN or infinite values", code=ErrorCode.INPUT_BAD_SHAPE)
    scores = rows[:, 4]
    kept = select_rows(rows, spec.score_threshold, spec.max_detections)
    classes = np.rint(rows[kept, 5]).astype(np.int64)
    if labels is not None and len(classes) and (classes.min() < 0 or classes.max() >= len(labels)):
        raise InputError(f"the model gave class {int(classes.max() if classes.max() >= len(labels) else classes.min())}"
                         f" but the bundle has {len(labels)} labels", code=ErrorCode.INPUT_BAD_SHAPE,
                         hint="rebuild the bundle with the model's own labels, in its class order")
    mapped = meta.boxes_to_original(rows[kept, :4])
    detections = [{"box": box, "class": int(k), "label": labels[k] if labels else str(k), "score": float(s)}
                  for box, k, s in zip(mapped.tolist(), classes.tolist(), scores[kept].tolist())]
    return {"detections": detections, "image_size": [meta.width, meta.height]}
