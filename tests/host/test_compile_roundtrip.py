"""Round trip per backend: compile → signed bundle → device runtime → outputs close to torch."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import edgekit_runtime
from edgekit.data.sources import tensor_sha256
from edgekit_runtime.contract.manifest import ModelInfo
from edgekit_runtime.keyring import Keyring

from .conftest import REPO, X86_TARGETS, top1

pytestmark = pytest.mark.parametrize("target", X86_TARGETS)


def test_fp32_bundle_matches_torch(target, fp32_bundles, torch_reference, keys):
    x, y, ref = torch_reference
    with edgekit_runtime.load(fp32_bundles[target].bundle, keyring=keys["public"]) as model:
        assert model.manifest.backend.precision == "fp32"
        out = model.run(x)[model.outputs[0].name]
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-3)


def test_int8_bundle_close_to_torch_within_budget(target, int8_bundles, torch_reference, keys):
    x, y, ref = torch_reference
    result = int8_bundles[target]
    with edgekit_runtime.load(result.bundle, keyring=keys["public"]) as model:
        m = model.manifest
        out = model.run(x)[model.outputs[0].name]
        health = model.health_check()
    assert m.backend.precision == "int8"
    assert health["ok"] and health["checked"]
    # Predictions agree with torch on nearly every test image and the logits stay close.
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    assert agreement >= 0.97, agreement
    assert np.abs(out - ref).mean() < 0.2 * np.abs(ref).mean()
    # The accuracy the runtime measures now is the one recorded in the manifest, within the budget.
    acc = m.metrics.accuracy
    assert acc.int8 == pytest.approx(top1(out, y), abs=1e-9)
    assert acc.fp32 == pytest.approx(top1(ref, y), abs=0.3)
    assert acc.fp32 - acc.int8 <= acc.budget_pts == 0.5


def test_manifest_records_what_the_device_needs(target, int8_bundles, keys):
    result = int8_bundles[target]
    vb = edgekit_runtime.open_bundle(result.bundle, Keyring.from_paths(keys["public"]))
    m = vb.manifest
    assert m.target.name == target
    assert m.model == ModelInfo(name="digits-cnn", version="1.0.0", release=m.model.release)
    assert m.inputs[0].shape[1:] == [1, 8, 8] and m.inputs[0].dtype == "float32"
    assert m.inputs[0].layout == m.preprocess.layout == "NCHW"
    assert m.preprocess.color == "gray" and m.preprocess.size == [8, 8]
    assert m.labels == "labels.txt" and vb.members["labels.txt"].decode().split() == [str(i) for i in range(10)]
    # calibration hash is the hash of the tensors actually used: the committed calibration set less
    # the last fifth (60 samples), held back to measure INT8 against FP32 (fidelity)
    committed = np.load(REPO / "calibration/digits/calib.npz")["x"]
    assert m.calibration.count == 240
    assert m.calibration.sha256 == tensor_sha256(committed[:240])
    assert m.calibration.sha256 != json.loads((REPO / "calibration/digits/manifest.json").read_text())["tensor_sha256"]
    fid = m.metrics.fidelity
    assert fid.samples == 60 and 0.99 <= fid.cosine <= 1.0 and fid.top1_agreement > 0.9
    stats = m.input_stats[m.inputs[0].name]
    assert stats.count == 240 and sum(stats.histogram.counts) == 240 * 64
    assert m.backend.version and m.backend.engines
    for prec in ("fp32", "int8"):
        assert m.metrics.latency_ms.figures[prec].p50_ms > 0
    assert m.metrics.size_bytes["int8"] < 0.7 * m.metrics.size_bytes["fp32"]  # IR XML weighs a lot at this size
    if target == "x86-openvino-cpu":
        assert m.backend.options.inference_precision == "f32"
        assert m.metrics.accuracy.fp32_measured_with["inference_precision"] == "f32"
    # the archive holds exactly the listed files plus manifest and signature
    with zipfile.ZipFile(result.bundle) as zf:
        assert set(zf.namelist()) == set(m.files) | {"manifest.json", "signature.json"}


def test_predict_on_image_files(target, int8_bundles, keys, tmp_path):
    import cv2

    from edgekit.data import digits

    test = digits.splits()["test"]
    paths = []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), test.images[i])
        paths.append(p)
    with edgekit_runtime.load(int8_bundles[target].bundle, keyring=keys["public"]) as model:
        preds = model.predict(paths)
        # decoded arrays give the same answer as files
        same = model.predict(test.images[0])
    hits = sum(int(p["top_k"][0]["label"]) == int(lbl) for p, lbl in zip(preds, test.labels[:40]))
    assert hits >= 37
    assert same[0]["top_k"][0]["label"] == preds[0]["top_k"][0]["label"]
    assert abs(sum(t["score"] for t in preds[0]["top_k"]) - 1.0) < 0.2  # top-3 of a softmax
