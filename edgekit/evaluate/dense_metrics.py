"""Detection and segmentation metrics on the host: COCO mAP through pycocotools, a detection confusion matrix,
and mIoU / Dice / pixel accuracy from label masks.

mAP comes from pycocotools' ``COCOeval`` (the reference whose numbers papers and model zoos quote), not from
a re-implementation, so a figure here can be compared with a published one. Every value is a fraction in
0..1 (not %), JSON-ready (plain floats, ints, lists, dicts); a metric that is undefined for the data (AP of
a class with no ground-truth box, IoU of a class absent from ground truth and prediction) is ``None``.

Boxes are ``x0, y0, x1, y1`` in pixels of the original image, class indices count from 0: what
:mod:`edgekit.data.detection` loads and what the runtime's detection results hold.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import CalibrationError

log = logging.getLogger(__name__)

MAX_DETECTIONS = 100  # COCOeval's largest maxDets, and the manifest's max_detections default
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # COCO's 0.50:0.05:0.95
RECALL_POINTS = 101  # COCOeval interpolates precision at recall 0.00, 0.01, ..., 1.00


# ----------------------------------------------------------------------------- inputs
def _image_entry(item: Any, index: int, what: str, num_classes: int,
                 need_scores: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One image's (boxes (N,4) float64, labels (N,) int64, scores (N,) or None), checked.

    Accepted forms: a tuple ``(boxes, labels[, scores])``; a mapping with ``boxes``, ``labels`` and
    ``scores``; the runtime's detection result ``{"detections": [{"box", "class", "score"}, ...]}``;
    or an object with ``boxes`` and ``labels`` attributes (a data :class:`~edgekit.data.detection.Record`).
    """
    scores = None
    if isinstance(item, Mapping) and "detections" in item:
        dets = item["detections"]
        boxes = [d["box"] for d in dets]
        labels = [d["class"] for d in dets]
        scores = [d.get("score", 1.0) for d in dets]
    elif isinstance(item, Mapping):
        boxes, labels, scores = item.get("boxes"), item.get("labels"), item.get("scores")
    elif hasattr(item, "boxes") and hasattr(item, "labels"):
        boxes, labels, scores = item.boxes, item.labels, getattr(item, "scores", None)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        boxes, labels = item[0], item[1]
        scores = item[2] if len(item) == 3 else None
    else:
        raise CalibrationError(f"{what} of image {index} is a {type(item).__name__}",
                               hint="give (boxes (N,4) x0,y0,x1,y1, labels (N,)[, scores (N,)]) per image")
    b = np.asarray(boxes if boxes is not None else [], dtype=np.float64)
    b = b.reshape(0, 4) if b.size == 0 else b  # an empty list has no second axis
    lab = np.asarray(labels if labels is not None else [])
    lab = lab.reshape(0) if lab.size == 0 else lab
    if b.ndim != 2 or b.shape[1] != 4:
        raise CalibrationError(f"{what} of image {index}: boxes have shape {b.shape}",
                               hint="boxes are (N, 4): x0, y0, x1, y1 in pixels")
    if lab.shape != (len(b),):
        raise CalibrationError(f"{what} of image {index}: {len(b)} boxes but labels of shape {lab.shape}",
                               hint="give one class index per box")
    if len(lab) and not np.all(np.equal(np.mod(lab, 1), 0)):
        raise CalibrationError(f"{what} of image {index}: class indices must be integers, got {lab[:5]}")
    lab = lab.astype(np.int64)
    bad = (lab < 0) | (lab >= num_classes)
    if bad.any():
        raise CalibrationError(f"{what} of image {index} has class {int(lab[bad][0])}, but there are "
                               f"{num_classes} classes (0..{num_classes - 1})",
                               hint="evaluate with the class names the model was trained on, in the same order")
    if not np.isfinite(b).all():
        raise CalibrationError(f"{what} of image {index} has a box that is not finite")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise CalibrationError(f"{what} of image {index} has a box with x1 < x0 or y1 < y0",
                               hint="boxes are x0, y0, x1, y1 (corners), not x, y, width, height")
    s = None
    if need_scores:
        s = np.ones(len(b)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape != (len(b),) or not np.isfinite(s).all():
            raise CalibrationError(f"{what} of image {index}: {len(b)} boxes but scores {s.shape}",
                                   hint="give one finite score per predicted box")
    return b, lab, s


def _entries(predictions: Sequence[Any], ground_truth: Sequence[Any], num_classes: int):
    if len(predictions) != len(ground_truth):
        raise CalibrationError(f"{len(predictions)} images of predictions for {len(ground_truth)} of ground truth",
                               hint="give one prediction entry per ground-truth image, in the same order "
                                    "(an empty one where the model found nothing)")
    preds = [_image_entry(p, i, "prediction", num_classes, True) for i, p in enumerate(predictions)]
    gts = [_image_entry(g, i, "ground truth", num_classes, False) for i, g in enumerate(ground_truth)]
    return preds, gts


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of boxes x0, y0, x1, y1 (areas as width × height, as COCO computes them)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# ----------------------------------------------------------------------------- COCO mAP
def _coco(images: list[dict], categories: list[dict], annotations: list[dict]):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = {"images": images, "categories": categories, "annotations": annotations}
    c.createIndex()
    return c


def _ann(ann_id: int, image_id: int, box: np.ndarray, label: int, score: float | None) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    # ids from 1: COCOeval marks a match by storing the partner's id, so an id of 0 reads as "unmatched"
    ann = {"id": ann_id, "image_id": image_id, "category_id": label + 1, "bbox": [x0, y0, w, h],
           "area": w * h, "iscrowd": 0}
    if score is not None:
        ann["score"] = float(score)
    return ann


def _mean_valid(p: np.ndarray) -> float | None:
    """COCOeval's summary: the mean over entries that are not -1 (-1: no ground truth), None if none is."""
    v = p[p > -1]
    return float(v.mean()) if v.size else None


def _stat(v: float) -> float | None:
    return None if v < 0 else float(v)


def coco_map(predictions: Sequence[Any], ground_truth: Sequence[Any], class_names: Sequence[str]) -> dict[str, Any]:
    """COCO box mAP of per-image predictions against ground truth, computed by pycocotools' ``COCOeval``.

    ``predictions[i]`` / ``ground_truth[i]`` describe the same image: ``(boxes (N,4) x0,y0,x1,y1 pixels,
    labels (N,) class index from 0, scores (N,))`` (ground truth without scores); a mapping with those keys,
    a runtime result ``{"detections": [...]}`` or a data ``Record`` work too. An image with neither boxes
    nor predictions is allowed and changes nothing.

    Returned values are fractions in 0..1: ``map`` (AP averaged over IoU 0.50:0.05:0.95, COCO's headline
    figure), ``map50``, ``map75``, ``mar100`` (recall with at most 100 detections per image), ``map_small`` /
    ``map_medium`` / ``map_large`` (COCO's area ranges split at 32² and 96² pixels, here of the *box* area;
    COCO's own files give the mask area, so only these three can differ from a figure computed from such a
    file), ``per_class`` ({name: {"ap", "ap50", "gt", "predictions"}}), ``pr_curve`` (precision at IoU 0.5 on
    COCOeval's 101-point recall grid, per class) and the counts ``images``, ``gt_boxes``, ``predictions``,
    ``classes_with_gt``. pycocotools divides by ``tp + fp + eps``, so a perfect score reads 0.9999999999999998.

    COCO conventions kept: at most 100 detections per image and class, ranked by score; a class without any
    ground-truth box has AP -1 in COCOeval, reported here as ``None`` and left out of every mean (its false
    positives count nowhere), exactly as COCOeval's own summary does; a metric with no class to average is
    ``None``. A class index outside ``class_names`` is refused (:class:`~edgekit.errors.CalibrationError`).
    """
    from pycocotools.cocoeval import COCOeval

    names = [str(n) for n in class_names]
    if not names:
        raise CalibrationError("no class names given", hint="pass the dataset's class names, in label order")
    preds, gts = _entries(predictions, ground_truth, len(names))
    images = [{"id": i + 1} for i in range(len(gts))]
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    gt_anns = [_ann(0, i + 1, b, int(lab), None) for i, (boxes, labels, _) in enumerate(gts)
               for b, lab in zip(boxes, labels)]
    dt_anns = [_ann(0, i + 1, b, int(lab), s) for i, (boxes, labels, scores) in enumerate(preds)
               for b, lab, s in zip(boxes, labels, scores)]
    for n, a in enumerate(gt_anns, 1):
        a["id"] = n
    for n, a in enumerate(dt_anns, 1):
        a["id"] = n

    chatter = io.StringIO()  # pycocotools prints its progress and the summary table to stdout
    with contextlib.redirect_stdout(chatter):
        ev = COCOeval(_coco(images, categories, gt_anns), _coco(images, categories, dt_anns), iouType="bbox")
        ev.params.maxDets = [1, 10, MAX_DETECTIONS]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("pycocotools:\n%s", chatter.getvalue())

    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]; -1: no ground truth
    iou50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    all_area, max_dets = 0, len(ev.params.maxDets) - 1
    gt_count = np.bincount(np.concatenate([g[1] for g in gts] or [np.zeros(0, np.int64)]), minlength=len(names))
    dt_count = np.bincount(np.concatenate([p[1] for p in preds] or [np.zeros(0, np.int64)]), minlength=len(names))
    per_class: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[float] | None] = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, all_area, max_dets]
        ap50 = _mean_valid(p[iou50])
        per_class[name] = {"ap": _mean_valid(p), "ap50": ap50, "gt": int(gt_count[k]), "predictions": int(dt_count[k])}
        curves[name] = None if ap50 is None else [float(v) for v in p[iou50]]
    stats = ev.stats
    return {
        "map": _stat(stats[0]), "map50": _stat(stats[1]), "map75": _stat(stats[2]),
        "map_small": _stat(stats[3]), "map_medium": _stat(stats[4]), "map_large": _stat(stats[5]),
        "mar100": _stat(stats[8]),
        "per_class": per_class,
        "pr_curve": {"iou": 0.5, "recall": [float(r) for r in ev.params.recThrs], "precision": curves},
        "images": len(gts), "gt_boxes": len(gt_anns), "predictions": len(dt_anns),
        "classes_with_gt": int((gt_count > 0).sum()),
    }


