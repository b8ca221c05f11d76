"""Detector and segmenters: contract shapes, FCOS assignment, losses, overfitting real scenes, ONNX/ORT and LiteRT
export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from edgekit.data.scenes import backgrounds, render_scene
from edgekit.errors import ConfigError
from edgekit.train.dense_losses import (DetectionLoss, SegmentationLoss, anchor_points, assign, decode,
                                        level_ranges)
from edgekit.train.dense_models import DETECTOR_BACKBONES, Detector, LRASPPLite, UNet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    photos = backgrounds()
    return [render_scene(rng, 128, photos=photos) for _ in range(4)]


def _batch(scenes):
    x = torch.tensor(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    m = max(len(s.labels) for s in scenes)
    t = torch.full((len(scenes), m, 5), -1.0)
    for i, s in enumerate(scenes):
        t[i, : len(s.labels), 0] = torch.tensor(s.labels).float()
        t[i, : len(s.labels), 1:] = torch.tensor(s.boxes)
    return x, t


def test_anchor_points_follow_the_contract_by_hand():
    # H=32, W=64, strides 16/32: level 16 is a 2x4 grid, level 32 a 1x2 grid, row-major, centres at (j+.5)s, (i+.5)s
    points, per_point = anchor_points(32, 64, (16, 32))
    assert points.tolist() == [[8, 8], [24, 8], [40, 8], [56, 8], [8, 24], [24, 24], [40, 24], [56, 24],
                               [16, 16], [48, 16]]
    assert per_point.tolist() == [16] * 8 + [32] * 2
    raw = torch.tensor([[1.0, 0.5, 2.0, 0.25, 0.0]] + [[0.0] * 5] * 9)
    boxes, scores = decode(raw, points, per_point)
    assert boxes[0].tolist() == [8 - 16, 8 - 8, 8 + 32, 8 + 4]
    assert scores[0].tolist() == [0.5]


def test_torch_decode_equals_the_runtimes():
    from edgekit_runtime.detection import decode as runtime_decode

    points, per_point = anchor_points(96, 160, (8, 16, 32))
    raw = torch.randn(315, 8) * 3
    raw[:, :4] = raw[:, :4].relu()
    boxes, scores = decode(raw, points, per_point)
    ref_boxes, ref_scores = runtime_decode(raw.numpy(), points.numpy(), per_point.numpy())
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-6)


@pytest.mark.parametrize("height,width", [(128, 128), (96, 160)])
@pytest.mark.parametrize("backbone", DETECTOR_BACKBONES)
def test_detector_output_is_the_contract_tensor(backbone, height, width):
    model = Detector(4, width=16, backbone=backbone).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    a = sum((height // s) * (width // s) for s in (8, 16, 32))
    assert a == {128: 336, 96: 315}[height]
    assert out.shape == (2, a, 8)
    assert (out[..., :4] >= 0).all()  # ReLU on l, t, r, b
    # class logits start at the focal prior: sigmoid ~ 0.01 everywhere
    assert abs(torch.sigmoid(out[..., 4:]).mean().item() - 0.01) < 0.005


def test_detector_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="multiple of the largest stride 32"):
        Detector(4, width=8)(torch.zeros(1, 3, 100, 128))
    with pytest.raises(ConfigError, match="consecutive doublings"):
        Detector(4, strides=(8, 32))
    with pytest.raises(ConfigError, match="tiny, mobilenet_v3_small"):
        Detector(4, backbone="resnet99")


def test_assignment_puts_positives_inside_boxes_at_the_right_level():
    strides = (8, 16, 32)
    points, per_point = anchor_points(256, 256, strides)
    # a 40 px box (farthest edge <= 32 px from its centre points: stride 8), a 100 px box (stride 16),
    # a 200 px box (stride 32); a padding row that must never be assigned
    boxes = [[10, 10, 50, 50], [120, 20, 220, 120], [20, 50, 220, 250]]
    targets = torch.tensor([[[0, *boxes[0]], [1, *boxes[1]], [2, *boxes[2]], [-1, 0, 0, 256, 256]]],
                           dtype=torch.float32)
    gt_index, ltrb = assign(targets, points, per_point, strides)
    gt_index, ltrb = gt_index[0], ltrb[0]
    assert (gt_index != 3).all()
    for k, box in enumerate(boxes):
        mine = gt_index == k
        assert mine.any(), f"box {k} got no positives"
        p = points[mine]
        assert ((p[:, 0] > box[0]) & (p[:, 0] < box[2]) & (p[:, 1] > box[1]) & (p[:, 1] < box[3])).all()
        # within 2.5 strides of the box centre
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        near = 2.5 * per_point[mine]
        assert ((p[:, 0] - cx).abs() < near).all() and ((p[:, 1] - cy).abs() < near).all()
        # ltrb is the distance to this box's edges
        assert torch.allclose(ltrb[mine][:, 0], p[:, 0] - box[0]) and torch.allclose(ltrb[mine][:, 3], box[3] - p[:, 1])
    levels = {k: sorted(set(per_point[gt_index == k].int().tolist())) for k in range(3)}
    assert levels[0] == [8]
    assert 16 in levels[1] and 8 not in levels[1]
    assert levels[2] == [32]
    # every positive's reach (max ltrb in strides) lies in its level's range
    ranges = dict(zip(strides, level_ranges(strides)))
    pos = gt_index >= 0
    reach = ltrb[pos].amax(-1) / per_point[pos]
    for r, s in zip(reach.tolist(), per_point[pos].int().tolist()):
        assert ranges[s][0] < r <= ranges[s][1]


def test_assignment_breaks_ties_towards_the_smaller_box():
    points, per_point = anchor_points(64, 64, (8, 16, 32))
    # a small box inside a large one, both centred on the same point
    targets = torch.tensor([[[1, 0, 0, 64, 64], [0, 20, 20, 44, 44]]], dtype=torch.float32)
    gt_index, _ = assign(targets, points, per_point, (8, 16, 32))
    centre = ((points[:, 0] - 28).abs() < 1) & ((points[:, 1] - 28).abs() < 1) & (per_point == 8)
    assert gt_index[0][centre].tolist() == [1]


def test_detection_loss_parts_and_an_empty_batch():
    loss_fn = DetectionLoss(4)
    raw = Detector(4, width=8)(torch.randn(2, 3, 64, 64))
    empty = torch.full((2, 0, 5), -1.0)
    loss = loss_fn(raw, empty, (64, 64))
    loss.backward()
    assert loss_fn.last_parts["num_pos"] == 0 and loss_fn.last_parts["box"] == 0.0
    # with no positives the focal loss of C=4 classes at the 0.01 prior: (1-alpha) * p^2 * -log(1-p) per logit
    p = 0.01
    expected = raw.shape[1] * 2 * 4 * 0.75 * p ** 2 * -math.log(1 - p)
    assert loss.item() == pytest.approx(expected, rel=0.5)
    with pytest.raises(ConfigError, match="does not fit"):
        loss_fn(raw, empty, (128, 128))


def test_detection_loss_is_computed_in_float32_under_half_precision():
    # a 400 px box has an area over float16's 65504: assigning in float16 would drop it
    loss_fn = DetectionLoss(4)
    raw = torch.rand(1, 8400, 8)
    targets = torch.tensor([[[2, 100, 100, 500, 500]]], dtype=torch.float16)
    full = loss_fn(raw, targets.float(), (640, 640)).item()
    positives = loss_fn.last_parts["num_pos"]
    half = loss_fn(raw.half(), targets, (640, 640)).item()
    assert positives > 0 and loss_fn.last_parts["num_pos"] == positives
    assert half == pytest.approx(full, rel=1e-2)


def _detections(raw, points, per_point, score_threshold=0.25, iou_threshold=0.5):
    """The contract's postprocess for one image: best class per anchor, threshold, class-aware NMS."""
    boxes, scores = decode(raw, points, per_point)
    best, cls = scores.max(-1)
    keep = best >= score_threshold
    boxes, best, cls = boxes[keep], best[keep], cls[keep]
    order = batched_nms(boxes, best, cls, iou_threshold)
    return boxes[order], best[order], cls[order]


