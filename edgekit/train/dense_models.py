"""Dense-prediction architectures: an anchor-free detector and two segmenters, built only from ops every target
converts.

The detector's single output follows the detection contract (``[B, A, 4 + C]``: per anchor point the
box's left/top/right/bottom distances in stride units after a ReLU, then C class logits); the segmenters
return ``[B, K, H, W]`` logits at input resolution, channel 0 background. The graphs hold only
Conv/BN/ReLU(6)/Hardswish/mean/fixed-scale Upsample/Concat/Add/Reshape — no NMS, no grid_sample and no
shape that depends on data — so ``torch.onnx.export(dynamo=True)`` gives an ONNX file that ONNX Runtime,
OpenVINO and TensorRT take as is, and ``litert_torch.convert`` gives a ``.tflite``. Box decoding and NMS
live outside the graph (the runtime's ``edgekit_runtime.detection``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

DETECTOR_BACKBONES = ("tiny", "mobilenet_v3_small", "resnet18")
SEGMENTER_BACKBONES = ("tiny", "mobilenet_v3_small")
PRIOR_PROB = 0.01  # focal-loss prior: every class starts at sigmoid = 0.01, so the many negatives do not swamp step one

# torchvision feature nodes by output stride (weights=None: nothing is downloaded)
_TORCHVISION_NODES = {
    "mobilenet_v3_small": {4: "features.1", 8: "features.3", 16: "features.8", 32: "features.11"},
    "resnet18": {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"},
}


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU: the unit every backend fuses and quantizes."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def _check_strides(strides: Sequence[int], available: Sequence[int], what: str) -> tuple[int, ...]:
    strides = tuple(int(s) for s in strides)
    if not strides or any(b != 2 * a for a, b in zip(strides, strides[1:])) or not set(strides) <= set(available):
        raise ConfigError(f"{what}: strides {list(strides)} are not consecutive doublings out of {list(available)}",
                          hint="use e.g. strides: [8, 16, 32]")
    return strides


class TinyBackbone(nn.Module):
    """A few strided conv blocks (stride 2 conv + 3x3 conv each): fast on two CPU cores, features at 4..64."""

    STRIDES = (4, 8, 16, 32, 64)

    def __init__(self, width: int = 32, max_stride: int = 32, in_channels: int = 3):
        super().__init__()
        self.stem = ConvBNAct(in_channels, max(width // 2, 8), stride=2)
        cin = max(width // 2, 8)
        self.stages = nn.ModuleList()
        self.channels: dict[int, int] = {}
        stride = 2
        while stride < max_stride:
            stride *= 2
            # width, 2x, 4x, then flat: deeper maps are tiny and wider layers would only add weights
            cout = width * min(max(stride // 8, 1) * (2 if stride >= 8 else 1), 4)
            self.stages.append(nn.Sequential(ConvBNAct(cin, cout, stride=2), ConvBNAct(cout, cout)))
            self.channels[stride] = cout
            cin = cout

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.stem(x)
        out, stride = {}, 2
        for stage in self.stages:
            x = stage(x)
            stride *= 2
            out[stride] = x
        return out


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier's feature maps at the requested strides, by torchvision's feature extraction."""

    def __init__(self, name: str, strides: Sequence[int], in_channels: int = 3):
        import torchvision.models as tvm
        from torchvision.models.feature_extraction import create_feature_extractor

        super().__init__()
        body = getattr(tvm, name)(weights=None)
        if in_channels != 3:
            first = body.conv1 if name == "resnet18" else body.features[0][0]
            conv = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                             bias=False)
            if name == "resnet18":
                body.conv1 = conv
            else:
                body.features[0][0] = conv
        nodes = _TORCHVISION_NODES[name]
        self.strides = tuple(strides)
        self.body = create_feature_extractor(body, return_nodes={nodes[s]: str(s) for s in self.strides})
        with torch.no_grad():
            was = self.body.training
            self.body.eval()
            probe = self.body(torch.zeros(1, in_channels, 64, 64))
            self.body.train(was)
        self.channels = {s: int(probe[str(s)].shape[1]) for s in self.strides}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        feats = self.body(x)
        return {s: feats[str(s)] for s in self.strides}


