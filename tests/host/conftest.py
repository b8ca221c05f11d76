"""Shared, session-scoped artifacts for the host tests: a trained digits CNN, keys, bundles.

Compiling is the expensive part (seconds per bundle), so each bundle is built
once per session and shared read-only by the tests that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_FILE = REPO / "examples" / "digits.yaml"
X86_TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu")


def build_config(checkpoint: Path, target: str, output: Path, **overrides: Any):
    from edgekit.config import load_build

    base = {"target": target, "model.checkpoint": checkpoint, "model.kwargs": {"width": 16},
            "output": output, "calibration.source": str(REPO / "calibration/digits/calib.npz")}
    base.update(overrides)
    return load_build(BUILD_FILE, base)


@pytest.fixture(scope="session")
def int8_bundles(workdir, digits_checkpoint, signing_key) -> dict[str, Any]:
    """target → CompileResult of the INT8 digits bundle.

    ``latency.on_slower: keep_int8``: these tests are about the INT8 artifact; the 8×8 CNN's INT8 and FP32
    run at parity on x86 (per-call overhead), so the latency gate's verdict would flip with machine load.
    """
    from edgekit.build.pipeline import compile_model

    return {t: compile_model(build_config(digits_checkpoint, t, workdir / f"{t}-int8.ekb",
                                          latency={"on_slower": "keep_int8"}), signing_key)
            for t in X86_TARGETS}


@pytest.fixture(scope="session")
def fp32_bundles(workdir, digits_checkpoint, signing_key) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model

    return {t: compile_model(build_config(digits_checkpoint, t, workdir / f"{t}-fp32.ekb",
                                          quantize={"enabled": False}), signing_key)
            for t in X86_TARGETS}


@pytest.fixture(scope="session")
def torch_reference(digits_checkpoint):
    """(x_test, y_test, torch logits) for the held-out test split."""
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build

    model = build(width=16)
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True))
    model.eval()
    x, y = digits.validation()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return x, y, logits


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean() * 100)
