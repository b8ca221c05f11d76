"""edgekit.evaluate.dense_metrics / dense_plots: COCO mAP through pycocotools on hand-built cases whose answer
is known, the detection confusion matrix, mIoU/Dice on 4×4 masks, and the PNGs (small data, fast)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edgekit.errors import CalibrationError
from edgekit.evaluate.dense_metrics import (box_iou, coco_map, confusion_at_iou, segmentation_confusion,
                                            segmentation_metrics)
from edgekit.evaluate.dense_plots import (CELL, HEADER, LEGEND, plot_detection_gallery, plot_pr_curves,
                                          plot_segmentation_overlays)

CLASSES = ["circle", "square", "triangle", "star"]


def _scene(seed=0, n_images=6):
    """Ground truth: 1-3 square boxes per image, classes 0..2 (never 3, "star"), one empty image."""
    rng = np.random.default_rng(seed)
    gts = []
    for i in range(n_images):
        if i == 2:
            gts.append((np.zeros((0, 4)), np.zeros(0, np.int64)))
            continue
        n = int(rng.integers(1, 4))
        side = rng.uniform(20, 60, n)
        x0 = np.arange(n) * 150 + rng.uniform(0, 20, n)  # far apart: no two boxes overlap
        y0 = rng.uniform(0, 50, n)
        boxes = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
        gts.append((boxes, rng.integers(0, 3, n)))
    return gts


def _perfect(gts):
    return [(b.copy(), lab.copy(), np.linspace(0.9, 0.5, len(b))) for b, lab in gts]


# ----------------------------------------------------------------------------- mAP
def test_perfect_predictions_give_map_one():
    gts = _scene()
    m = coco_map(_perfect(gts), gts, CLASSES)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0) and m["map75"] == pytest.approx(1.0)
    assert m["mar100"] == pytest.approx(1.0)
    n_boxes = sum(len(b) for b, _ in gts)
    assert (m["images"], m["gt_boxes"], m["predictions"]) == (6, n_boxes, n_boxes)
    # "star" has no ground-truth box: COCOeval's -1, reported as None and left out of the mean
    assert m["per_class"]["star"] == {"ap": None, "ap50": None, "gt": 0, "predictions": 0}
    assert m["pr_curve"]["precision"]["star"] is None
    for name in CLASSES[:3]:
        assert m["per_class"][name]["ap"] == pytest.approx(1.0)
        assert m["pr_curve"]["precision"][name] == pytest.approx([1.0] * 101)
    assert m["pr_curve"]["recall"] == pytest.approx(np.linspace(0, 1, 101).tolist())
    json.dumps(m)


def test_shifted_boxes_meet_only_the_low_iou_thresholds():
    gts = _scene(seed=1)
    preds = []
    for b, lab in gts:
        side = b[:, 2] - b[:, 0]
        shifted = b + np.stack([0.23 * side, np.zeros_like(side), 0.23 * side, np.zeros_like(side)], axis=1)
        preds.append((shifted, lab, np.full(len(b), 0.8)))
    iou = (1 - 0.23) / (1 + 0.23)  # same height, shifted by 23 % of the width: 0.626
    for (b, _), (p, _, _) in zip(gts, preds):
        assert np.diag(box_iou(p, b)) == pytest.approx(np.full(len(b), iou))
    thresholds = np.linspace(0.5, 0.95, 10)
    met = float((thresholds <= iou).sum()) / len(thresholds)  # 0.50, 0.55, 0.60 of ten thresholds
    assert met == pytest.approx(0.3)
    m = coco_map(preds, gts, CLASSES)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(met)


def test_false_positive_ranked_above_a_true_positive_follows_the_101_point_interpolation():
    gt_boxes = np.array([[0, 0, 40, 40], [100, 100, 140, 140]], float)
    gts = [(gt_boxes, np.array([0, 0]))]
    # ranked: TP (0.95), FP far from any box (0.9), TP (0.8)
    pred_boxes = np.array([[0, 0, 40, 40], [300, 300, 340, 340], [100, 100, 140, 140]], float)
    preds = [(pred_boxes, np.array([0, 0, 0]), np.array([0.95, 0.9, 0.8]))]
    # by hand: recall after each detection 0.5, 0.5, 1.0; precision 1, 1/2, 2/3; made monotone from the
    # right: 1, 2/3, 2/3. COCOeval reads it at recall 0.00..1.00: 1.0 for r <= 0.5 (51 points), 2/3 above
    # (50 points), so AP50 = (51 + 50 * 2/3) / 101 (the area under the curve would be 0.8333 instead)
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    m = coco_map(preds, gts, CLASSES)
    assert m["map50"] == pytest.approx(expected)
    assert m["per_class"]["circle"]["ap50"] == pytest.approx(expected)
    assert m["map50"] != pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-3)
    curve = np.array(m["pr_curve"]["precision"]["circle"])
    assert curve[:51] == pytest.approx(1.0) and curve[51:] == pytest.approx(2 / 3)
    # without the false positive the ranking is perfect again
    clean = [(pred_boxes[[0, 2]], np.array([0, 0]), np.array([0.95, 0.8]))]
    assert coco_map(clean, gts, CLASSES)["map50"] == pytest.approx(1.0)


def test_map_is_the_mean_over_classes_with_ground_truth():
    gts = [(np.array([[0, 0, 50, 50], [100, 0, 150, 50]], float), np.array([0, 1]))]
    # class 0 found, class 1 missed, a "star" (no ground truth) false positive: it counts nowhere
    preds = [(np.array([[0, 0, 50, 50], [300, 0, 350, 50]], float), np.array([0, 3]), np.array([0.9, 0.99]))]
    m = coco_map(preds, gts, CLASSES)
    assert m["per_class"]["circle"]["ap"] == pytest.approx(1.0)
    assert m["per_class"]["square"]["ap"] == pytest.approx(0.0)
    assert m["per_class"]["star"]["ap"] is None and m["per_class"]["star"]["predictions"] == 1
    assert m["map"] == pytest.approx(0.5) and m["classes_with_gt"] == 2


def test_no_ground_truth_at_all_and_no_predictions():
    empty = [(np.zeros((0, 4)), np.zeros(0, np.int64))] * 2
    m = coco_map([(np.zeros((0, 4)), [], [])] * 2, empty, CLASSES)
    assert m["map"] is None and m["map50"] is None and m["gt_boxes"] == 0
    gts = _scene()
    m = coco_map([([], [], [])] * len(gts), gts, CLASSES)  # a model that finds nothing
    assert m["map"] == pytest.approx(0.0) and m["predictions"] == 0


def test_runtime_results_and_records_are_accepted():
    gts = _scene(seed=3)
    results = [{"detections": [{"box": list(map(float, b)), "class": int(c), "label": CLASSES[c], "score": 0.7}
                               for b, c in zip(boxes, labels)], "image_size": [640, 200]} for boxes, labels in gts]
    assert coco_map(results, gts, CLASSES)["map"] == pytest.approx(1.0)


def test_bad_inputs_are_refused_with_a_clear_message():
    gts = [(np.array([[0, 0, 10, 10]], float), np.array([0]))]
    with pytest.raises(CalibrationError, match="class 7, but there are 4 classes"):
        coco_map([(np.array([[0, 0, 10, 10]], float), np.array([7]), np.array([0.9]))], gts, CLASSES)
    with pytest.raises(CalibrationError, match="class 4, but there are 4"):
        confusion_at_iou([(np.array([[0, 0, 10, 10]], float), np.array([4]), np.array([0.9]))], gts, 4)
    with pytest.raises(CalibrationError, match="x1 < x0"):
        coco_map([(np.array([[0, 0, 10, 10]], float), [0], [0.9])], [(np.array([[5, 5, 2, 2]], float), [0])],
                 CLASSES)
    with pytest.raises(CalibrationError, match="1 images of predictions for 2"):
        coco_map([([], [], [])], gts * 2, CLASSES)


# ----------------------------------------------------------------------------- confusion
def test_confusion_counts_misses_false_positives_and_wrong_classes():
    gts = [(np.array([[0, 0, 50, 50], [100, 0, 150, 50], [200, 0, 250, 50]], float), np.array([0, 1, 2]))]
    preds = [(np.array([[0, 0, 50, 50],      # right box, right class
                        [102, 0, 152, 50],   # right box, wrong class (square read as triangle)
                        [400, 0, 450, 50],   # false positive (star)
                        [1, 0, 51, 50],      # duplicate of the first box, lower score: a false positive
                        [200, 0, 250, 50]]),  # below the score threshold: dropped, so the triangle is missed
              np.array([0, 2, 3, 0, 2]), np.array([0.9, 0.8, 0.7, 0.6, 0.1]))]
    cm = confusion_at_iou(preds, gts, 4)
    bg = 4
    assert cm.shape == (5, 5)
    assert cm[0, 0] == 1 and cm[1, 2] == 1
    assert cm[2, bg] == 1                     # missed box: background column
    assert cm[bg, 3] == 1 and cm[bg, 0] == 1  # false positives: background row
    assert cm.sum() == 5 and cm[bg, bg] == 0
    assert cm[:4].sum(axis=1).tolist() == [1, 1, 1, 0]  # rows: ground-truth boxes per class
    # a stricter IoU turns the shifted match into a miss plus a false positive
    strict = confusion_at_iou(preds, gts, 4, iou=0.95)
    assert strict[1, 2] == 0 and strict[1, bg] == 1 and strict[bg, 2] == 1


def test_confusion_matches_by_score_not_by_order():
    gts = [(np.array([[0, 0, 50, 50]], float), np.array([1]))]
    preds = [(np.array([[0, 0, 50, 50], [0, 0, 50, 50]], float), np.array([0, 1]), np.array([0.3, 0.9]))]
    cm = confusion_at_iou(preds, gts, 2)
    assert cm[1, 1] == 1 and cm[2, 0] == 1 and cm.sum() == 2


# ----------------------------------------------------------------------------- segmentation
def test_segmentation_metrics_on_hand_built_masks():
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [0, 0, 2, 2],
                   [0, 0, 2, 2]], np.uint8)
    pred = np.array([[0, 0, 1, 1],
                     [0, 1, 1, 1],
                     [0, 0, 2, 0],
                     [0, 0, 2, 0]], np.uint8)
    # background: tp 7, fp 2, fn 1 -> IoU 7/10, Dice 14/17; class 1: tp 4, fp 1 -> 4/5, 8/9;
    # class 2: tp 2, fn 2 -> 2/4, 4/6; class 3 absent from both: left out
    m = segmentation_metrics([pred], [gt], 4, class_names=["background", "circle", "square", "star"])
    pc = m["per_class"]
    assert pc["background"]["iou"] == pytest.approx(0.7) and pc["background"]["dice"] == pytest.approx(14 / 17)
    assert pc["circle"]["iou"] == pytest.approx(0.8) and pc["circle"]["dice"] == pytest.approx(8 / 9)
    assert pc["square"]["iou"] == pytest.approx(0.5) and pc["square"]["dice"] == pytest.approx(4 / 6)
    assert pc["star"]["iou"] is None and pc["star"]["dice"] is None
    assert m["miou"] == pytest.approx((0.7 + 0.8 + 0.5) / 3)
    assert m["mean_dice"] == pytest.approx((8 / 9 + 4 / 6) / 2)
    assert m["pixel_accuracy"] == pytest.approx(13 / 16)
    assert m["pixels"] == 16 and np.array(m["confusion"]).sum() == 16
    json.dumps(m)


def test_ignored_pixels_count_nowhere():
    gt = np.array([[1, 1], [255, 255]], np.uint8)
    pred = np.array([[1, 1], [0, 3]], np.uint8)  # wrong where ignored: no effect
    m = segmentation_metrics([pred, pred], [gt, gt], 4)
    assert m["pixels"] == 4 and m["pixel_accuracy"] == pytest.approx(1.0)
    assert m["miou"] == pytest.approx(1.0) and m["per_class"]["3"]["iou"] is None
    # the same prediction with the bottom row labelled background loses those pixels
    gt2 = np.array([[1, 1], [0, 0]], np.uint8)
    assert segmentation_metrics([pred], [gt2], 4)["pixel_accuracy"] == pytest.approx(0.75)


def test_segmentation_refuses_bad_masks():
    gt = np.zeros((4, 4), np.uint8)
    with pytest.raises(CalibrationError, match="value 5, but there are 4 classes"):
        segmentation_confusion([np.full((4, 4), 5, np.uint8)], [gt], 4)
    with pytest.raises(CalibrationError, match=r"predicted mask \(2, 2\) vs ground truth \(4, 4\)") as err:
        segmentation_metrics([np.zeros((2, 2), np.uint8)], [gt], 4)
    assert "original image size" in err.value.hint
    with pytest.raises(CalibrationError, match="3 class names for 4"):
        segmentation_metrics([gt], [gt], 4, class_names=["background", "a", "b"])


# ----------------------------------------------------------------------------- plots
def _png_size(path):
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None and path.stat().st_size > 1000
    return img.shape[1], img.shape[0]


def test_pr_curve_plot(tmp_path):
    gts = _scene()
    preds = _perfect(gts)
    preds[0] = (preds[0][0] + 30, preds[0][1], preds[0][2])  # the first image's boxes all missed
    results = {"FP32": coco_map(_perfect(gts), gts, CLASSES), "INT8": coco_map(preds, gts, CLASSES)}
    path = plot_pr_curves(results, tmp_path / "pr.png")
    assert path == tmp_path / "pr.png"
    w, h = _png_size(path)  # 4 classes: one row of four 3.4 × 3.0 inch panels at 110 dpi
    assert abs(w - 4 * 3.4 * 110) <= 1 and abs(h - 3.0 * 110) <= 1


def test_detection_gallery(tmp_path):
    images = [np.full((128, 96, 3), 128, np.uint8) for _ in range(3)]  # flat grey: only boxes carry colour
    cv2.imwrite(str(tmp_path / "first.jpg"), images[0][:, :, ::-1])
    gts = [(np.array([[10, 10, 60, 70]], float), np.array([1]))] * 3
    fp32 = [(np.array([[12, 10, 60, 70]], float), np.array([1]), np.array([0.9]))] * 3
    int8 = [(np.array([[12, 10, 60, 70], [0, 0, 20, 20]], float), np.array([1, 3]), np.array([0.8, 0.1]))] * 3
    path = plot_detection_gallery([tmp_path / "first.jpg", *images[1:]], gts, {"FP32": fp32, "INT8": int8},
                                  CLASSES, tmp_path / "gallery.png")
    assert _png_size(path) == (3 * CELL, HEADER + 3 * CELL)
    img = cv2.imread(str(path))[:, :, ::-1]
    square = np.array([255, 127, 14])  # tab10's second colour: the "square" boxes
    for col in range(3):  # the box's left edge (x 10 or 12 of 96, scaled by 2) is drawn in every column
        cell = img[HEADER:HEADER + CELL, col * CELL:(col + 1) * CELL]
        assert (np.abs(cell.astype(int) - square).sum(axis=2) < 30).sum() > 100
    star = np.array([214, 39, 40])  # tab10's fourth colour; the INT8 star scored 0.1, below the threshold

    def star_pixels(png):
        return int((np.abs(cv2.imread(str(png))[:, :, ::-1].astype(int) - star).sum(axis=2) < 30).sum())

    assert star_pixels(path) == 0
    low = plot_detection_gallery(images, gts, {"FP32": fp32, "INT8": int8}, CLASSES, tmp_path / "low.png",
                                 score_threshold=0.05, max_images=1)
    assert _png_size(low) == (3 * CELL, HEADER + CELL)
    assert star_pixels(low) > 50


def test_segmentation_overlays(tmp_path):
    img = np.full((64, 64, 3), 200, np.uint8)
    gt = np.zeros((64, 64), np.uint8)
    gt[10:30, 10:30] = 1
    gt[40:, 40:] = 255
    pred = np.zeros((64, 64), np.uint8)
    pred[12:30, 12:30] = 2
    path = plot_segmentation_overlays([img, img], [gt, gt], {"FP32": [pred, pred], "INT8": [gt, gt]},
                                      ["background", "circle", "square"], tmp_path / "seg.png")
    assert _png_size(path) == (4 * CELL, HEADER + 2 * CELL + LEGEND)
    canvas = cv2.imread(str(path))[:, :, ::-1].astype(int)
    row = canvas[HEADER:HEADER + CELL]
    image_cell, gt_cell, fp32_cell = (row[:, c * CELL:(c + 1) * CELL] for c in range(3))
    assert (image_cell == 200).all()                        # the plain image is untouched
    circle = 0.45 * 200 + 0.55 * np.array([31, 119, 180])    # tinted with tab10's first colour, as its boxes
    assert np.abs(gt_cell[80, 80] - circle).max() <= 2       # a circle pixel (cell scale 4)
    assert (gt_cell[5, 5] == 200).all()                     # background is not
    assert (fp32_cell[80, 80] != gt_cell[80, 80]).any()     # the square's colour differs from the circle's
    with pytest.raises(CalibrationError, match="image 0 is 64×64 but a mask is"):
        plot_segmentation_overlays([img], [gt[:32]], {}, ["background", "circle"], tmp_path / "bad.png")


def test_agrees_with_pycocotools_reading_the_dataset_file(tmp_path):
    """The in-memory COCO objects give what pycocotools' own path gives: annotations.json + loadRes."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from edgekit.data.detection import load_detection_data
    from edgekit.data.scenes import write_dataset

    root = write_dataset(tmp_path / "scenes", "detection", "coco", splits={"train": 2, "test": 40}, seed=5)
    split = load_detection_data(root)["test"]
    rng = np.random.default_rng(0)
    preds = []
    for r in split.records:  # jittered boxes, some relabelled, one false positive in three images
        b = r.boxes.astype(np.float64) + rng.normal(0, 2.5, r.boxes.shape)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        lab = np.where(rng.random(len(b)) < 0.1, rng.integers(0, 4, len(b)), r.labels)
        if rng.random() < 0.33:
            b, lab = np.vstack([b, [[5, 5, 30, 30]]]), np.append(lab, rng.integers(0, 4))
        preds.append((b, lab, rng.uniform(0.05, 1, len(b))))
    ours = coco_map(preds, split.records, split.classes)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "test" / "annotations.json"))
        image_id = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
        cat_ids = sorted(gt.getCatIds())  # the loader numbers classes in ascending category id
        results = [{"image_id": image_id[r.image.name], "category_id": cat_ids[int(c)],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(s)}
                   for r, (b, lab, sc) in zip(split.records, preds) for (x0, y0, x1, y1), c, s in zip(b, lab, sc)]
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0.2 < ours["map"] < 0.95  # neither trivial nor hopeless
    for key, i in (("map", 0), ("map50", 1), ("map75", 2), ("mar100", 8)):
        assert ours[key] == pytest.approx(ev.stats[i], abs=1e-12), key
