"""Training losses for the dense models: FCOS-style assignment + focal/GIoU for detection, CE + Dice for segmentation.

Detection targets are ``[B, M, 5]`` float rows ``(class, x0, y0, x1, y1)`` in network-input pixels, class
``-1`` for padding rows, so a batch of images with different object counts is one tensor. The anchor
points come from the runtime (``edgekit_runtime.detection``), the one implementation of the contract; the
box decoding is restated in torch only because the loss needs its gradient, and a test holds it equal to
the runtime's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from edgekit_runtime import detection as runtime_detection

from ..errors import ConfigError

CENTER_RADIUS = 2.5  # in strides: FCOS's centre sampling, clipped to the box


def anchor_points(height: int, width: int, strides: Sequence[int],
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The runtime's anchor points (``edgekit_runtime.detection.anchor_points``) as torch tensors on ``device``.

    ``(A, 2)`` centres (cx, cy) in input pixels and ``(A,)`` strides, in the order of the detector's rows.
    Taken from the runtime rather than restated, so training and the device cannot disagree on the grid.
    """
    points, per_point = runtime_detection.anchor_points(height, width, strides)
    return torch.from_numpy(points).to(device), torch.from_numpy(per_point).to(device)


def decode(raw: torch.Tensor, points: torch.Tensor,
           stride_per_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``raw [..., A, 4+C]`` → boxes ``[..., A, 4]`` (x0, y0, x1, y1 in input pixels) and sigmoid scores
    ``[..., A, C]``.

    The runtime's ``decode`` in torch, because the GIoU loss needs gradients through it; a test holds
    the two equal.
    """
    s = stride_per_point[:, None]
    ltrb = raw[..., :4] * s
    boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
    return boxes, torch.sigmoid(raw[..., 4:])


def level_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """Per level, the ``(low, high]`` range of a point's max(l, t, r, b) **in that level's stride units**.

    Each level takes boxes whose farthest edge from the point is 2..4 strides away — ``(2s, 4s]`` pixels,
    i.e. (16, 32], (32, 64], (64, 128] px for strides 8/16/32 — except that the first level also takes
    everything nearer (low 0) and the last everything farther (high inf). FCOS's own 64/128/256 px split
    was made for 800 px inputs; edge inputs of 128-640 px have objects a few strides across, so the split
    is 4x smaller and objects spread over all levels.
    """
    n = len(strides)
    return [(0.0 if i == 0 else 2.0, math.inf if i == n - 1 else 4.0) for i in range(n)]


def assign(targets: torch.Tensor, points: torch.Tensor, stride_per_point: torch.Tensor,
           strides: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS assignment: for each image and anchor point, the index of its gt row, or -1 for a negative.

    A point is positive for a gt box when it lies strictly inside the box's central region (``CENTER_RADIUS``
    strides around the box centre, clipped to the box) and the gt's max(l, t, r, b) from that point, in
    stride units, falls in the level's :func:`level_ranges`. A point that qualifies for several boxes
    takes the smallest (by area). Returns ``(gt_index [B, A] long, ltrb [B, A, 4] pixels to the assigned box)``.
    """
    if targets.shape[1] == 0:  # no image in the batch has a box: pad one empty row so shapes stay regular
        targets = torch.cat([targets, targets.new_full((targets.shape[0], 1, 5), -1.0)], 1)
    cls, boxes = targets[..., 0], targets[..., 1:5]  # [B, M], [B, M, 4]
    px, py = points[:, 0][None, :, None], points[:, 1][None, :, None]  # [1, A, 1]
    s = stride_per_point[None, :, None]
    x0, y0, x1, y1 = (boxes[..., k][:, None, :] for k in range(4))  # [B, 1, M]
    ltrb = torch.stack([px - x0, py - y0, x1 - px, y1 - py], -1)  # [B, A, M, 4]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = CENTER_RADIUS * s
    cl, ct = px - torch.maximum(x0, cx - r), py - torch.maximum(y0, cy - r)
    cr, cb = torch.minimum(x1, cx + r) - px, torch.minimum(y1, cy + r) - py
    in_center = torch.stack([cl, ct, cr, cb], -1).amin(-1) > 0  # [B, A, M]
    reach = ltrb.amax(-1) / s
    lo = torch.empty_like(stride_per_point)
    hi = torch.empty_like(stride_per_point)
    for level_stride, (a, b) in zip(strides, level_ranges(strides)):
        at = stride_per_point == level_stride
        lo[at], hi[at] = a, b
    in_range = (reach > lo[None, :, None]) & (reach <= hi[None, :, None])
    ok = in_center & in_range & (cls >= 0)[:, None, :]
    area = ((x1 - x0) * (y1 - y0)).expand_as(ok)
    cost = torch.where(ok, area, torch.full_like(area, math.inf))
    best, idx = cost.min(-1)
    gt_index = torch.where(torch.isfinite(best), idx, torch.full_like(idx, -1))
    picked = torch.gather(ltrb, 2, idx[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    return gt_index, picked


class DetectionLoss(nn.Module):
    """Sigmoid focal loss on every point's classes + ``box_weight`` x GIoU on the positives' decoded boxes.

    Positives come from :func:`assign`. The class target is a hard 1 for the assigned gt's class (0 for
    everything else); the focal loss (alpha 0.25, gamma 2) is summed over all points and classes and divided
    by the number of positives in the batch (at least 1). The GIoU loss of each positive is weighted by its
    FCOS centerness target (sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))), normalised by the weights' sum:
    points far off the object's centre see less of it and should not pull the regression as hard. After
    ``forward``, ``last_parts`` holds detached ``cls``, ``box`` and ``num_pos`` for logging.
    """

    def __init__(self, num_classes: int, strides: Sequence[int] = (8, 16, 32), alpha: float = 0.25,
                 gamma: float = 2.0, box_weight: float = 2.0):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"DetectionLoss needs at least one class, got num_classes={num_classes}")
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.alpha, self.gamma, self.box_weight = alpha, gamma, box_weight
        self.last_parts: dict[str, float] = {}
        self._grid: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def points(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (height, width, str(device))
        if key not in self._grid:
            self._grid[key] = anchor_points(height, width, self.strides, device)
        return self._grid[key]

    def forward(self, raw: torch.Tensor, targets: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``raw [B, A, 4+C]`` (the detector's output), ``targets [B, M, 5]``, ``image_size`` = (height, width)."""
        height, width = image_size
        points, per_point = self.points(height, width, raw.device)
        if raw.shape[1] != points.shape[0] or raw.shape[2] != 4 + self.num_classes:
            raise ConfigError(f"detector output {tuple(raw.shape)} does not fit {height}x{width} input with strides "
                              f"{list(self.strides)} and {self.num_classes} classes "
                              f"(expected [B, {points.shape[0]}, {4 + self.num_classes}])")
        # float32 whatever autocast gave: box areas of a 640 px input overflow float16's 65504
        raw, targets = raw.float(), targets.to(device=raw.device, dtype=torch.float32)
        with torch.no_grad():
            gt_index, ltrb = assign(targets, points, per_point, self.strides)
        pos = gt_index >= 0
        num_pos = int(pos.sum())
        norm = max(num_pos, 1)

        cls_target = torch.zeros_like(raw[..., 4:])
        if num_pos:
            gt_cls = torch.gather(targets[..., 0], 1, gt_index.clamp(min=0)).long()  # [B, A]
            cls_target[pos, gt_cls[pos]] = 1.0
        cls_loss = sigmoid_focal_loss(raw[..., 4:], cls_target, alpha=self.alpha, gamma=self.gamma,
                                      reduction="sum") / norm

        if num_pos:
            boxes, _ = decode(raw[..., :4], points, per_point)
            gt_boxes = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
            l, t, r, b = ltrb[pos].unbind(-1)
            centerness = torch.sqrt((torch.minimum(l, r) / torch.maximum(l, r)).clamp(min=0)
                                    * (torch.minimum(t, b) / torch.maximum(t, b)).clamp(min=0))
            giou = generalized_box_iou_loss(boxes[pos], gt_boxes[pos], reduction="none", eps=1e-7)
            box_loss = (giou * centerness).sum() / centerness.sum().clamp(min=1e-6)
        else:
            box_loss = raw[..., :4].sum() * 0.0  # keeps the graph connected for DDP
        loss = cls_loss + self.box_weight * box_loss
        self.last_parts = {"cls": float(cls_loss.detach()), "box": float(box_loss.detach()), "num_pos": num_pos}
        return loss


class SegmentationLoss(nn.Module):
    """Cross-entropy + soft Dice over the foreground classes (weight 1 each), pixels at ``ignore_index`` left out.

    Dice is computed over the whole batch per class (channels 1..K-1) and averaged: cross-entropy alone lets
    a small object's pixels drown in the background, Dice scores each class's overlap regardless of its size.
    ``logits [B, K, H, W]``, ``target [B, H, W]`` long (0 background, k = class k - 1 of the data set).
    """

    def __init__(self, ignore_index: int = 255, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth
        self.last_parts: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            raise ConfigError(f"segmentation logits {tuple(logits.shape)} and masks {tuple(target.shape)} differ in "
                              "size; the segmenter must answer at input resolution")
        logits, target = logits.float(), target.long()
        k = logits.shape[1]
        valid = (target != self.ignore_index)
        if valid.any() and int(target[valid].max()) >= k:
            raise ConfigError(f"a mask holds class {int(target[valid].max())} but the model has only {k} channels "
                              "(background + classes)", hint="build the segmenter with num_classes + 1 outputs")
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        probs = torch.softmax(logits, 1) * valid[:, None]
        onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).to(probs.dtype) * valid[:, None]
        inter = (probs * onehot).sum((0, 2, 3))[1:]
        denom = (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)))[1:]
        dice = (1 - (2 * inter + self.smooth) / (denom + self.smooth)).mean()
        self.last_parts = {"ce": float(ce.detach()), "dice": float(dice.detach())}
        return self.ce_weight * ce + self.dice_weight * dice