def _backbone(name: str, width: int, strides: Sequence[int], in_channels: int,
              allowed: Sequence[str]) -> nn.Module:
    if name not in allowed:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(allowed)}")
    if name == "tiny":
        return TinyBackbone(width, max(strides), in_channels)
    return TorchvisionBackbone(name, strides, in_channels)


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    # a fixed scale, not a target size: converts to a static Resize/RESIZE_NEAREST_NEIGHBOR everywhere
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class PANLite(nn.Module):
    """FPN top-down (1x1 laterals, nearest x2 upsample + add) then a PAN bottom-up pass (stride-2 conv + add)."""

    def __init__(self, in_channels: Sequence[int], width: int):
        super().__init__()
        n = len(in_channels)
        self.lateral = nn.ModuleList(ConvBNAct(c, width, k=1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBNAct(width, width) for _ in range(n))
        self.down = nn.ModuleList(ConvBNAct(width, width, stride=2) for _ in range(n - 1))
        self.out = nn.ModuleList(ConvBNAct(width, width) for _ in range(n - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [m(f) for m, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + _upsample2(lat[i + 1])
        td = [m(f) for m, f in zip(self.smooth, lat)]
        out = [td[0]]
        for i in range(1, len(td)):
            out.append(self.out[i - 1](td[i] + self.down[i - 1](out[-1])))
        return out


class Detector(nn.Module):
    """A small anchor-free single-stage detector (FCOS-like) whose output is the detection contract's ``[B, A, 4+C]``.

    Backbone (``tiny``: strided conv blocks; or torchvision ``mobilenet_v3_small`` / ``resnet18`` features,
    no weights downloaded) → PAN-lite neck at ``width`` channels → a decoupled head per level (one 3x3
    conv + 1x1 for boxes, one 3x3 conv + 1x1 for classes). Per-level heads rather than one shared head:
    BatchNorm statistics differ by level, and the cost at these widths is small. Input height and width
    must be multiples of ``max(strides)``.
    """

    def __init__(self, num_classes: int, width: int = 32, strides: Sequence[int] = (8, 16, 32),
                 backbone: str = "tiny", in_channels: int = 3):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"a detector needs at least one class, got num_classes={num_classes}")
        available = TinyBackbone.STRIDES if backbone == "tiny" else (4, 8, 16, 32)
        self.strides = _check_strides(strides, available, f"Detector(backbone={backbone!r})")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.backbone = _backbone(backbone, width, self.strides, in_channels, DETECTOR_BACKBONES)
        self.neck = PANLite([self.backbone.channels[s] for s in self.strides], width)
        self.box_towers = nn.ModuleList(ConvBNAct(width, width) for _ in self.strides)
        self.cls_towers = nn.ModuleList(ConvBNAct(width, width) for _ in self.strides)
        self.box_out = nn.ModuleList(nn.Conv2d(width, 4, 1) for _ in self.strides)
        self.cls_out = nn.ModuleList(nn.Conv2d(width, num_classes, 1) for _ in self.strides)
        for conv in self.cls_out:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        for conv in self.box_out:
            # start every anchor at a box 2 strides wide: inside the ReLU's live range, so every positive
            # gets a gradient from step one
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = max(self.strides)
        h, w = x.shape[-2], x.shape[-1]
        if isinstance(h, int) and isinstance(w, int) and (h % m or w % m):
            raise ConfigError(f"detector input {h}x{w} is not a multiple of the largest stride {m}",
                              hint=f"resize or letterbox to a multiple of {m}, e.g. {max(m, h // m * m)}")
        feats = self.backbone(x)
        levels = self.neck([feats[s] for s in self.strides])
        outs = []
        for i, f in enumerate(levels):
            box = F.relu(self.box_out[i](self.box_towers[i](f)))
            cls = self.cls_out[i](self.cls_towers[i](f))
            y = torch.cat([box, cls], 1)  # [B, 4+C, h, w]
            outs.append(y.flatten(2).transpose(1, 2))  # row-major over the grid, as the contract's anchor order
        return torch.cat(outs, 1)


class UNet(nn.Module):
    """A small U-Net: ``depth`` down steps (max-pool + two 3x3 convs, width doubling), nearest x2 up + concat back.

    Output ``[B, K, H, W]`` logits at input resolution; H and W must be multiples of ``2 ** depth``.
    """

    def __init__(self, num_classes_with_background: int, width: int = 16, depth: int = 3, in_channels: int = 3):
        super().__init__()
        if num_classes_with_background < 2:
            raise ConfigError("a segmenter needs background plus at least one class "
                              f"(num_classes_with_background={num_classes_with_background})")
        if depth < 1:
            raise ConfigError(f"UNet depth must be at least 1, got {depth}")
        self.depth = depth
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.enc = nn.ModuleList([nn.Sequential(ConvBNAct(in_channels, widths[0]), ConvBNAct(widths[0], widths[0]))])
        for i in range(1, depth + 1):
            self.enc.append(nn.Sequential(ConvBNAct(widths[i - 1], widths[i]), ConvBNAct(widths[i], widths[i])))
        self.reduce = nn.ModuleList(ConvBNAct(widths[i + 1], widths[i], k=1) for i in range(depth))
        self.dec = nn.ModuleList(nn.Sequential(ConvBNAct(2 * widths[i], widths[i]), ConvBNAct(widths[i], widths[i]))
                                 for i in range(depth))
        self.classifier = nn.Conv2d(widths[0], num_classes_with_background, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2 ** self.depth
        h, w = x.shape[-2], x.shape[-1]
        if isinstance(h, int) and isinstance(w, int) and (h % m or w % m):
            raise ConfigError(f"UNet input {h}x{w} is not a multiple of 2**depth = {m}",
                              hint=f"resize to a multiple of {m}")
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in range(self.depth - 1, -1, -1):
            x = self.dec[i](torch.cat([skips[i], _upsample2(self.reduce[i](x))], 1))
        return self.classifier(x)


class LRASPPLite(nn.Module):
    """Lite R-ASPP (MobileNetV3 paper's segmentation head) on a light backbone.

    The stride-16 features pass a 1x1 conv gated by a global-average attention branch, are upsampled to
    stride 8 and classified; a 1x1 classifier on the stride-8 features is added; a fixed-scale bilinear x8
    upsample returns logits at input resolution. Only mean, sigmoid, mul and fixed-scale resize beyond
    conv/bn/relu: it exports and converts where DeepLab's atrous pyramid with a target-size resize may not.
    """

    def __init__(self, num_classes_with_background: int, backbone: str = "tiny", width: int = 32,
                 inter_channels: int = 64, in_channels: int = 3):
        super().__init__()
        if num_classes_with_background < 2:
            raise ConfigError("a segmenter needs background plus at least one class "
                              f"(num_classes_with_background={num_classes_with_background})")
        self.backbone = _backbone(backbone, width, (8, 16), in_channels, SEGMENTER_BACKBONES)
        low, high = self.backbone.channels[8], self.backbone.channels[16]
        self.cbr = ConvBNAct(high, inter_channels, k=1)
        self.scale = nn.Conv2d(high, inter_channels, 1)
        self.low_classifier = nn.Conv2d(low, num_classes_with_background, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes_with_background, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if isinstance(h, int) and isinstance(w, int) and (h % 16 or w % 16):
            raise ConfigError(f"LRASPPLite input {h}x{w} is not a multiple of 16", hint="resize to a multiple of 16")
        feats = self.backbone(x)
        low, high = feats[8], feats[16]
        gate = torch.sigmoid(self.scale(high.mean((2, 3), keepdim=True)))
        y = _upsample2(self.cbr(high) * gate)
        y = self.low_classifier(low) + self.high_classifier(y)
        return F.interpolate(y, scale_factor=8.0, mode="bilinear", align_corners=False)
