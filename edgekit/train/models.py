"""Architectures ``edgekit train`` can build, by name, and the run checkpoint (``model.pt``) they live in.

Every model is an :class:`EdgeNet`: ``features(x)`` gives one pooled vector per sample and ``head``
(an ``nn.Linear``) maps it to ``out_dim`` outputs, so fine-tuning can freeze everything but ``head``.
Regression and forecast models carry the targets' mean and std as buffers and output
``head * std + mean``: the exported graph, and so the bundle, answers in real units.
Everything here exports with the dynamo ONNX exporter and quantizes as plain conv/bn/relu/add/linear
(the GRU exports as the ONNX ``GRU`` operator).
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, ModelImportError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgekit-run/1"
KINDS = ("image", "sequence", "tabular", "forecast")
_NDIM = {"image": 3, "sequence": 2, "forecast": 2, "tabular": 1}  # one sample, without the batch axis


class EdgeNet(nn.Module):
    """Base of every model built here: ``forward = head(features(x))`` [``* y_std + y_mean``].

    Subclasses define ``features`` and a ``head`` (``nn.Linear``) and call :meth:`_block` on their
    blocks so activation checkpointing applies to them.
    """

    head: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.checkpointing = False
        self.frozen_backbone = False
        self.register_buffer("y_mean", None)
        self.register_buffer("y_std", None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        if self.y_mean is not None:
            out = out * self.y_std + self.y_mean
        return out

    def _block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def set_output_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Outputs become ``head * std + mean`` (per output, or one value for all)."""
        self.y_mean = torch.tensor(list(mean), dtype=torch.float32)
        self.y_std = torch.tensor(list(std), dtype=torch.float32)

    def freeze_backbone(self) -> None:
        """Only ``head`` stays trainable; batch norms outside it keep their running statistics."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.frozen_backbone = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "EdgeNet":
        super().train(mode)
        if self.frozen_backbone and mode:
            head = set(self.head.modules())
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in head:
                    m.eval()
        return self


# ---------------------------------------------------------------------------------------- images


class ResNetSmall(EdgeNet):
    """A small ResNet: stem conv, one stage of torchvision BasicBlocks per width (stride 2 after the first),
    global average pool, dropout, linear head. No stem downsampling for images of 32 px or less."""

    def __init__(self, input_shape: Sequence[int], out_dim: int, widths: Sequence[int] = (32, 64, 128),
                 blocks: int = 1, dropout: float = 0.1):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        c, h, w = input_shape
        if not widths or blocks < 1:
            raise ConfigError("resnet_small needs at least one width and blocks >= 1")
        side = max(h, w)
        stride = 1 if side <= 32 else 2
        stem: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        if side > 64:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                s = 2 if i > 0 and j == 0 else 1
                down = None
                if s != 1 or cin != width:
                    down = nn.Sequential(nn.Conv2d(cin, width, 1, stride=s, bias=False), nn.BatchNorm2d(width))
                layers.append(BasicBlock(cin, width, stride=s, downsample=down))
                cin = width
        self.blocks = nn.ModuleList(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = self._block(block, x)
        return self.dropout(self.pool(x).flatten(1))


_TORCHVISION = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")


class TorchvisionNet(EdgeNet):
    """A torchvision backbone (no weights downloaded) with its last linear layer moved to ``head`` and,
    for ``in_channels != 3``, a first conv that takes the data's channels."""

    def __init__(self, name: str, input_shape: Sequence[int], out_dim: int):
        import torchvision.models as tvm

        super().__init__()
        self.family = name
        body = getattr(tvm, name)(weights=None)
        c = input_shape[0]
        if name == "resnet18":
            if c != 3:
                body.conv1 = _conv_like(body.conv1, c)
            width = body.fc.in_features
            body.fc = nn.Identity()
        else:
            if c != 3:
                body.features[0][0] = _conv_like(body.features[0][0], c)
            width = body.classifier[-1].in_features
            body.classifier[-1] = nn.Identity()
        self.body = body
        self.head = nn.Linear(width, out_dim)

    def features(self, x):
        b = self.body
        if self.family == "resnet18":
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
                for block in layer:
                    x = self._block(block, x)
            return torch.flatten(b.avgpool(x), 1)
        for block in b.features:
            x = self._block(block, x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return b.classifier(x)  # dropout (and v3's hidden linear + hardswish); the last linear is head


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     bias=conv.bias is not None)