# ----------------------------------------------------------------------------- detection confusion
def confusion_at_iou(predictions: Sequence[Any], ground_truth: Sequence[Any], num_classes: int,
                     iou: float = 0.5, score_threshold: float = 0.25) -> np.ndarray:
    """Detection confusion matrix, (C+1) × (C+1) int64: rows the true class, columns the predicted class,
    index C (the last) is background.

    Predictions scoring below ``score_threshold`` are dropped (the manifest's default is 0.25). The rest are
    matched per image greedily in descending score, as the YOLO tools' confusion matrix does: each prediction
    takes the still-unmatched ground-truth box with the highest IoU ≥ ``iou``, whatever its class, so a box
    found with the wrong class lands off the diagonal. A ground-truth box no prediction took counts in
    ``[true class, background]`` (missed); a prediction that took no box counts in ``[background,
    predicted class]`` (false positive). ``[background, background]`` stays 0. Row sums (without the last
    row) are the ground-truth boxes per class; column sums the kept predictions per class.
    """
    if not 0.0 < iou <= 1.0:
        raise CalibrationError(f"iou must be in (0, 1], got {iou}")
    preds, gts = _entries(predictions, ground_truth, num_classes)
    bg = num_classes
    cm = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for (pb, pl, ps), (gb, gl, _) in zip(preds, gts):
        keep = ps >= score_threshold
        pb, pl, ps = pb[keep], pl[keep], ps[keep]
        order = np.argsort(-ps, kind="stable")
        ious = box_iou(pb, gb)
        taken = np.zeros(len(gb), dtype=bool)
        for d in order:
            cand = np.where(taken, -1.0, ious[d]) if len(gb) else np.zeros(0)
            g = int(np.argmax(cand)) if len(cand) else -1
            if g >= 0 and cand[g] >= iou:
                taken[g] = True
                cm[gl[g], pl[d]] += 1
            else:
                cm[bg, pl[d]] += 1
        for g in np.flatnonzero(~taken):
            cm[gl[g], bg] += 1
    return cm


