"""edgekit train --task detection|segmentation end to end on generated scenes, and the run compiled into a bundle
whose device post-processing gives the host evaluator's boxes.

Tiny data (96×96 scenes, 16 training images) keeps it fast; the figures that matter (mAP50 ≥ 0.9, INT8 within
1 point) come from ``benchmarks/detection.py`` on a real-sized set.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ExitCode

runner = CliRunner()


def cli(*args) -> tuple[int, dict]:
    result = runner.invoke(app, [*map(str, args), "--json"])
    return result.exit_code, json.loads(result.stdout)


def scenes(root: Path, task: str, val_is_train: bool = False) -> Path:
    from edgekit.data.scenes import write_dataset

    write_dataset(root, task, "coco", {"train": 16, "val": 8, "test": 8}, size=96, seed=3, max_objects=2)
    if val_is_train:
        # validation = 12 of the training images: a model that has seen them scores well after a few epochs (not
        # all 16, which the build would refuse as identical to its calibration set)
        shutil.rmtree(root / "val")
        (root / "val" / "images").mkdir(parents=True)
        doc = json.loads((root / "train" / "annotations.json").read_text())
        doc["images"] = doc["images"][:12]
        ids = {im["id"] for im in doc["images"]}
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
        for im in doc["images"]:
            shutil.copy(root / "train" / "images" / im["file_name"], root / "val" / "images")
        (root / "val" / "annotations.json").write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def det_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det")
    data = scenes(root / "data", "detection", val_is_train=True)
    code, doc = cli("train", "--task", "detection", "--data", data, "--out", root / "run", "--epochs", "30",
                    "--batch-size", "8", "--lr", "0.005", "--set", "augment.enabled=false")
    assert code == ExitCode.OK, doc
    return root / "run"


def test_detection_run_writes_coco_metrics_a_report_and_a_model_that_knows_its_postprocessing(det_run):
    from edgekit.train.models import read_checkpoint

    m = json.loads((det_run / "metrics.json").read_text())
    assert m["task"] == "detection" and m["evaluated_on"] == "test" and m["monitor"] == "map50"
    assert 0.0 <= m["test"]["map"] <= m["test"]["map50"] <= 1.0
    assert set(m["test"]["per_class_ap50"]) == {"circle", "square", "triangle", "star"}
    assert m["val"]["map50"] > 0.3  # validation = training images: the model has learnt them
    assert [r["epoch"] for r in m["history"]] == list(range(1, m["epochs_run"] + 1))
    report = (det_run / "report.md").read_text()
    assert "| class | AP50 | AP |" in report and "pr_curves.png" in report
    assert (det_run / "pr_curves.png").stat().st_size > 1000 and (det_run / "predictions.png").is_file()
    meta = {k: v for k, v in read_checkpoint(det_run / "model.pt").items() if k != "model"}
    assert meta["postprocess"]["type"] == "detection" and meta["postprocess"]["strides"] == [8, 16, 32]
    assert meta["preprocess"]["resize"] == "letterbox" and meta["preprocess"]["size"] == [96, 96]
    assert meta["labels"] == ["circle", "square", "triangle", "star"]


def test_detection_bundle_on_the_device_gives_the_host_evaluators_boxes(det_run, tmp_path, keys):
    """An FP32 bundle (ONNX Runtime) run by the device CLI on the original photos gives, box for box, what the
    host evaluator got from the torch model through the same runtime post-processing."""
    import edgekit_runtime
    from edgekit.train.dense import device_predictions
    from edgekit.train.dense_data import run_prepared
    from edgekit.train.models import load_trained

    bundle = tmp_path / "det.ekb"
    code, doc = cli("compile", det_run, "--target", "onnxruntime-cpu", "--no-quantize", "--key", keys["private"],
                    "--output", bundle)
    assert code == ExitCode.OK, doc
    with edgekit_runtime.load(bundle, keyring=keys["public"]) as model:
        assert model.manifest.postprocess.type == "detection" and model.manifest.preprocess.resize == "letterbox"
    p = run_prepared(det_run)
    photos = [r.image for r in p.records["test"][:4]]
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "run", str(bundle), *map(str, photos),
                           "--keyring", str(keys["public"]), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    device = json.loads(proc.stdout)
    host = device_predictions(load_trained(det_run / "model.pt"), p, "test", model_manifest_post(bundle, keys))[:4]
    assert any(r["detections"] for r in device)
    for d, h, photo in zip(device, host, photos):
        assert d["image_size"] == h["image_size"] == list(_size(photo))
        assert [x["label"] for x in d["detections"]] == [x["label"] for x in h["detections"]]
        for a, b in zip(d["detections"], h["detections"]):
            assert np.allclose(a["box"], b["box"], atol=1e-2) and abs(a["score"] - b["score"]) < 1e-4
            assert 0 <= a["box"][0] < a["box"][2] <= d["image_size"][0]
    # edgekit bench on photos: pre-processing, inference and post-processing timed apart
    result = runner.invoke(app, ["bench", str(bundle), "--images", str(photos[0].parent), "--keyring",
                                 str(keys["public"]), "--queries", "20", "--seconds", "0.2", "--batch", "0",
                                 "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "p50 per stage: preprocess" in result.output and "postprocess" in result.output


def model_manifest_post(bundle: Path, keys) -> dict:
    import edgekit_runtime

    with edgekit_runtime.load(bundle, keyring=keys["public"]) as model:
        return model.manifest_json["postprocess"]


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_detection_run_compiles_int8_gated_on_map50_through_the_device_engine(det_run, tmp_path, keys):
    code, doc = cli("compile", det_run, "--target", "onnxruntime-cpu", "--key", keys["private"], "--output",
                    tmp_path / "det-int8.ekb", "--max-accuracy-drop", "100")
    assert code == ExitCode.OK, doc
    rep = json.loads((tmp_path / "det-int8.report.json").read_text())
    gate = next(g for g in rep["gates"] if g["name"] == "accuracy")
    assert gate["status"] == "passed" and "map50" in gate["detail"]
    assert rep["accuracy"]["fp32"] > 30  # points of mAP50 on the validation split, through ONNX Runtime


def test_segmentation_run_reports_miou_and_dice_and_compiles(tmp_path, keys):
    data = scenes(tmp_path / "data", "segmentation")
    code, doc = cli("train", "--task", "segmentation", "--data", data, "--out", tmp_path / "run", "--epochs", "10",
                    "--batch-size", "4", "--lr", "0.01", "--set", "model.kwargs={width: 8, depth: 2}")
    assert code == ExitCode.OK, doc
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["task"] == "segmentation" and m["monitor"] == "miou"
    assert 0.0 <= m["test"]["miou"] <= 1.0 and "background" in m["test"]["per_class_iou"]
    assert m["test"]["per_class_iou"]["background"] > 0.5  # 40 steps: the background at least is learnt
    assert (tmp_path / "run" / "overlays.png").is_file()
    # a segmentation bundle compiles (INT8, gated on mIoU) and edgekit eval puts it beside the torch model. The
    # profile keeps INT8 when it is not faster: this 8-channel U-Net runs INT8 and FP32 at parity, and on a busy
    # host the latency gate would ship FP32, which is not what this test is about
    import yaml
    from edgekit.config.targets import load_target

    profile = load_target("onnxruntime-cpu").model_dump(mode="json")
    profile["latency"]["on_slower"] = "keep_int8"
    (tmp_path / "ort.yaml").write_text(yaml.safe_dump(profile))
    code, doc = cli("compile", tmp_path / "run", "--target", tmp_path / "ort.yaml", "--key", keys["private"],
                    "--output", tmp_path / "seg.ekb", "--max-accuracy-drop", "100")
    assert code == ExitCode.OK, doc
    gate = next(g for g in json.loads((tmp_path / "seg.report.json").read_text())["gates"] if g["name"] == "accuracy")
    assert gate["status"] == "passed" and "miou" in gate["detail"]
    code, doc = cli("eval", tmp_path / "run", "--compare", tmp_path / "seg.ekb", "--data", data / "test", "--out",
                    tmp_path / "eval", "--keyring", keys["public"])
    assert code == ExitCode.OK, doc
    scores = doc["evaluation"]["predictors"]
    assert list(scores) == ["fp32 (torch)", "int8 (onnxruntime)"] and doc["samples"] == 8
    assert scores["fp32 (torch)"]["miou"] == pytest.approx(m["test"]["miou"], abs=1e-9)
    assert (tmp_path / "eval" / "overlays.png").stat().st_size > 1000


def test_dense_settings_that_do_not_apply_are_refused(tmp_path):
    data = scenes(tmp_path / "data", "detection")
    code, doc = cli("train", "--task", "detection", "--data", data, "--out", tmp_path / "run", "--epochs", "1",
                    "--set", "augment.mixup=0.2")
    assert code == ExitCode.USAGE and "augment.mixup" in doc["error"]["message"]
    code, doc = cli("train", "--task", "detection", "--data", data, "--out", tmp_path / "run2", "--epochs", "1",
                    "--arch", "resnet_small")
    assert code == ExitCode.USAGE and "not made for detection" in doc["error"]["message"]


@pytest.mark.parametrize("shape", [(120, 200), (200, 90), (64, 64), (30, 50)])
def test_training_letterbox_is_the_devices_pixel_for_pixel(shape):
    """The trainer sees exactly the input the device will give the model: same geometry, interpolation, fill."""
    from edgekit.train.dense_data import letterbox_image
    from edgekit_runtime.processing import preprocess_image

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    spec = {"type": "image", "color": "rgb", "size": [96, 96], "resize": "letterbox", "interpolation": "linear",
            "scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "layout": "NCHW"}
    meta: list = []
    device = preprocess_image(photo, spec, meta)
    host, box = letterbox_image(photo, (96, 96))
    np.testing.assert_array_equal(host.transpose(2, 0, 1).astype(np.float32), device)
    assert (box.scale, box.pad_x, box.pad_y) == (meta[0].scale_x, meta[0].pad_x, meta[0].pad_y)


def test_an_onnx_detector_from_another_tool_compiles_with_the_postprocessing_its_build_file_declares(
        det_run, tmp_path, keys):
    """A plain ONNX detector (no edgekit metadata: raw head output [B, A, 4+C], YOLO-style names) compiles from a
    build file that declares its letterbox preprocessing and detection post-processing, gated on mAP50 of a COCO
    validation folder, and its bundle gives the same boxes on the device as the run-folder bundle of the same
    weights."""
    import torch
    import yaml

    import edgekit_runtime
    from edgekit.train.models import load_trained, read_checkpoint

    meta = {k: v for k, v in read_checkpoint(det_run / "model.pt").items() if k != "model"}
    model = load_trained(det_run / "model.pt").eval()
    onnx_path = tmp_path / "third_party_det.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 96, 96),), str(onnx_path), input_names=["images"],
                      output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                      opset_version=17, dynamo=False)
    data = Path(yaml.safe_load((det_run / "train.yaml").read_text())["data"]["path"])
    build = {"model": {"source": str(onnx_path), "name": "third-party-det", "labels": meta["labels"],
                       "input_name": "images", "output_name": "output0"},
             "target": "onnxruntime-cpu", "calibration": {"source": str(data / "train")},
             "validation": {"source": str(data / "val")}, "preprocess": meta["preprocess"],
             "postprocess": {"type": "detection", "strides": [8, 16, 32], "score_threshold": 0.25,
                             "iou_threshold": 0.5, "max_detections": 100},
             "accuracy": {"metric": "map50", "max_accuracy_drop": 100}, "output": str(tmp_path / "imported.ekb")}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(build))
    code, doc = cli("compile", tmp_path / "build.yaml", "--key", keys["private"])
    assert code == ExitCode.OK, doc
    rep = json.loads((tmp_path / "imported.report.json").read_text())
    gate = next(g for g in rep["gates"] if g["name"] == "accuracy")
    assert gate["status"] == "passed" and "map50" in gate["detail"]
    assert rep["accuracy"]["fp32"] > 30  # the val images are training images: a model that has seen them scores
    # the same weights through the run folder: the same validation images and boxes give the same FP32 mAP50
    code, doc = cli("compile", det_run, "--target", "onnxruntime-cpu", "--key", keys["private"], "--output",
                    tmp_path / "run-int8.ekb", "--max-accuracy-drop", "100")
    assert code == ExitCode.OK, doc
    native_rep = json.loads((tmp_path / "run-int8.report.json").read_text())
    assert rep["accuracy"]["fp32"] == pytest.approx(native_rep["accuracy"]["fp32"], abs=0.05)
    # FP32 bundles of both: the declared post-processing is the run's, box for box on the device
    imported = _same_boxes_as_the_run(det_run, tmp_path / "build.yaml", tmp_path, keys, data)
    with edgekit_runtime.load(imported, keyring=keys["public"]) as m:
        assert m.manifest.postprocess.type == "detection" and m.manifest.preprocess.resize == "letterbox"
    # edgekit eval: the run's torch model and both INT8 bundles side by side on the test split, as the device answers
    code, doc = cli("eval", det_run, "--compare", tmp_path / "run-int8.ekb", "--compare", tmp_path / "imported.ekb",
                    "--out", tmp_path / "eval", "--keyring", keys["public"])
    assert code == ExitCode.OK, doc
    scores = doc["evaluation"]["predictors"]
    assert list(scores)[0] == "fp32 (torch)" and len(scores) == 3 and doc["task"] == "detection"
    metrics = json.loads((det_run / "metrics.json").read_text())
    assert scores["fp32 (torch)"]["map50"] == pytest.approx(metrics["test"]["map50"], abs=1e-6)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| class | AP50 fp32 (torch)" in report
    for png in ("pr_curves.png", "predictions.png", "confusion_0.png", "confusion_2.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 1000


def _end_to_end_onnx(det_run: Path, path: Path, size: int = 96, keep: int = 50) -> Path:
    """The run's detector exported as YOLO end-to-end exports are: decode and class-aware NMS inside the graph
    (ONNX NonMaxSuppression), one output [1, keep, 6] of rows x0, y0, x1, y1, score, class, padded with zeros."""
    import torch
    import torchvision

    from edgekit.train.dense_losses import anchor_points, decode
    from edgekit.train.models import load_trained

    class EndToEnd(torch.nn.Module):
        def __init__(self, det):
            super().__init__()
            self.det = det
            points, strides = anchor_points(size, size, [8, 16, 32])
            self.register_buffer("points", points)
            self.register_buffer("strides", strides)

        def forward(self, x):
            boxes, scores = decode(self.det(x)[0], self.points, self.strides)
            score, cls = scores.max(-1)
            kept = torchvision.ops.batched_nms(boxes, score, cls, 0.5)[:keep]
            rows = torch.cat([boxes[kept], score[kept, None], cls[kept, None].float()], 1)
            return torch.cat([rows, torch.zeros(keep, 6)], 0)[:keep][None]

    model = EndToEnd(load_trained(det_run / "model.pt").eval()).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["images"],
                      output_names=["output0"], opset_version=17, dynamo=False)
    return path


def test_an_onnx_detector_with_nms_inside_compiles_gated_on_map50_and_gives_the_runs_boxes(det_run, tmp_path, keys):
    import onnx
    import yaml

    from edgekit.train.models import read_checkpoint

    onnx_path = _end_to_end_onnx(det_run, tmp_path / "e2e.onnx")
    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    meta = {k: v for k, v in read_checkpoint(det_run / "model.pt").items() if k != "model"}
    data = Path(yaml.safe_load((det_run / "train.yaml").read_text())["data"]["path"])
    build = {"model": {"source": str(onnx_path), "name": "e2e-det", "labels": meta["labels"],
                       "input_name": "images", "output_name": "output0"},
             "target": "onnxruntime-cpu", "calibration": {"source": str(data / "train")},
             "validation": {"source": str(data / "val")}, "preprocess": meta["preprocess"],
             "postprocess": {"type": "detections", "score_threshold": 0.25, "max_detections": 100},
             "accuracy": {"metric": "map50", "max_accuracy_drop": 100}, "output": str(tmp_path / "e2e.ekb")}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(build))
    code, doc = cli("compile", tmp_path / "build.yaml", "--key", keys["private"])
    assert code == ExitCode.OK, doc
    rep = json.loads((tmp_path / "e2e.report.json").read_text())
    gates = {g["name"]: g for g in rep["gates"]}
    assert gates["accuracy"]["status"] == "passed" and "map50" in gates["accuracy"]["detail"]
    assert gates["fidelity.cosine"]["status"] == "not_checked" and "own NMS" in gates["fidelity.cosine"]["detail"]
    assert rep["accuracy"]["fp32"] > 30
    # decode and NMS stay float: everything after the last Conv (NonMaxSuppression among them) is excluded
    ptq = rep["accuracy"]["attempts"][0]
    assert "after the last weight layer" in ptq["kept_in_float"]
    from edgekit.build.stages.quantize import float_tail
    tail = float_tail(onnx_path)
    nms = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "NonMaxSuppression"]
    assert set(nms) <= set(tail) and not any(n.op_type == "Conv" and n.name in tail
                                               for n in onnx.load(str(onnx_path)).graph.node)
    # without labelled data its INT8 is refused before any work: a cosine between NMS rows means nothing
    del build["validation"]
    (tmp_path / "nolabels.yaml").write_text(yaml.safe_dump(build))
    code, doc = cli("compile", tmp_path / "nolabels.yaml", "--key", keys["private"])
    assert code == ExitCode.USAGE and "NMS inside" in doc["error"]["message"]
    # FP32: the device gives, box for box, what the run-folder bundle's own decode and NMS give
    _same_boxes_as_the_run(det_run, tmp_path / "build.yaml", tmp_path, keys, data)


def _same_boxes_as_the_run(det_run: Path, build_file: Path, tmp_path: Path, keys, data: Path) -> Path:
    """FP32 bundles of ``build_file`` and of the run folder, both run by the device CLI on four test photos:
    the same labels, boxes and scores, box for box. Returns the build file's bundle."""
    ours, native = tmp_path / f"{build_file.stem}-fp32.ekb", tmp_path / "run-fp32.ekb"
    code, doc = cli("compile", build_file, "--key", keys["private"], "--no-quantize", "--output", ours)
    assert code == ExitCode.OK, doc
    if not native.is_file():
        code, doc = cli("compile", det_run, "--target", "onnxruntime-cpu", "--no-quantize", "--key", keys["private"],
                        "--output", native)
        assert code == ExitCode.OK, doc
    photos = sorted((data / "test" / "images").iterdir())[:4]
    proc = [subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "run", str(b), *map(str, photos),
                            "--keyring", str(keys["public"]), "--json"], capture_output=True, text=True, timeout=120)
            for b in (ours, native)]
    assert all(p.returncode == 0 for p in proc), [p.stderr for p in proc]
    got, want = (json.loads(p.stdout) for p in proc)
    assert any(r["detections"] for r in want)
    for a, b in zip(got, want):
        assert a["image_size"] == b["image_size"]
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        for x, y in zip(a["detections"], b["detections"]):
            assert np.allclose(x["box"], y["box"], atol=1e-2) and abs(x["score"] - y["score"]) < 1e-4
    return ours