# ------------------------------------------------------------------------------------- sequences


def _odd_kernel(k: int, length: int) -> int:
    k = max(1, min(k, length))
    return k if k % 2 else k - 1


class InceptionModule(nn.Module):
    """Bottleneck 1×1, three parallel convolutions, a max-pool + 1×1 branch; concatenated, BN, ReLU."""

    def __init__(self, cin: int, nb_filters: int, kernel_sizes: Sequence[int], bottleneck: int):
        super().__init__()
        use_bottleneck = bottleneck > 0 and cin > 1
        self.bottleneck = nn.Conv1d(cin, bottleneck, 1, bias=False) if use_bottleneck else nn.Identity()
        cb = bottleneck if use_bottleneck else cin
        self.convs = nn.ModuleList(nn.Conv1d(cb, nb_filters, k, padding=k // 2, bias=False) for k in kernel_sizes)
        self.pool_branch = nn.Sequential(nn.MaxPool1d(3, stride=1, padding=1),
                                         nn.Conv1d(cin, nb_filters, 1, bias=False))
        self.bn = nn.BatchNorm1d(nb_filters * (len(kernel_sizes) + 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        z = self.bottleneck(x)
        out = torch.cat([conv(z) for conv in self.convs] + [self.pool_branch(x)], dim=1)
        return self.relu(self.bn(out))


class InceptionTime(EdgeNet):
    """InceptionTime (Ismail Fawaz et al., 2020): ``depth`` inception modules, a residual shortcut every
    three, global average pool, linear head. Kernel sizes are capped to the series length and made odd."""

    def __init__(self, input_shape: Sequence[int], out_dim: int, nb_filters: int = 32, depth: int = 6,
                 kernel_sizes: Sequence[int] = (40, 20, 10), bottleneck: int = 32, residual: bool = True):
        super().__init__()
        c, length = input_shape
        if depth < 1 or nb_filters < 1:
            raise ConfigError("inception_time needs depth >= 1 and nb_filters >= 1")
        ks = [_odd_kernel(k, length) for k in kernel_sizes]
        width = nb_filters * (len(ks) + 1)
        self.inception = nn.ModuleList(
            InceptionModule(c if i == 0 else width, nb_filters, ks, bottleneck) for i in range(depth))
        self.shortcuts = nn.ModuleList()
        self.residual = residual
        if residual:
            cin = c
            for _ in range(depth // 3):
                self.shortcuts.append(nn.Sequential(nn.Conv1d(cin, width, 1, bias=False), nn.BatchNorm1d(width)))
                cin = width
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(width, out_dim)

    def features(self, x):
        res = x
        for i, module in enumerate(self.inception):
            x = self._block(module, x)
            if self.residual and i % 3 == 2:
                x = self.relu(x + self.shortcuts[i // 3](res))
                res = x
        return x.mean(dim=2)


class FCN1d(EdgeNet):
    """Fully convolutional network (Wang et al., 2017): conv 128/8, 256/5, 128/3 with BN and ReLU, global
    average pool, linear head."""

    def __init__(self, input_shape: Sequence[int], out_dim: int, filters: Sequence[int] = (128, 256, 128),
                 kernel_sizes: Sequence[int] = (8, 5, 3)):
        super().__init__()
        if len(filters) != len(kernel_sizes) or not filters:
            raise ConfigError("fcn1d needs as many filters as kernel_sizes")
        cin = input_shape[0]
        blocks = []
        for f, k in zip(filters, kernel_sizes):
            pad = nn.ConstantPad1d(((k - 1) // 2, k // 2), 0.0)  # "same" length, also for even kernels
            blocks.append(nn.Sequential(pad, nn.Conv1d(cin, f, k, bias=False), nn.BatchNorm1d(f),
                                        nn.ReLU(inplace=True)))
            cin = f
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cin, out_dim)

    def features(self, x):
        for block in self.blocks:
            x = self._block(block, x)
        return x.mean(dim=2)


class GRUNet(EdgeNet):
    """GRU over the time axis: (N, C, L) → (N, L, C) → GRU → last hidden state → head (e.g. the horizon).

    ``level=(mean, std)`` (forecasts; the input normalization of the target channel 0) makes the
    network level-free: it sees the target channel relative to its last value and predicts the change from
    it, and the last value (in real units) is added back. A series whose level leaves the training
    range (a trend) is then still inside what the GRU has seen; everything stays in the graph.
    """

    def __init__(self, input_shape: Sequence[int], out_dim: int, hidden: int = 64, layers: int = 1,
                 dropout: float = 0.0, level: Sequence[float] | None = None):
        super().__init__()
        if not 1 <= layers <= 4 or hidden < 1:
            raise ConfigError("gru needs 1 to 4 layers and hidden >= 1")
        self.gru = nn.GRU(input_shape[0], hidden, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, out_dim)
        self.register_buffer("level", None if level is None else torch.tensor(list(level), dtype=torch.float32))

    def features(self, x):
        if self.level is not None:  # the target channel relative to its last value; other inputs keep their level
            x = torch.cat([x[:, :1] - x[:, :1, -1:], x[:, 1:]], dim=1)
        _, h = self.gru(x.transpose(1, 2))
        return self.dropout(h[-1])

    def forward(self, x):
        if self.level is None:
            return super().forward(x)
        out = self.head(self.features(x))
        if self.y_std is not None:
            out = out * self.y_std
        last = x[:, 0, -1:] * self.level[1] + self.level[0]
        return last + out


class MLP(EdgeNet):
    """Flatten, then Linear + ReLU + Dropout per hidden width, linear head (tabular rows, short windows)."""

    def __init__(self, input_shape: Sequence[int], out_dim: int, hidden: Sequence[int] = (128, 64),
                 dropout: float = 0.1):
        super().__init__()
        cin = int(np.prod(input_shape))
        blocks = []
        for width in hidden:
            blocks.append(nn.Sequential(nn.Linear(cin, width), nn.ReLU(inplace=True), nn.Dropout(dropout)))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cin, out_dim)

    def features(self, x):
        x = x.flatten(1)
        for block in self.blocks:
            x = self._block(block, x)
        return x


# -------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ArchInfo:
    """``builder(input_shape, out_dim, **kwargs) -> EdgeNet``; ``kinds``: the data kinds it fits."""

    builder: Callable[..., EdgeNet]
    kinds: tuple[str, ...]
    description: str
    tasks: tuple[str, ...] = ("classification", "regression", "forecast")  # what its output can be trained for


def _torchvision(name: str) -> Callable[..., EdgeNet]:
    def build(input_shape, out_dim):
        return TorchvisionNet(name, input_shape, out_dim)
    return build


ARCHS: dict[str, ArchInfo] = {
    "resnet_small": ArchInfo(ResNetSmall, ("image",), "small ResNet (3 stages of BasicBlocks, 32/64/128 wide)"),
    "resnet18": ArchInfo(_torchvision("resnet18"), ("image",), "torchvision ResNet-18 (11 M parameters)"),
    "mobilenet_v2": ArchInfo(_torchvision("mobilenet_v2"), ("image",), "torchvision MobileNetV2 (3.5 M)"),
    "mobilenet_v3_small": ArchInfo(_torchvision("mobilenet_v3_small"), ("image",),
                                   "torchvision MobileNetV3-Small (2.5 M)"),
    "inception_time": ArchInfo(InceptionTime, ("sequence", "forecast"),
                               "InceptionTime 1-D CNN (Ismail Fawaz et al. 2020), depth 6"),
    "fcn1d": ArchInfo(FCN1d, ("sequence", "forecast"), "fully convolutional 1-D network (Wang et al. 2017)"),
    "gru": ArchInfo(GRUNet, ("forecast", "sequence"), "GRU (hidden 64) on the window, last state to the head"),
    "mlp": ArchInfo(MLP, ("tabular", "forecast", "sequence"), "multilayer perceptron on the flattened input"),
}

def _detector(backbone: str) -> Callable[..., nn.Module]:
    """An anchor-free detector of :mod:`edgekit.train.dense_models` on ``backbone`` (imported when built)."""
    def build(input_shape, out_dim, width: int = 32, strides: Sequence[int] = (8, 16, 32)):
        from .dense_models import Detector

        return Detector(out_dim, width=width, strides=tuple(strides), backbone=backbone, in_channels=input_shape[0])
    return build


def _unet(input_shape, out_dim, width: int = 16, depth: int = 3):
    from .dense_models import UNet

    return UNet(out_dim, width=width, depth=depth, in_channels=input_shape[0])


def _lraspp(input_shape, out_dim, backbone: str = "tiny", width: int = 32, inter_channels: int = 64):
    from .dense_models import LRASPPLite

    return LRASPPLite(out_dim, backbone=backbone, width=width, inter_channels=inter_channels,
                      in_channels=input_shape[0])


ARCHS.update({
    "detector_tiny": ArchInfo(_detector("tiny"), ("image",), "anchor-free single-stage detector, strides "
                              "8/16/32, a tiny strided-conv backbone (fast on 2 CPU cores)", ("detection",)),
    "detector_mobilenet": ArchInfo(_detector("mobilenet_v3_small"), ("image",), "the same detector head on "
                                   "torchvision's MobileNetV3-Small features", ("detection",)),
    "unet": ArchInfo(_unet, ("image",), "U-Net (3 levels, width 16) for semantic segmentation",
                     ("segmentation",)),
    "lraspp": ArchInfo(_lraspp, ("image",), "LR-ASPP head on a light backbone for semantic segmentation",
                       ("segmentation",)),
})

_DEFAULTS = {"image": "resnet_small", "sequence": "inception_time", "forecast": "gru", "tabular": "mlp"}
_TASK_DEFAULTS = {"detection": "detector_tiny", "segmentation": "unet"}


def default_arch(kind: str, task: str) -> str:
    """The architecture picked when none is given: by the task for detection and segmentation, else by the
    kind of data."""
    if task in _TASK_DEFAULTS:
        return _TASK_DEFAULTS[task]
    try:
        return _DEFAULTS[kind]
    except KeyError:
        raise ConfigError(f"no default architecture for data kind {kind!r}; kinds: {', '.join(_DEFAULTS)}") from None


def infer_kind(input_shape: Sequence[int], task: str) -> str:
    """The data kind of one sample's shape: (C, H, W) image, (C, L) sequence (forecast for that task), (F,)."""
    n = len(input_shape)
    if n == 3:
        return "image"
    if n == 2:
        return "forecast" if task == "forecast" else "sequence"
    if n == 1:
        return "tabular"
    raise ConfigError(f"input shape {list(input_shape)} is neither (C, H, W), (C, L) nor (F,)")


def build_model(arch: str, input_shape: Sequence[int], out_dim: int, *, task: str,
                y_stats: tuple[Sequence[float], Sequence[float]] | None = None,
                pretrained: Path | str | None = None, freeze_backbone: bool = False,
                checkpointing: bool = False, kind: str | None = None, **kwargs: Any) -> EdgeNet:
    """Build ``arch`` for samples of ``input_shape`` with ``out_dim`` outputs.

    ``y_stats`` = (mean, std) of the targets (regression/forecast): the model outputs real units.
    ``pretrained``: a local state dict (or a checkpoint holding one under "model"); the head is
    skipped when its shape differs. ``kind`` defaults to what ``input_shape`` and ``task`` imply.
    ``kwargs`` go to the architecture (e.g. ``widths``, ``nb_filters``, ``hidden``).
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    info = ARCHS[arch]
    shape = [int(s) for s in input_shape]
    if kind is None:
        kind = infer_kind(shape, task)
    if kind not in _NDIM:
        raise ConfigError(f"unknown data kind {kind!r}; kinds: {', '.join(KINDS)}")
    if len(shape) != _NDIM[kind] or min(shape, default=0) < 1:
        raise ConfigError(f"{kind} samples need {_NDIM[kind]} positive dimensions, got input shape {shape}")
    if task not in info.tasks:
        fits = [name for name, a in ARCHS.items() if task in a.tasks and kind in a.kinds]
        raise ConfigError(f"architecture {arch!r} is not made for {task}; for {task} use one of: {', '.join(fits)}")
    if kind not in info.kinds:
        fits = [name for name, a in ARCHS.items() if kind in a.kinds]
        raise ConfigError(f"architecture {arch!r} does not fit {kind} data; for {kind} data use one of: "
                          f"{', '.join(fits)}")
    if out_dim < 1:
        raise ConfigError(f"out_dim must be at least 1, got {out_dim}")
    try:
        inspect.signature(info.builder).bind(shape, out_dim, **kwargs)
    except TypeError:
        params = [p for p in inspect.signature(info.builder).parameters if p not in ("input_shape", "out_dim")]
        raise ConfigError(f"architecture {arch!r} does not take {sorted(kwargs)}; its settings are: "
                          f"{', '.join(params) or 'none'}") from None
    model = info.builder(shape, out_dim, **kwargs)
    model.build_info = {"arch": arch, "arch_kwargs": dict(kwargs), "input_shape": shape, "out_dim": int(out_dim),
                        "task": task, "kind": kind}
    if pretrained is not None:
        load_pretrained(model, Path(pretrained))
    if y_stats is not None:
        if task == "classification":
            raise ConfigError("y_stats (target mean and std) apply to regression and forecast, not classification")
        mean, std = _check_y_stats(y_stats, out_dim)
        model.set_output_stats(mean, std)
        model.build_info["y_stats"] = [mean, std]
    if freeze_backbone:
        model.freeze_backbone()
    model.checkpointing = bool(checkpointing)
    return model


def _check_y_stats(y_stats, out_dim: int) -> tuple[list[float], list[float]]:
    try:
        mean, std = ([float(v) for v in np.ravel(s)] for s in y_stats)
    except (TypeError, ValueError):
        raise ConfigError("y_stats must be (mean, std), each a number or a list of numbers") from None
    if len(mean) != len(std) or len(mean) not in (1, out_dim):
        raise ConfigError(f"y_stats need 1 or {out_dim} means and stds, got {len(mean)} and {len(std)}")
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise ConfigError(f"y_stats must be finite with std > 0, got mean {mean}, std {std}")
    return mean, std


# ------------------------------------------------------------------------------------ pretrained


_PREFIXES = ("module.", "_orig_mod.", "net.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from ..errors import ModelImportError
    from ..models.importer import load_state_dict_file

    if not path.is_file():
        raise ConfigError(f"pretrained weights {path} do not exist (nothing is downloaded: give a local file)")
    try:
        obj = load_state_dict_file(path)
    except ModelImportError as exc:
        raise ConfigError(f"pretrained weights: {exc}") from None
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} holds no state dict (a dict of tensors, or a checkpoint with one under 'model')")
    return obj


def _adapt_input_conv(src: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """A first conv's weight for another number of input channels (sum for one; repeat and rescale else)."""
    if src.dim() != 4 or src.shape[0] != shape[0] or src.shape[2:] != shape[2:]:
        return None
    cin, src_c = shape[1], src.shape[1]
    if cin == 1:
        return src.sum(dim=1, keepdim=True)
    reps = -(-cin // src_c)
    return src.repeat(1, reps, 1, 1)[:, :cin] * (src_c / cin)


def load_pretrained(model: EdgeNet, path: Path) -> dict[str, list[str]]:
    """Load matching weights from ``path`` into ``model``; returns what was loaded and skipped.

    Keys may carry a DDP/compile prefix or be a bare torchvision backbone's. A head of another shape
    is left as initialised; any other shape mismatch (except a first conv's input channels) is an error.
    """
    source = _read_state_dict(path)
    target = model.state_dict()
    head_keys = {f"head.{k}" for k in model.head.state_dict()}
    loaded: dict[str, torch.Tensor] = {}
    skipped_head: list[str] = []
    mismatched: list[str] = []
    unused: list[str] = []
    for key, value in source.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if name not in target and f"body.{name}" in target:
            name = f"body.{name}"
        if name not in target or name in ("y_mean", "y_std"):
            unused.append(key)
            continue
        want = target[name].shape
        if value.shape == want:
            loaded[name] = value
        elif name in head_keys:
            skipped_head.append(name)
        else:
            adapted = _adapt_input_conv(value, want)
            if adapted is not None:
                loaded[name] = adapted
                log.info("adapted %s from %d to %d input channels", name, value.shape[1], want[1])
            else:
                mismatched.append(f"{name} {list(value.shape)} vs {list(want)}")
    if mismatched:
        raise ConfigError(f"pretrained weights {path} do not fit this architecture: {'; '.join(mismatched[:5])}; "
                          f"use weights from the same architecture and settings")
    if not loaded:
        raise ConfigError(f"no weights in {path} match {type(model).__name__}; was it saved from the same "
                          f"architecture?")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in target if k not in loaded and k not in head_keys and not k.startswith("y_")]
    log.info("pretrained %s: loaded %d tensors, head %s, %d not in the file, %d unused",
             path, len(loaded), "new" if skipped_head else "loaded", len(missing), len(unused))
    return {"loaded": sorted(loaded), "skipped_head": skipped_head, "missing": missing, "unused": unused}


# ------------------------------------------------------------------------------------ checkpoint


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model._orig_mod
    return model


def _plain(obj: Any) -> Any:
    """``obj`` as types ``torch.load(weights_only=True)`` reads: paths to str, numpy to Python."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
        return obj
    raise TypeError(f"checkpoint metadata cannot hold a {type(obj).__name__}: {obj!r}")


_REQUIRED = ("arch", "input_shape", "out_dim", "task")


def save_checkpoint(path: Path | str, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.pt`` (format ``edgekit-run/1``): ``meta`` + the model's build settings + ``"model"``.

    The file is written beside ``path`` and renamed over it, so a crash never leaves half a checkpoint.
    """
    path = Path(path)
    net = _unwrap(model)
    record: dict[str, Any] = {"y_stats": None, "arch_kwargs": {}}
    record.update(getattr(net, "build_info", {}))
    record.update(meta)
    missing = [k for k in _REQUIRED if record.get(k) is None]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    record = _plain(record)
    record["format"] = CHECKPOINT_FORMAT
    record["model"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """A run's ``model.pt`` (or a run folder holding one), checked for its format."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ModelImportError(f"{path} does not exist; point at a run folder's model.pt (edgekit train writes it)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelImportError(f"cannot read {path}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelImportError(f"{path} is not an edgekit run checkpoint (format {found!r}, expected "
                               f"{CHECKPOINT_FORMAT!r}); give a run folder written by edgekit train")
    return ckpt


def from_checkpoint(path: str) -> EdgeNet:
    """Factory for build files: the untrained module a run's ``model.pt`` describes (load ``"model"`` into it)."""
    return _module_of(read_checkpoint(path), path)


def load_trained(path: Path | str) -> EdgeNet:
    """The trained module in a run's ``model.pt`` (one read of the file), in eval mode."""
    ckpt = read_checkpoint(path)
    model = _module_of(ckpt, path)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _module_of(ckpt: dict[str, Any], path: Path | str) -> EdgeNet:
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise ModelImportError(f"{path} lacks {missing}; it was not written by edgekit train")
    y_stats = ckpt.get("y_stats")
    return build_model(ckpt["arch"], ckpt["input_shape"], ckpt["out_dim"], task=ckpt["task"],
                       y_stats=tuple(y_stats) if y_stats else None, kind=ckpt.get("kind"),
                       **(ckpt.get("arch_kwargs") or {}))


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and build settings, for the report and logs."""
    net = _unwrap(model)
    info = getattr(net, "build_info", {})
    return {"arch": info.get("arch", type(net).__name__), "arch_kwargs": info.get("arch_kwargs", {}),
            "params": sum(p.numel() for p in net.parameters()),
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "frozen_backbone": bool(getattr(net, "frozen_backbone", False)),
            "checkpointing": bool(getattr(net, "checkpointing", False))}


__all__ = ["ARCHS", "ArchInfo", "CHECKPOINT_FORMAT", "EdgeNet", "build_model", "default_arch", "describe",
           "from_checkpoint", "infer_kind", "load_pretrained", "read_checkpoint", "save_checkpoint"]


def outlier_from_checkpoint(path: str, scale: float = 300.0, channels: int = 1) -> EdgeNet:
    """Factory for build files: a trained resnet_small run with activation outliers, same function.

    In every residual block, the ``channels`` strongest channels after the first convolution are made
    ``scale`` times larger (that BN's weight and bias) and the next convolution reads them ``scale`` times
    smaller: ReLU is positively homogeneous, so the outputs do not change, but that activation tensor's
    range grows ``scale``-fold and per-tensor INT8 leaves its other channels a handful of levels — the
    outlier pattern (a few huge channels) that breaks post-training quantization and that
    quantization-aware training learns around. Give it without ``model.checkpoint``: the weights are loaded here.
    """
    model = load_trained(path)
    blocks = getattr(model, "blocks", None)
    if not isinstance(model, ResNetSmall) or not blocks:
        raise ConfigError(f"{path}: outlier_from_checkpoint takes a resnet_small run, got {type(model).__name__}")
    if scale <= 0 or channels < 1:
        raise ConfigError(f"outlier_from_checkpoint needs scale > 0 and channels >= 1, got {scale}, {channels}")
    with torch.no_grad():
        for block in blocks:
            picked = block.bn1.weight.abs().argsort(descending=True)[:channels]
            block.bn1.weight[picked] *= scale
            block.bn1.bias[picked] *= scale
            block.conv2.weight[:, picked] /= scale
    return model.eval()