# ----------------------------------------------------------------------------- segmentation
def segmentation_confusion(pred_masks: Iterable[np.ndarray], gt_masks: Iterable[np.ndarray], num_classes: int,
                           ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 pixel confusion over all images: rows the ground-truth class, columns the predicted one.

    Pixels whose ground truth is ``ignore_index`` are not counted. A mask value outside 0..K-1 (other than
    ``ignore_index`` in ground truth) is refused, as is a prediction of another size than its ground truth.
    """
    k = int(num_classes)
    if k < 1:
        raise CalibrationError(f"num_classes must be ≥ 1 (background included), got {num_classes}")
    cm = np.zeros(k * k, dtype=np.int64)
    n = 0
    for n, (p, g) in enumerate(zip(pred_masks, gt_masks, strict=True), 1):
        p, g = np.asarray(p), np.asarray(g)
        if p.shape != g.shape or g.ndim != 2:
            raise CalibrationError(f"image {n - 1}: predicted mask {p.shape} vs ground truth {g.shape}",
                                   hint="masks are (H, W) class indices at the original image size")
        valid = g != ignore_index
        gv, pv = g[valid].astype(np.int64), p[valid].astype(np.int64)
        for what, v in (("ground truth", gv), ("prediction", pv)):
            if v.size and (v.min() < 0 or v.max() >= k):
                bad = int(v.max()) if v.max() >= k else int(v.min())
                raise CalibrationError(f"image {n - 1}: {what} mask has value {bad}, but there are {k} classes "
                                       f"(0 background .. {k - 1})",
                                       hint=f"num_classes counts background; pixels to skip carry {ignore_index}")
        cm += np.bincount(gv * k + pv, minlength=k * k)
    if n == 0:
        raise CalibrationError("no masks to evaluate")
    return cm.reshape(k, k)


def segmentation_metrics(pred_masks: Iterable[np.ndarray], gt_masks: Iterable[np.ndarray], num_classes: int,
                         ignore_index: int = 255, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Semantic-segmentation metrics from one pixel confusion matrix accumulated over every image.

    Masks are (H, W) class indices, 0 background (the PNG masks of the data and the runtime's result mask
    share this numbering); ``num_classes`` = K counts background. Pixels whose ground truth is
    ``ignore_index`` count nowhere. Fractions in 0..1:

    - ``miou``: mean IoU = TP / (TP + FP + FN) over all K classes *including background*, leaving out a class
      that appears in neither ground truth nor prediction (its IoU is 0/0). This is the common convention
      (mmsegmentation, torchmetrics' JaccardIndex with absent classes skipped).
    - ``mean_dice``: mean Dice = 2·TP / (2·TP + FP + FN) over the *foreground* classes 1..K-1 present in
      ground truth or prediction (background would inflate it).
    - ``pixel_accuracy``: correctly labelled pixels / counted pixels.
    - ``per_class``: {name: {"iou", "dice", "gt_pixels", "pred_pixels"}} (None where undefined);
      ``confusion``: the K × K counts (rows ground truth, columns prediction).

    ``class_names`` (K names, e.g. a segmentation bundle's labels ``["background", *classes]``) name the rows;
    without them classes are "background", "1", "2", ...
    """
    k = int(num_classes)
    names = [str(v) for v in class_names] if class_names is not None else ["background", *map(str, range(1, k))]
    if len(names) != k:
        raise CalibrationError(f"{len(names)} class names for {k} classes",
                               hint="give K names, background first (a segmentation bundle's labels)")
    cm = segmentation_confusion(pred_masks, gt_masks, k, ignore_index)
    tp = np.diag(cm).astype(np.float64)
    gt_px, pred_px = cm.sum(axis=1), cm.sum(axis=0)
    union = gt_px + pred_px - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros(k), where=present)
    dice = np.divide(2 * tp, gt_px + pred_px, out=np.zeros(k), where=present)
    fg = present.copy()
    fg[0] = False
    total = int(cm.sum())
    return {
        "miou": float(iou[present].mean()) if present.any() else None,
        "mean_dice": float(dice[fg].mean()) if fg.any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "per_class": {n: {"iou": float(iou[i]) if present[i] else None,
                          "dice": float(dice[i]) if present[i] else None,
                          "gt_pixels": int(gt_px[i]), "pred_pixels": int(pred_px[i])} for i, n in enumerate(names)},
        "pixels": total,
        "confusion": cm.tolist(),
    }