def test_detector_overfits_four_scenes_and_finds_every_object(scenes):
    x, targets = _batch(scenes)
    model = Detector(4, width=16)
    loss_fn = DetectionLoss(4)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    first = None
    for _ in range(150):
        loss = loss_fn(model(x), targets, (128, 128))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10
    model.eval()
    with torch.no_grad():
        raw = model(x)
    points, per_point = anchor_points(128, 128, (8, 16, 32))
    for i, scene in enumerate(scenes):
        boxes, scores, cls = _detections(raw[i], points, per_point)
        gt = torch.tensor(scene.boxes)
        for g, label in zip(gt, scene.labels):
            # the object's top box: the highest-scoring detection of its class that touches it (sorted by NMS)
            ious = box_iou(boxes, g[None])[:, 0]
            touching = ((cls == int(label)) & (ious > 0)).nonzero()[:, 0]
            assert len(touching), f"image {i}: no detection of class {label}"
            assert ious[touching[0]] > 0.5, f"image {i}: top box IoU {ious[touching[0]]:.2f} for class {label}"
        # no confident detection away from every object
        confident = scores > 0.5
        if confident.any():
            assert box_iou(boxes[confident], gt).amax(1).min() > 0.5


def test_segmentation_loss_is_ce_plus_foreground_dice_and_ignores_255():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    loss_fn = SegmentationLoss()
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, :, :2].abs().max() == 0
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert loss_fn.last_parts["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(loss_fn.last_parts["ce"] + loss_fn.last_parts["dice"], rel=1e-5)
    # perfect logits: Dice ~ 0
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    loss_fn(perfect, target)
    assert loss_fn.last_parts["dice"] < 1e-3
    with pytest.raises(ConfigError, match="only 3 channels"):
        loss_fn(logits, torch.full((2, 8, 8), 4))


@pytest.mark.parametrize("make", [lambda: UNet(5, width=8), lambda: LRASPPLite(5, width=16),
                                  lambda: LRASPPLite(5, backbone="mobilenet_v3_small")])
def test_segmenters_answer_at_input_resolution(make):
    model = make().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 160)).shape == (2, 5, 96, 160)
    with pytest.raises(ConfigError, match="multiple of"):
        model(torch.randn(1, 3, 100, 100))


