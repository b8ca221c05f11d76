"""Preprocessing presets: the normalisations model zoos were trained with, by name.

A model brought from elsewhere needs the device to feed it what its training fed it; these
are the conventions almost every image classifier uses. ``edgekit compile --preprocess NAME``
and ``edgekit init`` start from one; ``--size``, ``--mean``, ``--std`` and ``--layout`` (and
the build file's ``preprocess:`` section) override its fields. The size and layout come from
the model's input where the file fixes them.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

PREPROCESS_PRESETS: dict[str, dict[str, Any]] = {
    # torchvision / timm: RGB in [0, 1], ImageNet mean and std per channel
    "imagenet": {"type": "image", "color": "rgb", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "resize": "shorter_center_crop", "interpolation": "linear"},
    # TF/Keras MobileNet, Inception, EfficientNet-lite: RGB in [-1, 1]
    "inception": {"type": "image", "color": "rgb", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5],
                  "std": [0.5, 0.5, 0.5], "resize": "shorter_center_crop", "interpolation": "linear"},
    # Caffe and Keras "caffe" mode (VGG, ResNet-50 v1 from Keras): BGR 0-255 minus the ImageNet means
    "caffe": {"type": "image", "color": "bgr", "scale": 1.0, "mean": [103.939, 116.779, 123.68],
              "std": [1.0, 1.0, 1.0], "resize": "shorter_center_crop", "interpolation": "linear"},
    # YOLO-style and many detectors/segmenters: RGB in [0, 1], stretched to the input size
    "unit": {"type": "image", "color": "rgb", "scale": 1 / 255, "mean": None, "std": None,
             "resize": "stretch", "interpolation": "linear"},
    # one-channel models (digits, documents, thermal): gray in [0, 1]
    "gray": {"type": "image", "color": "gray", "scale": 1 / 255, "mean": None, "std": None,
             "resize": "stretch", "interpolation": "area"},
}


def preset(name: str) -> dict[str, Any]:
    """The named preset's fields (a copy); ConfigError listing the presets for an unknown name."""
    if name not in PREPROCESS_PRESETS:
        raise ConfigError(f"unknown preprocessing preset {name!r}",
                          hint=f"use one of {', '.join(PREPROCESS_PRESETS)}, or give --size/--mean/--std/--layout "
                               f"(or a preprocess: section in the build file)")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PREPROCESS_PRESETS[name].items()}


def layout_and_size(shape: list | None) -> tuple[str | None, list[int] | None]:
    """``(layout, [height, width])`` of an image input shape (batch first), where its dims say so.

    A 4-D input with 1 or 3 on axis 1 is NCHW, on the last axis NHWC; height and width are
    returned only when both are fixed.
    """
    if not shape or len(shape) != 4:
        return None, None
    if shape[1] in (1, 3):
        layout, hw = "NCHW", shape[2:4]
    elif shape[3] in (1, 3):
        layout, hw = "NHWC", shape[1:3]
    else:
        return None, None
    size = [int(d) for d in hw] if all(isinstance(d, int) and d > 0 for d in hw) else None
    return layout, size


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` → floats; ConfigError naming the flag for anything else."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers (e.g. 0.485,0.456,0.406); got {text!r}") from None


def parse_size(text: str | None) -> list[int] | None:
    """``--size``: ``224``, ``224x224`` or ``240,320`` (height, width)."""
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size takes HEIGHT,WIDTH, HEIGHTxWIDTH or one number; got {text!r}")
    return values