# ----------------------------------------------------------------------------- from raw model outputs
# Scoring settings (COCO practice): low-score boxes are kept so the whole precision-recall curve counts. The
# device reports with the bundle's own thresholds; these are for measuring, on the host and in the gates.
EVAL_SCORE_THRESHOLD = 0.001
EVAL_IOU_THRESHOLD = 0.6


def detections_from_raw(raw: np.ndarray, input_hw: Sequence[int], strides: Sequence[int],
                        score_threshold: float = EVAL_SCORE_THRESHOLD, iou_threshold: float = EVAL_IOU_THRESHOLD,
                        max_detections: int = MAX_DETECTIONS) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image of the detector's raw output ``(B, A, 4 + C)``: ``(boxes, labels, scores)`` in network-input
    pixels, through the device runtime's own decode and class-aware NMS (``edgekit_runtime.detection``)."""
    from edgekit_runtime import detection as det

    points, per_point = det.anchor_points(int(input_hw[0]), int(input_hw[1]), list(strides))
    out = []
    for r in np.asarray(raw):
        boxes, scores = det.decode(r, points, per_point)
        b, s, c = det.select(boxes, scores, score_threshold, iou_threshold, max_detections)
        out.append((b, c, s))
    return out


def detections_from_rows(rows: np.ndarray, score_threshold: float = EVAL_SCORE_THRESHOLD,
                         max_detections: int = MAX_DETECTIONS) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image of a graph's own NMS output ``(B, N, 6)`` (x0, y0, x1, y1, score, class): ``(boxes, labels,
    scores)`` in network-input pixels, selected by the runtime's own ``select_rows``."""
    from edgekit_runtime.detection import select_rows

    out = []
    for r in np.asarray(rows, dtype=np.float32):
        kept = select_rows(r, score_threshold, max_detections)
        out.append((r[kept, :4], np.rint(r[kept, 5]).astype(np.int64), r[kept, 4]))
    return out


