"""The committed golden bundles (v1.0, v1.1, v1.3, v1.4) must load and run on every later runtime.

``tests/golden/v<version>-onnxruntime-<model>.ekb`` were written once each by
``tests/golden/make_golden.py`` and are never regenerated (their private keys are
gone). If this test fails, the runtime broke compatibility with bundles that are
already on devices: fix the runtime, do not replace the golden files.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime import open_bundle
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.keyring import Keyring, key_id_of, load_public_key

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BUNDLE = GOLDEN / "v1.0-onnxruntime-matmul.ekb"
PUBLIC_KEY = GOLDEN / "golden.pub"

# The model, restated independently of make_golden.py: y = flatten(x) @ W + b.
W = np.array([[-0.750, -0.625, -0.500],
              [-0.375, -0.250, -0.125],
              [0.000, 0.125, 0.250],
              [0.375, 0.500, 0.625]], dtype=np.float64)
B = np.array([0.5, -0.25, 0.125], dtype=np.float64)


def reference(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 4).astype(np.float64) @ W + B


def test_golden_files_are_small_and_present():
    assert BUNDLE.stat().st_size < 50_000
    assert PUBLIC_KEY.stat().st_size < 1_000
    assert not list(GOLDEN.glob("*.key")), "the golden private key must never be committed"


def test_golden_bundle_verifies_with_committed_key():
    vb = open_bundle(BUNDLE, Keyring.from_paths(PUBLIC_KEY))
    assert vb.key_id == key_id_of(load_public_key(PUBLIC_KEY))
    m = vb.manifest_json
    assert (m["format"], m["format_version"]) == ("edgekit-bundle", "1.0")
    assert set(vb.members) == {"model.onnx", "labels.txt", "health/input.npy", "health/expected_output.npy"}
    with zipfile.ZipFile(BUNDLE) as zf:
        assert sorted(zf.namelist()) == sorted([*vb.members, "manifest.json", "signature.json"])
    for name, data in vb.members.items():
        assert m["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    bundle_spec.validate_manifest(m)  # the current spec still accepts a 1.0 manifest


def test_golden_bundle_runs_and_matches_numpy(tmp_path):
    with edgekit_runtime.load(BUNDLE, keyring=PUBLIC_KEY, workdir=tmp_path / "w") as model:
        health = model.health_check()
        assert health["ok"] is True and health["checked"] is True and health["max_abs_diff"] == 0.0

        sample = np.array([[[[0.25, 0.5], [0.75, 1.0]]]], dtype=np.float32)
        np.testing.assert_allclose(model.run(sample)["y"], reference(sample), rtol=0, atol=1e-6)
        # flatten(x) @ W = [[0, 0.3125, 0.625]], plus b: worked out by hand
        np.testing.assert_allclose(model.run(sample)["y"], [[0.5, 0.0625, 0.75]], rtol=0, atol=1e-6)

        batch = np.random.default_rng(0).uniform(-2, 2, size=(5, 1, 2, 2)).astype(np.float32)
        np.testing.assert_allclose(model.run(batch)["y"], reference(batch), rtol=1e-6, atol=1e-6)

        # images in, labelled top-k out: gray 2x2, scaled by 1/256, softmax
        image = np.array([[255, 0], [0, 255]], dtype=np.uint8)
        logits = reference(image.astype(np.float64)[None, None] / 256)[0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        (result,) = model.predict(image)
        assert [t["label"] for t in result["top_k"]] == [["zero", "one", "two"][i] for i in np.argsort(-probs)]
        np.testing.assert_allclose([t["score"] for t in result["top_k"]], np.sort(probs)[::-1], rtol=1e-5)


def test_golden_bundle_refused_without_its_key(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(edgekit_runtime.BundleError) as info:
        edgekit_runtime.load(BUNDLE, keyring=Keyring({key_id_of(other): other}), workdir=tmp_path / "w")
    assert info.value.code == edgekit_runtime.ErrorCode.BUNDLE_UNTRUSTED_KEY
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- v1.1
BUNDLE_1_1 = GOLDEN / "v1.1-onnxruntime-matmul.ekb"
PUBLIC_KEY_1_1 = GOLDEN / "v1.1-golden.pub"


def test_golden_1_1_bundle_verifies_and_carries_the_1_1_sections():
    vb = open_bundle(BUNDLE_1_1, Keyring.from_paths(PUBLIC_KEY_1_1))
    m = vb.manifest
    assert (m.format, m.format_version) == ("edgekit-bundle", "1.1")
    assert m.metrics.fidelity.cosine == 1.0 and m.metrics.fidelity.samples == 4
    assert m.metrics.accuracy.direction == "higher" and m.metrics.accuracy.checked is False
    assert m.metrics.latency_ms.gated is False and "no INT8" in m.metrics.latency_ms.not_gated_reason
    assert m.metrics.latency_ms.figures["fp32"].count == 300
    assert [(g.name, g.status) for g in m.metrics.gates] == [
        ("accuracy", "not_checked"), ("fidelity.cosine", "passed"), ("latency.budget", "passed")]
    assert [s.name for s in m.metrics.stages] == ["export", "package"]
    assert m.inputs[0].layout == m.preprocess.layout == "NCHW"
    # written without preprocess.scale: the device takes the format's default
    assert "scale" not in vb.manifest_json["preprocess"] and m.preprocess.scale == 1 / 255
    assert sum(m.input_stats["x"].histogram.counts) == 64


def test_golden_1_1_bundle_runs_with_the_default_scale(tmp_path):
    with edgekit_runtime.load(BUNDLE_1_1, keyring=PUBLIC_KEY_1_1, workdir=tmp_path / "w") as model:
        health = model.health_check()
        assert health["ok"] is True and health["max_abs_diff"] == 0.0
        # image [[0, 255], [255, 0]] → x/255 → (x - 0.25) / 0.5 = [[-0.5, 1.5], [1.5, -0.5]]
        image = np.array([[0, 255], [255, 0]], dtype=np.uint8)
        x = model.preprocess([image])
        np.testing.assert_allclose(x, [[[[-0.5, 1.5], [1.5, -0.5]]]], atol=1e-6)
        logits = reference(np.array([[[[-0.5, 1.5], [1.5, -0.5]]]]))[0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        (result,) = model.predict(image)
        assert len(result["top_k"]) == 2  # postprocess.top_k
        assert [t["label"] for t in result["top_k"]] == [["zero", "one", "two"][i] for i in np.argsort(-probs)[:2]]
        np.testing.assert_allclose([t["score"] for t in result["top_k"]], np.sort(probs)[::-1][:2], rtol=1e-5)


def test_golden_1_1_bundle_gives_the_agent_a_drift_reference():
    from edgekit_runtime.agent import DriftMonitor

    m = open_bundle(BUNDLE_1_1, Keyring.from_paths(PUBLIC_KEY_1_1)).manifest
    mon = DriftMonitor(m.input_stats, [t.name for t in m.inputs], min_values=1)
    mon.add(np.full((1, 1, 2, 2), 0.5, np.float32))
    report, _ = mon.evaluate()
    assert report["available"] and report["inputs"]["x"]["judged"]


# ----------------------------------------------------------------------------- v1.3
BUNDLE_1_3 = GOLDEN / "v1.3-onnxruntime-matmul.ekb"
PUBLIC_KEY_1_3 = GOLDEN / "v1.3-golden.pub"


def test_golden_1_3_bundle_carries_its_compression_record_and_runs(tmp_path):
    vb = open_bundle(BUNDLE_1_3, Keyring.from_paths(PUBLIC_KEY_1_3))
    m = vb.manifest
    assert m.format_version == "1.3"
    opt = m.metrics.optimize
    assert [p.kind for p in opt.passes] == ["prune", "distill"] and opt.macs_reduction == 3.84
    prune, distill = opt.passes
    assert prune.settings == {"ratio": 0.5, "iterations": 2, "round_to": 16}
    assert (prune.macs_before, prune.macs_after, prune.int8_p50_ms_after) == (48000, 12500, 0.125)
    assert distill.macs_before is None and distill.metric_after == 97.75
    with edgekit_runtime.load(BUNDLE_1_3, keyring=PUBLIC_KEY_1_3, workdir=tmp_path / "w") as model:
        assert model.health_check()["ok"] is True


def test_older_bundles_have_no_compression_record():
    for bundle, key in ((BUNDLE, PUBLIC_KEY), (BUNDLE_1_1, PUBLIC_KEY_1_1)):
        assert open_bundle(bundle, Keyring.from_paths(key)).manifest.metrics.optimize is None


# ----------------------------------------------------------------------------- v1.4
BUNDLE_1_4 = GOLDEN / "v1.4-onnxruntime-detector.ekb"
PUBLIC_KEY_1_4 = GOLDEN / "v1.4-golden.pub"


def test_golden_1_4_detector_finds_the_boxes_worked_out_by_hand(tmp_path):
    """Its output is a constant table: a stride-16 point at (24, 24) with distances 0.5 stride → [16, 16, 32, 32]
    (class "b", logit 5) and a stride-8 point at (12, 12) with distances 1 stride → [4, 4, 20, 20] (class "a",
    logit 2), in the 32×32 network input. A 64×48 photo is letterboxed at scale 0.5 (32×24) with 4 rows of padding
    above, so the boxes on the photo are [32, 24, 64, 56→48] and [8, 0, 40, 32]."""
    vb = open_bundle(BUNDLE_1_4, Keyring.from_paths(PUBLIC_KEY_1_4))
    m = vb.manifest
    assert m.format_version == "1.4" and m.preprocess.resize == "letterbox"
    assert (m.postprocess.type, m.postprocess.strides, m.postprocess.max_detections) == ("detection", [8, 16, 32], 10)
    photo = np.full((48, 64, 3), 200, dtype=np.uint8)
    with edgekit_runtime.load(BUNDLE_1_4, keyring=PUBLIC_KEY_1_4, workdir=tmp_path / "w") as model:
        assert model.health_check()["ok"] is True
        result = model.predict([photo])[0]
    assert result["image_size"] == [64, 48]
    found = [(d["label"], d["class"], d["box"], d["score"]) for d in result["detections"]]
    assert [f[:2] for f in found] == [("b", 1), ("a", 0)]  # best first
    np.testing.assert_allclose(found[0][2], [32, 24, 64, 48], atol=1e-4)
    np.testing.assert_allclose(found[1][2], [8, 0, 40, 32], atol=1e-4)
    assert found[0][3] == pytest.approx(1 / (1 + np.exp(-5.0)), abs=1e-5)
    assert found[1][3] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-5)
