"""Detection and segmentation PNGs: precision–recall curves per class, a box gallery (ground truth beside each
predictor, e.g. FP32 and INT8) and segmentation overlays. Each function returns the path it wrote.

The PR curves are a matplotlib figure (Agg canvas, no pyplot state), like :mod:`edgekit.evaluate.plots`. The
galleries are composed with OpenCV at a fixed cell size instead: boxes and masks are drawn on the pixels of
the image itself (a 128-pixel image would be resampled, and thin box lines lost, inside a matplotlib axis),
and the PNG's size follows from the number of rows and columns alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CalibrationError
from .dense_metrics import _image_entry
from .plots import _figure, _save

CELL = 256  # gallery cell side in pixels: images are letterboxed into CELL × CELL
HEADER = 28  # gallery column-title strip height in pixels
LEGEND = 24  # overlay legend strip height in pixels
MAX_ROWS = 16


def _palette(n: int) -> np.ndarray:
    """n distinct RGB colours (matplotlib's tab10/tab20 cycle), uint8."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(max(n, 1))]) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- PR curves
def plot_pr_curves(results: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Precision against recall at IoU 0.5, one panel per class, one line per predictor.

    ``results``: {predictor name: :func:`~edgekit.evaluate.dense_metrics.coco_map` result}, e.g.
    ``{"FP32": ..., "INT8": ...}``; the legend gives each line's AP50. A class without ground truth says so.
    """
    if not results:
        raise CalibrationError("no detection results to plot", hint="pass {name: coco_map(...)}")
    first = next(iter(results.values()))
    classes = list(first["pr_curve"]["precision"])
    cols = min(4, max(1, len(classes)))
    rows = max(1, math.ceil(len(classes) / cols))
    fig = _figure(3.4 * cols, 3.0 * rows)
    for i, name in enumerate(classes):
        ax = fig.add_subplot(rows, cols, i + 1)
        for pred, res in results.items():
            curve = res["pr_curve"]["precision"].get(name)
            if curve is not None:
                ap50 = res["per_class"][name]["ap50"]
                ax.plot(res["pr_curve"]["recall"], curve, lw=1.4, label=f"{pred} (AP50 {ap50:.3f})")
        if ax.lines:
            ax.legend(loc="lower left", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or "precision–recall at IoU 0.5 (COCO 101-point recall grid)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- galleries (OpenCV)
def _read_rgb(image: Any) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a path or an array (gray is repeated to three channels)."""
    import cv2

    if isinstance(image, (str, Path)):
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise CalibrationError(f"cannot read image {image}", hint="give a readable image file or an array")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise CalibrationError(f"an image of shape {img.shape} cannot be drawn", hint="give (H, W, 3) RGB arrays")
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[:, :, :3])


def _fit(img: np.ndarray, interpolation: int | None = None) -> tuple[np.ndarray, float, int, int]:
    """``img`` letterboxed into a CELL × CELL cell: (cell, scale, pad_x, pad_y)."""
    import cv2

    h, w = img.shape[:2]
    scale = min(CELL / h, CELL / w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = interpolation if interpolation is not None else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cell = np.full((CELL, CELL, 3), 40, dtype=np.uint8)
    px, py = (CELL - nw) // 2, (CELL - nh) // 2
    cell[py:py + nh, px:px + nw] = cv2.resize(img, (nw, nh), interpolation=interp)
    return cell, scale, px, py


def _header(titles: Sequence[str]) -> np.ndarray:
    import cv2

    strip = np.full((HEADER, CELL * len(titles), 3), 255, dtype=np.uint8)
    for c, t in enumerate(titles):
        cv2.putText(strip, str(t)[:28], (c * CELL + 6, HEADER - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return strip


def _write_png(rgb: np.ndarray, path: Path) -> Path:
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise CalibrationError(f"could not write {path}", hint="check that the folder is writable")
    return path


def _draw_boxes(cell: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None,
                names: Sequence[str], colours: np.ndarray, scale: float, px: int, py: int) -> None:
    import cv2

    for i, (box, lab) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * scale + px, box[1] * scale + py,
                                                  box[2] * scale + px, box[3] * scale + py))
        colour = tuple(int(v) for v in colours[int(lab)])
        cv2.rectangle(cell, (x0, y0), (x1, y1), colour, 2)
        text = names[int(lab)] + (f" {scores[i]:.2f}" if scores is not None else "")
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = max(th + 2, y0)
        cv2.rectangle(cell, (x0, ty - th - 3), (x0 + tw + 2, ty), colour, -1)
        cv2.putText(cell, text, (x0 + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def plot_detection_gallery(images: Sequence[Any], ground_truth: Sequence[Any],
                           predictions: Mapping[str, Sequence[Any]], class_names: Sequence[str], path: Path,
                           score_threshold: float = 0.25, max_images: int = 8) -> Path:
    """A grid of images with boxes: one row per image, the ground truth in the first column and one column per
    predictor (e.g. ``{"FP32": preds, "INT8": preds}``), boxes coloured by class and labelled with the score.

    Entries are those :func:`~edgekit.evaluate.dense_metrics.coco_map` takes (boxes in the image's own
    pixels); ``images`` are paths or (H, W, 3) RGB arrays. Predictions below ``score_threshold`` are not drawn.
    The PNG is ``CELL × (1 + predictors)`` wide and ``HEADER + CELL × rows`` high.
    """
    names = [str(n) for n in class_names]
    rows = min(len(images), max_images, MAX_ROWS)
    if rows == 0:
        raise CalibrationError("no images to draw")
    for name, preds in predictions.items():
        if len(preds) < rows:
            raise CalibrationError(f"predictor {name!r} has {len(preds)} entries for {rows} images")
    colours = _palette(len(names))
    grid = []
    for r in range(rows):
        img = _read_rgb(images[r])
        cells = []
        entries = [_image_entry(ground_truth[r], r, "ground truth", len(names), False)]
        entries += [_image_entry(preds[r], r, f"prediction {name!r}", len(names), True)
                    for name, preds in predictions.items()]
        for c, (boxes, labels, scores) in enumerate(entries):
            cell, scale, px, py = _fit(img)
            if scores is not None:
                keep = scores >= score_threshold
                boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
            _draw_boxes(cell, boxes, labels, scores, names, colours, scale, px, py)
            cells.append(cell)
        grid.append(np.concatenate(cells, axis=1))
    canvas = np.concatenate([_header(["ground truth", *predictions]), *grid], axis=0)
    return _write_png(canvas, path)


def _blend(img: np.ndarray, mask: np.ndarray, colours: np.ndarray, ignore_index: int, alpha: float) -> np.ndarray:
    """``img`` with every foreground pixel tinted its class colour; ignored pixels are greyed out.

    ``colours[k - 1]`` is mask value k's colour, so a class has the same colour here as its boxes in the
    detection gallery (dataset class k - 1).
    """
    out = img.astype(np.float64)
    m = np.asarray(mask)
    fg = (m > 0) & (m != ignore_index)
    idx = np.clip(m.astype(np.int64) - 1, 0, len(colours) - 1)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[idx[fg]]
    out[m == ignore_index] = 0.5 * out[m == ignore_index] + 0.5 * 128
    return out.astype(np.uint8)


def plot_segmentation_overlays(images: Sequence[Any], gt_masks: Sequence[np.ndarray],
                               pred_masks: Mapping[str, Sequence[np.ndarray]], class_names: Sequence[str],
                               path: Path, ignore_index: int = 255, alpha: float = 0.55,
                               max_images: int = 8) -> Path:
    """One row per image: the image, the ground-truth mask blended on it, and each predictor's mask blended on
    it (e.g. ``{"FP32": masks, "INT8": masks}``); a legend strip names the class colours.

    Masks are (H, W) class indices at the image's size, 0 background (left untinted); ``class_names`` are the
    K names with background first. The PNG is ``CELL × (2 + predictors)`` wide and
    ``HEADER + CELL × rows + LEGEND`` high.
    """
    import cv2

    names = [str(n) for n in class_names]
    rows = min(len(images), max_images, MAX_ROWS)
    if rows == 0:
        raise CalibrationError("no images to draw")
    colours = _palette(len(names) - 1)
    titles = ["image", "ground truth", *pred_masks]
    grid = []
    for r in range(rows):
        img = _read_rgb(images[r])
        masks = [gt_masks[r], *(m[r] for m in pred_masks.values())]
        for m in masks:
            if np.asarray(m).shape != img.shape[:2]:
                raise CalibrationError(f"image {r} is {img.shape[1]}×{img.shape[0]} but a mask is "
                                       f"{np.asarray(m).shape[::-1]}", hint="masks have their image's size")
        cells = [_fit(img)[0]]
        cells += [_fit(_blend(img, m, colours, ignore_index, alpha), cv2.INTER_NEAREST)[0] for m in masks]
        grid.append(np.concatenate(cells, axis=1))
    width = CELL * len(titles)
    legend = np.full((LEGEND, width, 3), 255, dtype=np.uint8)
    x = 6
    for k, name in enumerate(names[1:], 1):
        (tw, _), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        if x + 18 + tw > width:
            break
        cv2.rectangle(legend, (x, 6), (x + 12, 18), tuple(int(v) for v in colours[k - 1]), -1)
        cv2.putText(legend, name, (x + 16, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 16 + tw + 14
    canvas = np.concatenate([_header(titles), *grid, legend], axis=0)
    return _write_png(canvas, path)