def test_unet_overfits_four_masks():
    rng = np.random.default_rng(1)
    photos = backgrounds()
    small = [render_scene(rng, 64, photos=photos) for _ in range(4)]  # 64 px keeps 100 steps to ~3 CPU s
    x, _ = _batch(small)
    masks = torch.tensor(np.stack([s.semantic() for s in small])).long()
    model = UNet(5, width=8, depth=3)
    loss_fn = SegmentationLoss()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(100):
        loss = loss_fn(model(x), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    accuracy = (pred == masks).float().mean().item()
    foreground = masks > 0
    # background is ~90 % of the pixels, so the object pixels are checked on their own too
    assert accuracy > 0.9 and (pred[foreground] == masks[foreground]).float().mean() > 0.8


def _onnx_matches_torch(model, shape, tmp_path):
    import onnxruntime as ort

    model = model.eval()
    path = tmp_path / "m.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: batch},))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, *shape)
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    return got


def _settle_batch_norm(model, shape):
    # a few train-mode passes give BatchNorm non-trivial statistics, so the check covers real values
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, *shape))


def test_detector_exports_to_onnx_and_ort_matches_torch(tmp_path):
    model = Detector(4, width=16)
    _settle_batch_norm(model, (3, 96, 160))
    got = _onnx_matches_torch(model, (3, 96, 160), tmp_path)
    assert got.shape == (3, 315, 8)


@pytest.mark.parametrize("make", [lambda: UNet(5, width=8), lambda: LRASPPLite(5, width=16)])
def test_segmenters_export_to_onnx_and_ort_matches_torch(tmp_path, make):
    model = make()
    _settle_batch_norm(model, (3, 64, 96))
    assert _onnx_matches_torch(model, (3, 64, 96), tmp_path).shape == (3, 5, 64, 96)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "resnet18"])
def test_detector_exports_to_onnx_with_a_torchvision_backbone(tmp_path, backbone):
    model = Detector(4, width=16, backbone=backbone)
    _settle_batch_norm(model, (3, 64, 64))
    _onnx_matches_torch(model, (3, 64, 64), tmp_path)


def test_detector_converts_with_litert_torch_and_matches(tmp_path):
    # ~10 s (most of it importing TensorFlow's converter), under the 20 s line for a slow mark
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    model = Detector(4, width=16)
    _settle_batch_norm(model, (3, 64, 64))
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    litert_torch.convert(model, (x,)).export(str(tmp_path / "m.tflite"))
    interp = Interpreter(model_path=str(tmp_path / "m.tflite"))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x.numpy())
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == ref.shape == (1, 84, 8)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