def padded_targets(y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(N, M, 5)`` targets (class, x0, y0, x1, y1; class −1 pads) → per-image ``(boxes, labels)``."""
    out = []
    for t in np.asarray(y, dtype=np.float32):
        real = t[:, 0] >= 0
        out.append((t[real, 1:], t[real, 0].astype(np.int64)))
    return out


def detection_map_raw(raw: np.ndarray, y: np.ndarray, class_names: Sequence[str], input_hw: Sequence[int],
                      strides: Sequence[int]) -> dict[str, Any]:
    """:func:`coco_map` of raw detector outputs against padded targets, both in network-input pixels: what
    training validates on every epoch and what the build's accuracy gate compares FP32 and INT8 with."""
    return coco_map(detections_from_raw(raw, input_hw, strides), padded_targets(y), class_names)


def segmentation_metrics_raw(logits: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """:func:`segmentation_metrics` of ``(N, K, h, w)`` logits against ``(N, H, W)`` masks at the network input
    size; logits at a fraction of it are resized (bilinear) first, as the device does."""
    logits = np.asarray(logits)
    y = np.asarray(y)
    if logits.shape[2:] != y.shape[1:]:
        import cv2
        from edgekit_runtime.detection import resize_channels

        h, w = y.shape[1:]
        logits = np.stack([resize_channels(cv2, np.ascontiguousarray(o.transpose(1, 2, 0)), w, h).transpose(2, 0, 1)
                           for o in logits])
    pred = logits.argmax(1).astype(np.uint8)
    return segmentation_metrics(list(pred), list(np.asarray(y).astype(np.uint8)), len(class_names),
                                class_names=list(class_names))
