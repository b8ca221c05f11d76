"""Detection and segmentation post-processing (format 1.4): anchor points, decode, NMS, letterbox, masks.

The geometry is checked against values worked out by hand, NMS against torchvision (tests may
import torch; the runtime may not), and the whole path (a photo letterboxed, a model run by ONNX
Runtime, boxes and masks mapped back onto the photo) through real bundles written by the host's
bundle writer and read by ``edgekit_runtime.load`` and ``edgekit-runtime run``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime import detection as det
from edgekit_runtime.bench import BenchSettings, run_benchmark
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract.errors import BundleError, ErrorCode, InputError
from edgekit_runtime.contract.manifest import Manifest, Postprocess, Preprocess
from edgekit_runtime.processing import ImageMeta, LETTERBOX_FILL, preprocess_batch, preprocess_image

STRIDES = [8, 16, 32]
CLASSES = ["circle", "square", "triangle", "star"]
RAW_LETTERBOX = {"type": "image", "color": "rgb", "size": [128, 128], "resize": "letterbox",
                 "interpolation": "linear", "scale": 1.0}


# ----------------------------------------------------------------------------- anchor points and decode
def test_anchor_points_follow_the_contract_order_by_hand():
    points, strides = det.anchor_points(16, 32, [8, 16])
    # level 8: a 2 x 4 grid, row-major; level 16: 1 x 2
    assert points.tolist() == [[4, 4], [12, 4], [20, 4], [28, 4], [4, 12], [12, 12], [20, 12], [28, 12],
                               [8, 8], [24, 8]]
    assert strides.tolist() == [8] * 8 + [16] * 2
    assert points.dtype == np.float32 and strides.dtype == np.float32
    assert det.anchor_count(128, 128, STRIDES) == len(det.anchor_points(128, 128, STRIDES)[0]) == 336
    assert det.anchor_count(640, 640, STRIDES) == 8400


def test_decode_by_hand():
    points, strides = det.anchor_points(16, 32, [8, 16])
    raw = np.zeros((10, 4 + 2), np.float32)
    raw[1, :4] = [1, 2, 3, 4]  # at (12, 4), stride 8
    raw[9, :4] = [0.5, 0.25, 1, 2]  # at (24, 8), stride 16
    raw[1, 4:] = [0.0, 2.0]
    boxes, scores = det.decode(raw, points, strides)
    assert boxes[1].tolist() == [12 - 8, 4 - 16, 12 + 24, 4 + 32]
    assert boxes[9].tolist() == [24 - 8, 8 - 4, 24 + 16, 8 + 32]
    assert boxes[0].tolist() == [4, 4, 4, 4]  # zero distances: the point itself
    assert scores[1] == pytest.approx([0.5, 1 / (1 + np.exp(-2))], abs=1e-7)
    assert scores.shape == (10, 2) and np.all((scores > 0) & (scores < 1))
    with pytest.raises(InputError, match="A = 10 anchor points"):
        det.decode(raw[:9], points, strides)


def test_sigmoid_is_stable_for_large_logits():
    s = det.sigmoid(np.array([-1000, -20, 0, 20, 1000], np.float32))
    assert np.all(np.isfinite(s)) and s[0] == 0 and s[2] == 0.5 and s[-1] == 1


# ----------------------------------------------------------------------------- NMS
def random_boxes(rng, n, classes=5, side=200.0):
    xy = rng.uniform(0, side, (n, 2)).astype(np.float32)
    wh = rng.uniform(1, side / 4, (n, 2)).astype(np.float32)
    wh[: n // 50] = 0  # a few empty boxes: their IoU is 0/0, which suppresses nothing in either
    boxes = np.concatenate([xy, xy + wh], axis=1)
    return boxes, rng.random(n).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("n", [1, 40, 700, 3000])  # torchvision takes its per-class path above 1000 boxes
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms_keeps_exactly_what_torchvision_keeps(n, iou):
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(n * 10 + int(iou * 10))
    boxes, scores, classes = random_boxes(rng, n)
    t = [torch.from_numpy(a) for a in (boxes, scores, classes)]
    want = ops.batched_nms(t[0], t[1], t[2], iou).numpy()
    got = det.batched_nms(boxes, scores, classes, iou)
    assert got.tolist() == want.tolist()
    assert det.batched_nms(boxes, scores, classes, iou, max_detections=7).tolist() == want[:7].tolist()
    assert det.nms(boxes, scores, iou).tolist() == ops.nms(t[0], t[1], iou).numpy().tolist()
    if n > 40:
        assert 0 < len(got) < n  # there was something to suppress


def test_nms_never_suppresses_across_classes_and_keeps_the_best_first():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.6, 0.9, 0.8, 0.1], np.float32)
    assert det.batched_nms(boxes, scores, np.array([0, 0, 1, 0]), 0.5).tolist() == [1, 2, 3]
    assert det.nms(boxes, scores, 0.5).tolist() == [1, 3]
    assert det.batched_nms(boxes, scores, np.zeros(4, int), 0.99).tolist() == [1, 2, 3]  # 0 is 2's twin
    assert det.batched_nms(boxes, scores, np.zeros(4, int), 1.0).tolist() == [1, 2, 0, 3]  # IoU 1 is not > 1
    assert det.batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5).tolist() == []


def test_select_takes_each_points_best_class_at_the_threshold():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([[0.3, 0.9], [0.8, 0.2], [0.24, 0.1]], np.float32)
    b, s, c = det.select(boxes, scores, 0.25, 0.5, 100)
    assert c.tolist() == [1, 0] and s.tolist() == pytest.approx([0.9, 0.8])  # point 2 is under 0.25
    assert b.tolist() == boxes[:2].tolist()
    _, s, c = det.select(boxes, scores, 0.0, 0.5, 1)
    assert c.tolist() == [1]


# ----------------------------------------------------------------------------- letterbox
def test_letterbox_pads_with_114_centred_and_records_the_geometry():
    image = np.full((200, 300, 3), 7, np.uint8)  # h0 = 200, w0 = 300
    meta: list[ImageMeta] = []
    x = preprocess_image(image, RAW_LETTERBOX, meta)
    scale = min(128 / 200, 128 / 300)
    (m,) = meta
    assert (m.width, m.height, m.input_width, m.input_height) == (300, 200, 128, 128)
    assert m.resize == "letterbox" and m.scale_x == m.scale_y == scale
    assert (m.resized_width, m.resized_height) == (128, round(200 * scale)) == (128, 85)
    assert (m.pad_x, m.pad_y) == (0, (128 - 85) // 2) == (0, 21)
    assert x.shape == (3, 128, 128)
    assert np.all(x[:, :21] == LETTERBOX_FILL) and np.all(x[:, 21 + 85 :] == LETTERBOX_FILL)
    assert np.all(x[:, 21 : 21 + 85] == 7)
    # portrait: padding left and right; the same image at the input size: untouched
    meta.clear()
    preprocess_image(np.zeros((300, 200, 3), np.uint8), RAW_LETTERBOX, meta)
    assert (meta[0].pad_x, meta[0].pad_y, meta[0].resized_width) == (21, 0, 85)
    same = np.arange(128 * 128 * 3, dtype=np.uint32).reshape(128, 128, 3).astype(np.uint8)
    assert np.array_equal(preprocess_image(same, RAW_LETTERBOX).transpose(1, 2, 0), same)


def test_preprocess_batch_fills_meta_without_changing_what_callers_get():
    images = [np.zeros((200, 300, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    pre = {**RAW_LETTERBOX, "resize": "stretch"}
    meta: list[ImageMeta] = []
    with_meta = preprocess_batch(images, pre, meta=meta)
    assert np.array_equal(with_meta, preprocess_batch(images, pre))
    assert [(m.width, m.height, m.scale_x, m.scale_y) for m in meta] == [(300, 200, 128 / 300, 128 / 200),
                                                                          (64, 64, 2.0, 2.0)]


def encode_box(box_net, meta: ImageMeta, strides=STRIDES, level: int = 1):
    """The anchor index and (l, t, r, b) in stride units that put ``box_net`` (network pixels) at the
    anchor point of level ``level`` nearest the box centre."""
    points, point_strides = det.anchor_points(meta.input_height, meta.input_width, strides)
    s = strides[level]
    on_level = np.flatnonzero(point_strides == s)
    cx, cy = (box_net[0] + box_net[2]) / 2, (box_net[1] + box_net[3]) / 2
    i = on_level[np.argmin(np.hypot(points[on_level, 0] - cx, points[on_level, 1] - cy))]
    px, py = points[i]
    return i, [(px - box_net[0]) / s, (py - box_net[1]) / s, (box_net[2] - px) / s, (box_net[3] - py) / s]


def synthetic_raw(meta: ImageMeta, boxes_orig, classes, n_classes=len(CLASSES), scores=None, levels=None):
    """A detector output with one confident point per box (original pixels; at the nearest point of
    ``levels[j]``, stride 16 by default), background everywhere else."""
    a = det.anchor_count(meta.input_height, meta.input_width, STRIDES)
    raw = np.zeros((a, 4 + n_classes), np.float32)
    raw[:, 4:] = -10.0
    for j, (box, k) in enumerate(zip(boxes_orig, classes)):
        box = np.asarray(box, np.float64)
        net = [box[0] * meta.scale_x + meta.offset_x, box[1] * meta.scale_y + meta.offset_y,
               box[2] * meta.scale_x + meta.offset_x, box[3] * meta.scale_y + meta.offset_y]
        i, ltrb = encode_box(net, meta, level=1 if levels is None else levels[j])
        assert raw[i, 4:].max() < 0, "two boxes at one point: give them different levels"
        raw[i, :4] = ltrb
        raw[i, 4 + k] = 4.0 - j if scores is None else np.log(scores[j] / (1 - scores[j]))
    return raw


@pytest.mark.parametrize("resize", ["letterbox", "stretch", "shorter_center_crop"])
def test_a_box_on_the_photo_comes_back_onto_the_photo(resize):
    """A box drawn on a 300x200 photo, preprocessed to 128x128, encoded at its anchor point by a synthetic
    detector output, decodes to the box on the photo (within 1 px)."""
    meta: list[ImageMeta] = []
    preprocess_image(np.zeros((200, 300, 3), np.uint8), {**RAW_LETTERBOX, "resize": resize}, meta)
    box = [120.0, 60.0, 190.0, 150.0]  # inside the center crop too
    raw = synthetic_raw(meta[0], [box], [2])
    out = det.postprocess_detection(raw, meta[0], Postprocess(type="detection"), CLASSES)
    assert out["image_size"] == [300, 200]
    (d,) = out["detections"]
    assert d["class"] == 2 and d["label"] == "triangle" and d["score"] == pytest.approx(1 / (1 + np.exp(-4)))
    assert np.abs(np.subtract(d["box"], box)).max() < 1.0, (resize, d["box"])


def test_boxes_are_clipped_sorted_suppressed_and_capped():
    meta: list[ImageMeta] = []
    preprocess_image(np.zeros((200, 300, 3), np.uint8), RAW_LETTERBOX, meta)
    m = meta[0]
    boxes = [[10, 10, 60, 60], [12, 11, 61, 62], [12, 11, 61, 62], [200, 100, 290, 190]]
    raw = synthetic_raw(m, boxes, [0, 0, 1, 3], scores=[0.6, 0.9, 0.7, 0.8], levels=[0, 1, 2, 1])
    # a box that runs past the photo's edge, at a point of its own
    i = det.anchor_count(128, 128, STRIDES) - 1  # the last stride-32 point, (112, 112)
    raw[i, :4] = [1, 1, 2, 2]
    raw[i, 4 + 3] = np.log(0.5 / 0.5)
    out = det.postprocess_detection(raw, m, Postprocess(type="detection"), CLASSES)
    got = out["detections"]
    assert [d["label"] for d in got] == ["circle", "star", "square", "star"]  # box 0 suppressed by box 1
    assert [d["score"] for d in got] == sorted((d["score"] for d in got), reverse=True)
    assert got[-1]["box"][2] == 300 and got[-1]["box"][3] == 200  # clipped to the photo
    assert all(0 <= d["box"][0] <= d["box"][2] <= 300 and 0 <= d["box"][1] <= d["box"][3] <= 200 for d in got)
    capped = det.postprocess_detection(raw, m, Postprocess(type="detection", max_detections=2), CLASSES)
    assert capped["detections"] == got[:2]
    strict = det.postprocess_detection(raw, m, Postprocess(type="detection", score_threshold=0.75), CLASSES)
    assert [d["label"] for d in strict["detections"]] == ["circle", "star"]
    json.dumps(out, allow_nan=False)  # plain JSON


def test_a_detector_output_that_does_not_fit_is_refused_with_what_to_do():
    m = ImageMeta.identity(128, 128)
    spec = Postprocess(type="detection")
    with pytest.raises(InputError, match="A = 336") as err:
        det.postprocess_detection(np.zeros((335, 8), np.float32), m, spec, CLASSES)
    assert err.value.code == ErrorCode.INPUT_BAD_SHAPE and "strides" in err.value.hint
    with pytest.raises(InputError, match="4 class scores but the bundle has 3 labels"):
        det.postprocess_detection(np.zeros((336, 8), np.float32), m, spec, CLASSES[:3])


# ----------------------------------------------------------------------------- segmentation
def shapes_mask(h0=200, w0=300) -> np.ndarray:
    import cv2

    mask = np.zeros((h0, w0), np.uint8)
    cv2.rectangle(mask, (40, 30), (140, 120), 1, thickness=-1)
    cv2.circle(mask, (220, 120), 50, 3, thickness=-1)
    return mask


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("out_size", [128, 64])  # the network input, or half of it
def test_a_mask_on_the_photo_comes_back_onto_the_photo(resize, out_size):
    import cv2

    truth = shapes_mask()
    meta: list[ImageMeta] = []
    net = preprocess_image(np.dstack([truth] * 3), {**RAW_LETTERBOX, "resize": resize,
                                                    "interpolation": "nearest"}, meta)[0]
    if resize == "letterbox":
        net[net == LETTERBOX_FILL] = 0  # the padding is background
    small = cv2.resize(net, (out_size, out_size), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    logits = np.eye(5, dtype=np.float32)[small].transpose(2, 0, 1) * 10  # (K, h, w): one-hot, K = 4 + 1
    labels = ["background", *CLASSES]
    out = det.postprocess_segmentation(logits, meta[0], labels)
    mask = out["mask"]
    assert mask.shape == (200, 300) and mask.dtype == np.uint8 and out["image_size"] == [300, 200]
    agree = (mask == truth).mean()
    assert agree > (0.98 if out_size == 128 else 0.96), agree  # only pixels along the edges may differ
    assert set(out["classes"]) == {"background", "circle", "triangle"}
    assert sum(out["classes"].values()) == 300 * 200
    area = (truth == 3).sum()
    assert out["classes"]["triangle"] == pytest.approx(area, rel=0.05)


def test_a_center_crop_mask_leaves_what_the_network_never_saw_as_background():
    meta: list[ImageMeta] = []
    preprocess_image(np.zeros((200, 300, 3), np.uint8), {**RAW_LETTERBOX, "resize": "shorter_center_crop"}, meta)
    logits = np.zeros((2, 128, 128), np.float32)
    logits[1] = 1.0  # the network sees class 1 everywhere
    mask = det.postprocess_segmentation(logits, meta[0], None)["mask"]
    # the crop keeps the middle 200 x 200 of the 300 x 200 photo
    assert mask[:, 50:250].min() == 1 and mask[:, :50].max() == 0 and mask[:, 250:].max() == 0


def test_a_segmenter_output_that_does_not_fit_is_refused():
    m = ImageMeta.identity(8, 8)
    with pytest.raises(InputError, match=r"\(K, h, w\)"):
        det.postprocess_segmentation(np.zeros((8, 8), np.float32), m, None)
    with pytest.raises(InputError, match="3 channels but the bundle has 2 labels"):
        det.postprocess_segmentation(np.zeros((3, 8, 8), np.float32), m, ["background", "a"])


# ----------------------------------------------------------------------------- the manifest
def test_old_postprocess_sections_parse_with_the_contract_defaults():
    p = Postprocess.from_dict({"type": "classification", "softmax": True, "top_k": 3})
    assert (p.strides, p.score_threshold, p.iou_threshold, p.max_detections) == ([8, 16, 32], 0.25, 0.5, 100)
    d = Postprocess.from_dict({"type": "detection", "strides": [16, 32], "max_detections": 5})
    assert d.strides == [16, 32] and d.max_detections == 5 and d.score_threshold == 0.25
    assert Preprocess.from_dict({"size": [64, 64], "resize": "letterbox"}).resize == "letterbox"
    assert bundle_spec.parse_version(bundle_spec.FORMAT_VERSION) >= (1, 4)


@pytest.mark.parametrize("change, fragment", [
    ({"strides": []}, "manifest.postprocess.strides is empty"),
    ({"strides": [8, 0]}, "manifest.postprocess.strides[1] must be a positive integer"),
    ({"strides": [8, 1.5]}, "manifest.postprocess.strides[1] must be an integer"),
    ({"strides": list(range(1, 10))}, "manifest.postprocess.strides length is 9"),
    ({"score_threshold": 1.5}, "manifest.postprocess.score_threshold must lie in [0, 1]"),
    ({"iou_threshold": -0.1}, "manifest.postprocess.iou_threshold must be at least 0.0"),
    ({"score_threshold": "high"}, "manifest.postprocess.score_threshold must be a number"),
    ({"max_detections": 0}, "manifest.postprocess.max_detections must be >= 1"),
    ({"max_detections": 10**6}, "manifest.postprocess.max_detections is 1000000"),
])
def test_bad_detection_settings_are_refused_naming_the_field(change, fragment):
    with pytest.raises(BundleError) as err:
        Postprocess.from_dict({"type": "detection", **change})
    assert err.value.code == ErrorCode.BUNDLE_BAD_MANIFEST and fragment in str(err.value)


def detection_parts(kit, *, post=None, outputs=None, size=(128, 128)):
    manifest, members = kit.parts()
    h, w = size
    manifest["inputs"] = [{"name": "x", "dtype": "float32", "shape": [1, 3, h, w], "layout": "NCHW",
                           "quantization": None}]
    a = det.anchor_count(h, w, STRIDES)
    manifest["outputs"] = outputs or [{"name": "y", "dtype": "float32", "shape": [1, a, 4 + len(CLASSES)],
                                       "layout": None, "quantization": None}]
    manifest["preprocess"] = {**RAW_LETTERBOX, "size": [h, w], "scale": 1 / 255}
    manifest["postprocess"] = post or {"type": "detection", "strides": STRIDES}
    manifest["labels"] = "labels.txt"
    manifest["health_check"] = None
    members = {"model.onnx": members["model.onnx"], "labels.txt": "\n".join(CLASSES).encode()}
    return manifest, members


def filled(manifest, members):
    return {**manifest, "files": {n: {"sha256": "0" * 64, "size": len(d)} for n, d in members.items()},
            "signing": {"algorithm": "ed25519", "key_id": "k"}}


@pytest.mark.parametrize("change, fragment", [
    (dict(post={"type": "detection", "strides": [8, 16, 48]}),
     "manifest.preprocess.size [128, 128] is not divisible by the largest of manifest.postprocess.strides"),
    (dict(post={"type": "detection", "strides": [16, 32]}),
     "manifest.outputs[0].shape[1] is 336 but manifest.postprocess.strides [16, 32] over a 128x128 input make 80"),
    (dict(outputs=[{"name": "y", "dtype": "float32", "shape": [1, 336]}]),
     "reads a [batch, anchors, 4 + classes] output"),
    (dict(outputs=[{"name": "y", "dtype": "float32", "shape": [1, 336, 4]}]),
     "manifest.outputs[0].shape[2] is 4"),
    (dict(post={"type": "segmentation"}), "reads a [batch, classes, height, width] output"),
    (dict(post={"type": "detections"}), "reads [batch, boxes, 6] rows (x0, y0, x1, y1, score, class)"),
    (dict(post={"type": "segmentation"}, outputs=[{"name": "y", "dtype": "float32", "shape": [1, 300, 64, 64]}]),
     "1 to 256 classes"),
])
def test_a_dense_postprocess_that_does_not_fit_the_model_is_refused(kit, change, fragment):
    manifest, members = detection_parts(kit, **change)
    with pytest.raises(BundleError) as err:
        Manifest.from_dict(filled(manifest, members))
    assert fragment in str(err.value)


def test_a_fitting_detection_manifest_parses_and_symbolic_anchors_are_not_held_to_a_count(kit):
    manifest, members = detection_parts(kit)
    m = Manifest.from_dict(filled(manifest, members))
    assert m.postprocess.type == "detection" and m.preprocess.resize == "letterbox"
    manifest["outputs"][0]["shape"] = ["batch", "anchors", 8]
    assert Manifest.from_dict(filled(manifest, members)).outputs[0].shape[1] == "anchors"


# ----------------------------------------------------------------------------- real bundles
def constant_onnx(values: np.ndarray, input_shape=(1, 3, 128, 128)) -> bytes:
    """``y = values + 0 * mean(x)``: a model whose output is ``values`` whatever the image (it still reads it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
         helper.make_node("Mul", ["m", "zero"], ["z"]),
         helper.make_node("Add", ["values", "z"], ["y"])],
        "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(values.shape))],
        [numpy_helper.from_array(values.astype(np.float32), "values"),
         numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def conv_segmenter_onnx() -> bytes:
    """A 1x1 convolution: background logit 0.5, class-1 logit the red channel (0..1): white pixels are
    class 1, black ones and the letterbox grey (114/255) background."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((2, 3, 1, 1), np.float32)
    w[1, 0] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"])], "segmenter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 128, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 128, 128])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0.5, 0.0], np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


BOXES = [[120.0, 60.0, 190.0, 150.0], [20.0, 20.0, 70.0, 90.0]]


@pytest.fixture
def detection_bundle(kit):
    meta: list[ImageMeta] = []
    preprocess_image(np.zeros((200, 300, 3), np.uint8), RAW_LETTERBOX, meta)
    raw = synthetic_raw(meta[0], BOXES, [1, 3])
    manifest, members = detection_parts(kit)
    members["model.onnx"] = constant_onnx(raw[None])
    return kit.write("det.ekb", manifest=manifest, members=members)


def test_predict_on_a_detection_bundle_gives_boxes_on_the_photo(detection_bundle, ring):
    with edgekit_runtime.load(detection_bundle, keyring=ring) as model:
        assert model.manifest.format_version == bundle_spec.FORMAT_VERSION
        (result,) = model.predict(np.zeros((200, 300, 3), np.uint8))
        raw_out = model.run(model.preprocess([np.zeros((200, 300, 3), np.uint8)]))
        in_network_pixels = model.postprocess(raw_out)[0]  # no meta: results stay on the network input
    assert result["image_size"] == [300, 200]
    assert [d["label"] for d in result["detections"]] == ["square", "star"]
    for d, box in zip(result["detections"], BOXES):
        assert np.abs(np.subtract(d["box"], box)).max() < 1.0
    assert in_network_pixels["image_size"] == [128, 128]
    scale = 128 / 300
    assert in_network_pixels["detections"][0]["box"] == pytest.approx(
        [BOXES[0][0] * scale, BOXES[0][1] * scale + 21, BOXES[0][2] * scale, BOXES[0][3] * scale + 21], abs=1e-3)


def test_edgekit_runtime_run_prints_detections_in_photo_pixels(detection_bundle, kit, tmp_path):
    import cv2

    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), np.zeros((200, 300, 3), np.uint8))
    pub = tmp_path / "key.pub"
    pub.write_bytes(kit.public_pem(kit.key))
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "run", str(detection_bundle), str(photo),
                           "--keyring", str(pub), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["input"] == str(photo) and row["image_size"] == [300, 200]
    assert [(d["class"], d["label"]) for d in row["detections"]] == [(1, "square"), (3, "star")]
    assert np.abs(np.subtract(row["detections"][1]["box"], BOXES[1])).max() < 1.0
    text = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "run", str(detection_bundle), str(photo),
                           "--keyring", str(pub)], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "2 detection(s): square 0.98" in text.stdout
    wrong = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "run", str(detection_bundle), str(photo),
                            "--keyring", str(pub), "--json", "--save-masks", str(tmp_path / "m")],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 3 and "--save-masks needs a segmentation bundle" in json.loads(wrong.stdout)[
        "error"]["message"]


def test_a_detection_bundle_runs_without_torch(detection_bundle, kit, tmp_path):
    pub = tmp_path / "key.pub"
    pub.write_bytes(kit.public_pem(kit.key))
    script = ("import json, sys, numpy as np, edgekit_runtime\n"
              "m = edgekit_runtime.load(sys.argv[1], keyring=sys.argv[2])\n"
              "r = m.predict(np.zeros((200, 300, 3), np.uint8))\n"
              "print(json.dumps({'n': len(r[0]['detections']), 'mods': sorted(sys.modules)}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(detection_bundle), str(pub)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 2 and "edgekit_runtime.detection" in out["mods"]
    assert [m for m in out["mods"] if m.split(".")[0] in ("torch", "torchvision", "onnx", "edgekit")] == []


def test_bench_times_detection_postprocessing_on_photos(detection_bundle, ring):
    with edgekit_runtime.load(detection_bundle, keyring=ring) as model:
        result = run_benchmark(model, [np.zeros((200, 300, 3), np.uint8)],
                               BenchSettings(warmup=1, min_queries=5, min_duration_s=0.0, offline_batch=None))
    assert result["single_stream"]["postprocess"]["count"] >= 5


@pytest.fixture
def segmentation_bundle(kit):
    manifest, members = kit.parts()
    manifest["inputs"] = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 128, 128], "layout": "NCHW",
                           "quantization": None}]
    manifest["outputs"] = [{"name": "y", "dtype": "float32", "shape": ["batch", 2, 128, 128], "layout": None,
                            "quantization": None}]
    manifest["preprocess"] = {**RAW_LETTERBOX, "scale": 1 / 255}
    manifest["postprocess"] = {"type": "segmentation"}
    manifest["labels"] = "labels.txt"
    manifest["health_check"] = None
    members = {"model.onnx": conv_segmenter_onnx(), "labels.txt": b"background\nsquare\n"}
    return kit.write("seg.ekb", manifest=manifest, members=members)


def test_edgekit_runtime_run_writes_segmentation_masks(segmentation_bundle, kit, tmp_path):
    import cv2

    photo = np.zeros((200, 300, 3), np.uint8)
    cv2.rectangle(photo, (40, 30), (140, 120), (255, 255, 255), thickness=-1)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), photo)
    pub = tmp_path / "key.pub"
    pub.write_bytes(kit.public_pem(kit.key))
    masks = tmp_path / "masks"
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "run", str(segmentation_bundle), str(path),
                           "--keyring", str(pub), "--json", "--save-masks", str(masks)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert "mask" not in row and row["image_size"] == [300, 200] and row["mask_file"] == str(masks / "photo.png")
    mask = cv2.imread(row["mask_file"], cv2.IMREAD_UNCHANGED)
    truth = (photo[:, :, 0] == 255).astype(np.uint8)
    assert mask.shape == (200, 300) and (mask == truth).mean() > 0.99
    assert row["classes"]["square"] == pytest.approx(truth.sum(), rel=0.03)
    assert row["classes"]["background"] + row["classes"]["square"] == 300 * 200
    with edgekit_runtime.load(segmentation_bundle, keyring=kit.ring_of(kit.key)) as model:
        (result,) = model.predict(photo[:, :, ::-1].copy())  # arrays are RGB; the photo is symmetric in R/B
    assert np.array_equal(result["mask"], mask)


def test_a_segmenter_with_more_channels_than_opencv_takes_at_once():
    logits = np.zeros((200, 16, 16), np.float32)
    logits[150, :8] = 5.0  # the top half: channel 150 (past OpenCV's 128 channels an array)
    logits[3, 8:] = 5.0
    mask = det.postprocess_segmentation(logits, ImageMeta.identity(32, 32), None)["mask"]
    assert mask.shape == (32, 32) and (mask[:14] == 150).all() and (mask[18:] == 3).all()


# ----------------------------------------------------------------------------- NMS inside the graph
def test_rows_from_a_graph_with_its_own_nms_are_kept_sorted_capped_and_mapped_onto_the_photo():
    """A 64x48 photo letterboxed to 32x32: scale 0.5, 4 rows of padding above (worked out by hand)."""
    meta = ImageMeta(64, 48, 32, 32, "letterbox", 0.5, 0.5, 0.0, 4.0, 32, 24)
    rows = np.array([[4, 4, 20, 20, 0.6, 0],       # kept second
                     [16, 16, 32, 32, 0.9, 1],     # kept first; its bottom edge lies in the padding: clipped
                     [0, 0, 8, 8, 0.2, 1],         # below the threshold
                     [0, 0, 0, 0, 0.0, 0]], np.float32)  # padding row
    spec = {"type": "detections", "score_threshold": 0.25, "max_detections": 10}
    out = det.postprocess(rows, meta, spec, ["a", "b"])
    assert out["image_size"] == [64, 48]
    assert [(d["label"], d["class"]) for d in out["detections"]] == [("b", 1), ("a", 0)]
    np.testing.assert_allclose(out["detections"][0]["box"], [32, 24, 64, 48])
    np.testing.assert_allclose(out["detections"][1]["box"], [8, 0, 40, 32])
    assert out["detections"][0]["score"] == pytest.approx(0.9)
    assert len(det.postprocess(rows, meta, {**spec, "max_detections": 1}, ["a", "b"])["detections"]) == 1
    with pytest.raises(InputError, match="the model gave class 1 but the bundle has 1 labels"):
        det.postprocess(rows, meta, spec, ["a"])
    with pytest.raises(InputError, match=r"must be \(N, 6\) rows"):
        det.postprocess(rows[:, :5], meta, spec, ["a", "b"])
