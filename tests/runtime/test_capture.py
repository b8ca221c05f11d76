"""Sample capture: off by default, unsure inputs preferred, rate-limited, bounded on disk, and wired into serve."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime.capture import CaptureSettings, SampleCapture, confidence_of
from edgekit_runtime.keyring import Keyring

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"
MODEL = {"name": "cls", "version": "1.0.0", "release": 1}


def cls_result(score: float, label: str = "cat") -> dict:
    return {"top_k": [{"index": 0, "label": label, "score": score}, {"index": 1, "label": "dog", "score": 1 - score}]}


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def samples(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/*.json"))]


def test_unsure_inputs_are_kept_sure_ones_only_by_the_random_draw(tmp_path):
    cap = SampleCapture(CaptureSettings(tmp_path, sample_rate=0.0, low_confidence=0.6, max_per_minute=1000), seed=0)
    assert cap.offer(image(), cls_result(0.95), MODEL) is None  # sure, and no random draw
    side = cap.offer(image(1), cls_result(0.4), MODEL)
    assert side is not None
    doc = json.loads(side.read_text())
    assert doc["reason"] == "low_confidence" and doc["confidence"] == 0.4 and doc["model"] == MODEL
    assert doc["result"]["top_k"][0]["label"] == "cat"
    import cv2

    img = cv2.imread(str(side.with_name(doc["image"])))
    assert img.shape == (24, 32, 3)  # the input, as a JPEG beside its sidecar
    every = SampleCapture(CaptureSettings(tmp_path / "all", sample_rate=1.0, low_confidence=None,
                                          max_per_minute=1000))
    assert every.offer(image(), cls_result(0.99), MODEL) is not None
    assert samples(tmp_path / "all")[0]["reason"] == "random"
    half = SampleCapture(CaptureSettings(tmp_path / "half", sample_rate=0.5, low_confidence=None,
                                         max_per_minute=1e6, max_files=10_000), seed=1)
    kept = sum(half.offer(image(), cls_result(0.99), MODEL) is not None for _ in range(400))
    assert 150 < kept < 250


def test_the_rate_limit_holds_back_a_burst(tmp_path):
    cap = SampleCapture(CaptureSettings(tmp_path, sample_rate=1.0, max_per_minute=5))
    kept = sum(cap.offer(image(), cls_result(0.1), MODEL) is not None for _ in range(50))
    assert kept == 5 and cap.stats()["skipped_rate_limit"] == 45


def test_the_folder_stays_within_its_bounds_dropping_random_samples_first(tmp_path):
    cap = SampleCapture(CaptureSettings(tmp_path, sample_rate=1.0, low_confidence=0.5, max_per_minute=1e6,
                                        max_files=4), seed=0)
    for i in range(3):
        cap.offer(image(i), cls_result(0.2), MODEL)  # unsure: kept
    for i in range(5):
        cap.offer(image(10 + i), cls_result(0.9), MODEL)  # sure: random draws
    docs = samples(tmp_path)
    assert len(docs) == 4 and [d["reason"] for d in docs].count("low_confidence") == 3
    assert len(list(tmp_path.glob("*/*.jpg"))) == 4  # no orphan images
    # a restart counts what is on disk
    again = SampleCapture(CaptureSettings(tmp_path, sample_rate=1.0, max_per_minute=1e6, max_files=4))
    assert again.stats()["on_disk"] == 4
    cap_mb = SampleCapture(CaptureSettings(tmp_path / "mb", sample_rate=1.0, max_per_minute=1e6,
                                           max_mb=0.01))  # ~10 kB
    for i in range(20):
        cap_mb.offer(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8), cls_result(0.9), MODEL)
    assert cap_mb.stats()["bytes"] <= 0.01 * 2**20 and cap_mb.stats()["evicted"] > 0


def test_detections_confidence_and_encoded_bytes_kept_as_sent(tmp_path):
    assert confidence_of({"detections": []}) == 0.0
    assert confidence_of({"detections": [{"score": 0.3}, {"score": 0.7}]}) == 0.7
    assert confidence_of({"classes": {}}) is None
    import cv2

    ok, png = cv2.imencode(".png", image())
    cap = SampleCapture(CaptureSettings(tmp_path, sample_rate=1.0, max_per_minute=1e6))
    side = cap.offer(png.tobytes(), {"detections": [], "image_size": [32, 24]}, MODEL)
    doc = json.loads(side.read_text())
    assert doc["image"].endswith(".png") and side.with_name(doc["image"]).read_bytes() == png.tobytes()


def test_serve_captures_sampled_image_requests_after_answering(tmp_path, serve):
    import cv2

    from edgekit_runtime.capture import CaptureSettings as CS

    ring = Keyring.from_paths(GOLDEN / "v1.4-golden.pub")
    server = serve(GOLDEN / "v1.4-onnxruntime-detector.ekb", keyring=ring,
                   capture=CS(tmp_path / "cap", sample_rate=1.0, max_per_minute=1e6))
    c = serve.Client(server)
    for i in range(3):
        ok, jpg = cv2.imencode(".jpg", image(i))
        assert c.request("POST", "/v2/models/golden-detector/infer", jpg.tobytes(),
                         {"Content-Type": "image/jpeg"})[0] == 200
    deadline = time.monotonic() + 5
    while len(samples(tmp_path / "cap")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    docs = samples(tmp_path / "cap")
    assert len(docs) == 3 and all(d["model"]["name"] == "golden-detector" and d["source"] == "serve" for d in docs)
    assert all("detections" in d["result"] and d["result"]["image_size"] == [32, 24] for d in docs)


def test_capture_is_off_unless_a_folder_is_given():
    from edgekit_runtime.capture import settings_from_args

    assert settings_from_args(None, 1.0, 0.5, 10, 10, 10) is None
    with pytest.raises(Exception, match="sample rate"):
        SampleCapture(CaptureSettings(Path("/tmp/x-never-made"), sample_rate=2.0))


def test_inputs_unlike_the_calibration_set_are_kept_as_drift(tmp_path):
    from types import SimpleNamespace

    from edgekit_runtime.capture import drift_z
    from edgekit_runtime.contract.manifest import InputStats, SampleMean

    model = SimpleNamespace(inputs=[SimpleNamespace(name="x")],
                            manifest=SimpleNamespace(input_stats={"x": InputStats(sample_mean=SampleMean(mean=0.0,
                                                                                                       std=0.1))}))
    x = np.stack([np.full((3, 4, 4), 0.05, np.float32), np.full((3, 4, 4), 0.9, np.float32)])
    z = drift_z(model, x)
    assert z == pytest.approx([0.5, 9.0])
    assert drift_z(SimpleNamespace(inputs=model.inputs, manifest=SimpleNamespace(input_stats={})), x) is None
    cap = SampleCapture(CaptureSettings(tmp_path, sample_rate=0.0, low_confidence=0.5, drift_z=3.0,
                                        max_per_minute=1e6))
    assert cap.offer(image(), cls_result(0.9), MODEL, drift_z=float(z[0])) is None  # familiar and sure
    side = cap.offer(image(), cls_result(0.9), MODEL, drift_z=float(z[1]))
    assert side is not None and json.loads(side.read_text())["reason"] == "drift"
    assert cap.stats()["kept"] == {"low_confidence": 0, "drift": 1, "random": 0}
