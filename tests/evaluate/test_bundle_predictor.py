"""BundlePredictor on a signed FP32 digits bundle agrees with TorchPredictor on the same raw images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


class DigitsNorm:
    """The digits model's normalization, as a Normalizer would apply it: (raw / 255 - mean) / std on axis 1."""

    def apply(self, raw):
        from edgekit.data.digits import MEAN, STD

        return ((raw.astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)


@pytest.mark.onnxruntime
def test_bundle_predictor_matches_torch_on_raw_images(workdir, digits_checkpoint, signing_key, keys, tmp_path):
    import torch

    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.data import digits
    from edgekit.evaluate import BundlePredictor, TorchPredictor, evaluate
    from edgekit.models.digits_cnn import build

    torch.set_num_threads(1)
    cfg = load_build(REPO / "examples" / "digits.yaml", {
        "target": "onnxruntime-cpu", "model.checkpoint": digits_checkpoint, "model.kwargs": {"width": 16},
        "output": tmp_path / "fp32.ekb", "calibration.source": str(REPO / "calibration/digits/calib.npz"),
        "quantize": {"enabled": False}})
    bundle = compile_model(cfg, signing_key).bundle
    model = build(width=16)
    model.load_state_dict(torch.load(digits_checkpoint, weights_only=True))
    test = digits.splits()["test"]
    raw = test.images[:, None, :, :]  # (N, 1, 8, 8) uint8, as the trainer's image data is
    with BundlePredictor(bundle, keyring=keys["public"]) as bp:
        assert bp.name == "fp32 (onnxruntime)"
        tp = TorchPredictor(model, DigitsNorm(), batch_size=64)
        a, b = tp.predict(raw), bp.predict(raw)
        assert a.shape == b.shape == (len(raw), 10)
        assert np.abs(a - b).max() < 1e-3
        ev = evaluate([tp, bp], raw, test.labels, task="classification", kind="image", out_dir=tmp_path / "ev",
                      robustness=False)
    assert ev["metrics"]["fp32 (torch)"]["accuracy"] == ev["metrics"][bp.name]["accuracy"] > 90
