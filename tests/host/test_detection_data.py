"""Detection/segmentation data: the seeded scene generator, the COCO and YOLO loaders, and split folders read as a
build's calibration/validation data through the device's own preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.config import DataSource
from edgekit.data.detection import IGNORE, load_detection_data, split_arrays
from edgekit.data.scenes import CLASSES, write_dataset
from edgekit.data.sources import load_data
from edgekit.errors import CalibrationError

SPLITS = {"train": 6, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("coco") / "d", "segmentation", "coco", SPLITS, size=96, seed=4)


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("yolo") / "d", "segmentation", "yolo", SPLITS, size=96, seed=4)


def test_the_generator_is_seeded_and_its_masks_agree_with_its_boxes(coco, tmp_path):
    again = write_dataset(tmp_path / "again", "segmentation", "coco", SPLITS, size=96, seed=4)
    first = load_detection_data(coco, masks=True)
    second = load_detection_data(again, masks=True)
    assert set(first) == {"train", "val", "test"} and first["train"].classes == list(CLASSES)
    for a, b in zip(first["train"].records, second["train"].records):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.read_mask(), b.read_mask())
    for r in first["train"].records:
        mask = r.read_mask()
        assert 1 <= len(r.labels) <= 4
        for label in set(r.labels.tolist()):  # a class's pixels lie in its boxes (two shapes may share a class)
            inside = np.zeros(mask.shape, bool)
            for box in r.boxes[r.labels == label]:
                x0, y0, x1, y1 = np.floor(box[:2] - 1).astype(int).tolist() + np.ceil(box[2:] + 1).astype(int).tolist()
                inside[max(0, y0) : y1, max(0, x0) : x1] = True
            assert (mask == label + 1).any() and not ((mask == label + 1) & ~inside).any()
        for box, label in zip(r.boxes, r.labels):  # and each box is tight: its shape spans it edge to edge
            x0, y0, x1, y1 = np.round(box).astype(int).tolist()
            ys, xs = np.nonzero(mask[y0:y1, x0:x1] == label + 1)
            assert xs.max() - xs.min() + 1 >= 0.8 * (x1 - x0) and ys.max() - ys.min() + 1 >= 0.8 * (y1 - y0)


def test_coco_and_yolo_folders_of_the_same_scenes_load_to_the_same_records(coco, yolo):
    c, y = load_detection_data(coco, masks=True), load_detection_data(yolo, masks=True)
    assert c["train"].source == "coco" and y["train"].source == "yolo" and c["val"].classes == y["val"].classes
    for a, b in zip(c["test"].records, y["test"].records):
        assert a.image.name == b.image.name and a.labels.tolist() == b.labels.tolist()
        assert np.allclose(a.boxes, b.boxes, atol=0.01)  # YOLO stores normalised centres and sizes


def test_malformed_annotations_are_named_with_file_and_line(coco, yolo, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(yolo, bad)
    label = sorted((bad / "train" / "labels").iterdir())[0]
    label.write_text(label.read_text() + "7 0.5 0.5 0.1 0.1\n")
    line = len(label.read_text().splitlines())
    with pytest.raises(CalibrationError, match=rf"{label.name}:{line}: '7 0.5 0.5 0.1 0.1' is not 'class cx cy w h'"):
        load_detection_data(bad)
    (bad / "classes.txt").unlink()
    with pytest.raises(CalibrationError, match="no class names") as err:
        load_detection_data(bad)
    assert "classes.txt" in err.value.hint
    doc_path = tmp_path / "coco_bad" / "train" / "annotations.json"
    shutil.copytree(coco, tmp_path / "coco_bad")
    doc_path.write_text(json.dumps({"images": []}))
    with pytest.raises(CalibrationError, match="is not a COCO annotation file"):
        load_detection_data(tmp_path / "coco_bad")


PRE = {"type": "image", "color": "rgb", "size": [64, 128], "resize": "letterbox", "interpolation": "linear",
       "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "layout": "NCHW"}


def test_a_split_folder_is_a_builds_validation_data_boxes_and_masks_moved_with_the_pixels(coco):
    """96×96 scenes letterboxed into 64×128: scale 2/3, 32 px of padding left and right."""
    from edgekit_runtime.processing import preprocess_image

    import cv2

    recs = load_detection_data(coco, masks=True)["val"].records
    x, boxes = split_arrays(coco / "val", PRE, "detection", list(CLASSES))
    assert x.shape == (3, 3, 64, 128) and boxes.shape[0] == 3 and boxes.shape[2] == 5
    photo = cv2.cvtColor(cv2.imread(str(recs[0].image)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(x[0], preprocess_image(photo, PRE))
    n = len(recs[0].labels)
    assert boxes[0, :n, 0].tolist() == recs[0].labels.tolist() and (boxes[0, n:, 0] == -1).all()
    np.testing.assert_allclose(boxes[0, :n, 1:], recs[0].boxes * (2 / 3) + [32, 0, 32, 0], atol=1e-4)

    _, masks = split_arrays(coco / "val", PRE, "segmentation", ["background", *CLASSES])
    assert masks.shape == (3, 64, 128)
    assert (masks[:, :, :32] == IGNORE).all() and (masks[:, :, 96:] == IGNORE).all()
    expected = cv2.resize(recs[1].read_mask(), (64, 64), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(masks[1, :, 32:96], expected)

    ds = load_data(DataSource(source=str(coco / "val")), PRE, list(CLASSES), targets=True, task="detection")
    assert np.array_equal(ds.x, x) and np.array_equal(ds.y, boxes)
    calib = load_data(DataSource(source=str(coco / "train")), PRE, list(CLASSES), task="detection")
    assert len(calib) == 6 and calib.y is None


def test_a_split_folder_is_refused_where_it_cannot_be_read(coco):
    with pytest.raises(CalibrationError, match="no 'preprocess' section"):
        load_data(DataSource(source=str(coco / "val")), None, list(CLASSES), task="detection")
    with pytest.raises(CalibrationError, match="postprocess type is 'classification'") as err:
        load_data(DataSource(source=str(coco / "val")), PRE, list(CLASSES), targets=True)
    assert "postprocess.type: detection" in err.value.hint
    with pytest.raises(CalibrationError, match=r"has classes \['circle', .*; the model's are \['cat', 'dog'\]"):
        split_arrays(coco / "val", PRE, "detection", ["cat", "dog"])
    with pytest.raises(CalibrationError, match=r"the model's are \['circle', 'square', 'triangle'\]") as err:
        split_arrays(coco / "val", PRE, "segmentation", ["background", "circle", "square", "triangle"])
    assert "start with 'background'" in err.value.hint
