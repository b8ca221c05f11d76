"""Quantization-aware training in the quantize stage: when it runs (quantize.qat auto|on|off), what it needs,
and, on a trained run with activation outliers that post-training INT8 breaks, that the QAT artifact each
backend exports meets the budget PTQ missed — measured on the exported artifact through the device engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit.build.pipeline import compile_model
from edgekit.errors import AccuracyBudgetError, ConfigError

REPO = Path(__file__).resolve().parents[2]
# Outlier scales tried, smallest first: the test compiles at the first one where PTQ misses the 1-point budget.
# The trained run differs between CPUs (float rounding in training), and so does the scale where PTQ breaks: on an
# Intel Xeon (AMX) run ORT and TFLite PTQ lost 1.4-6 points at x200, OpenVINO's NNCF PTQ met the budget up to x200;
# on an AMD EPYC run OpenVINO and TensorRT PTQ already missed it at x30, ORT at x60, TFLite at x60 (and ORT lost
# 15.6 points at x200, where 2 epochs of QAT no longer recover it). A fixed scale tested one CPU's run.
SCALES = (30.0, 60.0, 100.0, 150.0, 200.0, 300.0)
BUDGET_PTS = 1.0


def digits_config(checkpoint: Path, target: str, output: Path, **overrides: Any):
    """The digits CNN (a factory + state dict, no training run): what QAT cannot fine-tune."""
    from edgekit.config import load_build

    base = {"target": target, "model.checkpoint": checkpoint, "model.kwargs": {"width": 16}, "output": output,
            "calibration.source": str(REPO / "calibration/digits/calib.npz")}
    base.update(overrides)
    return load_build(REPO / "examples" / "digits.yaml", base)


@pytest.fixture(scope="module")
def blank_calibration(tmp_path_factory) -> Path:
    """Calibration on blank frames: every activation range collapses and PTQ misses the budget."""
    from edgekit.data import digits

    path = tmp_path_factory.mktemp("calib") / "blank.npz"
    np.savez(path, x=digits.to_tensor(np.zeros((50, 8, 8), dtype=np.uint8)))
    return path


# ----------------------------------------------------------------------------------------- the decision
def test_auto_leaves_a_passing_ptq_alone(tmp_path, digits_checkpoint, signing_key):
    result = compile_model(digits_config(digits_checkpoint, "onnxruntime-cpu", tmp_path / "ok.ekb"), signing_key)
    acc = result.report["accuracy"]
    assert [a["strategy"] for a in acc["attempts"]] == ["ptq"] and acc["attempts"][0]["passed"]
    assert "qat" not in result.report  # nothing tried, nothing recorded: the build is what it was before QAT


def test_on_without_a_training_run_is_refused(tmp_path, digits_checkpoint, signing_key):
    cfg = digits_config(digits_checkpoint, "onnxruntime-cpu", tmp_path / "x.ekb", quantize={"qat": "on"})
    with pytest.raises(ConfigError, match="Compile the run folder"):
        compile_model(cfg, signing_key)
    assert not (tmp_path / "x.ekb").exists()


def test_auto_without_a_training_run_records_why_and_falls_back(tmp_path, digits_checkpoint, signing_key,
                                                                blank_calibration):
    out = tmp_path / "never.ekb"
    cfg = digits_config(digits_checkpoint, "onnxruntime-cpu", out, **{"calibration.source": str(blank_calibration)},
                        quantize={"max_excluded_nodes": 1})
    with pytest.raises(AccuracyBudgetError):
        compile_model(cfg, signing_key)
    report = json.loads(out.with_suffix(".report.json").read_text())
    qat = report["qat"]
    assert qat["mode"] == "auto" and qat["ran"] is False
    assert "finetune.run" in qat["skipped"] and "accuracy" in qat["why"]
    assert qat["ptq"]["passed"] is False and qat["ptq"]["drop_pts"] > 0.5
    strategies = [a["strategy"] for a in report["accuracy"]["attempts"]]
    assert strategies[0] == "ptq" and "qat" not in strategies and len(strategies) >= 2  # the fallback still ran


def test_off_goes_straight_to_the_fallback(tmp_path, digits_checkpoint, signing_key, blank_calibration):
    out = tmp_path / "never.ekb"
    cfg = digits_config(digits_checkpoint, "onnxruntime-cpu", out, **{"calibration.source": str(blank_calibration)},
                        quantize={"max_excluded_nodes": 1, "qat": "off"})
    with pytest.raises(AccuracyBudgetError) as info:
        compile_model(cfg, signing_key)
    assert "qat" not in info.value.report


def test_qat_settings_are_checked():
    from edgekit.config import QuantizeSettings

    with pytest.raises(Exception, match="qat"):
        QuantizeSettings(qat="sometimes")
    with pytest.raises(Exception, match="qat_epochs"):
        QuantizeSettings(qat_epochs=0)


def test_fold_batchnorm_keeps_the_function():
    import torch

    from edgekit.compress.qat import fold_batchnorm
    from edgekit.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet_small", [1, 8, 8], 10, task="classification", widths=[8, 16]).eval()
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        folded = fold_batchnorm(model)
        after = model(x)
    assert len(folded) == sum(isinstance(m, torch.nn.Identity) for m in model.modules()) >= 5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- the outlier case
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """resnet_small trained 3 epochs on scikit-learn's digits with edgekit train (~98 % validation top-1)."""
    from edgekit.config.train import load_train
    from edgekit.demo import TRAIN_FILE, write_digits_npz
    from edgekit.train.run import train

    root = tmp_path_factory.mktemp("qat")
    cfg = load_train(TRAIN_FILE, {"data.path": write_digits_npz(root / "digits.npz"), "out": root / "run",
                                  "train.epochs": 3, "evaluate": False, "robustness": False})
    train(cfg)
    return root / "run"


def outlier_config(run: Path, target: str, output: Path, scale: float, **overrides: Any):
    """The run, with ×``scale`` activation outliers (same function), compiled against a 1-point budget
    and the profile's own fidelity gate (cosine 0.99: QAT's artifact is judged by the budget, see below)."""
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    base = build_settings(run)
    del base["model"]["checkpoint"]  # the factory loads the run's weights itself, then adds the outliers
    settings = {"target": target, "output": output, "model.source": "edgekit.train.models:outlier_from_checkpoint",
                "model.kwargs": {"path": str(run / "model.pt"), "scale": scale},
                "accuracy.max_accuracy_drop": BUDGET_PTS}
    settings.update(overrides)
    return load_build(None, settings, base=base)


@pytest.mark.slow
def test_outlier_factory_keeps_the_function(run_dir):
    import torch

    from edgekit.train.data import split_arrays
    from edgekit.train.models import load_trained, outlier_from_checkpoint

    x, _ = split_arrays(str(run_dir), "val")
    plain, outl = load_trained(run_dir / "model.pt"), outlier_from_checkpoint(str(run_dir / "model.pt"), 200.0)
    with torch.no_grad():
        torch.testing.assert_close(outl(torch.from_numpy(x)), plain(torch.from_numpy(x)), rtol=1e-3, atol=1e-3)
        block = outl.blocks[0]
        act = torch.relu(block.bn1(block.conv1(outl.stem(torch.from_numpy(x)))))
    per_channel = act.amax(dim=(0, 2, 3))
    assert per_channel.max() > 50 * per_channel.median()  # one channel dwarfs the rest: the outlier


def int8_everywhere(target: str, art_dir: Path) -> None:
    """The exported QAT artifact keeps every convolution INT8, in the backend's own form."""
    if target == "x86-openvino-cpu":
        import openvino as ov

        ops = [op.get_type_name() for op in ov.Core().read_model(str(art_dir / "model.xml")).get_ops()]
        assert ops.count("FakeQuantize") >= ops.count("Convolution") > 0, ops
    elif target == "android-arm64-tflite":
        from edgekit.build.backends.quantize_tflite import int8_op_share

        share = int8_op_share(art_dir / "model.tflite")
        assert share["float"] == 0 and share["int8"] > 0, share
    else:
        import onnx

        m = onnx.load(str(art_dir / "model.onnx"))
        made_by = {o: n.op_type for n in m.graph.node for o in n.output}
        convs = [n for n in m.graph.node if n.op_type == "Conv"]
        assert convs and all(made_by.get(n.input[0]) == made_by.get(n.input[1]) == "DequantizeLinear" for n in convs)
        # the head's input is quantized before the Flatten the exporter puts in front of it
        assert all(made_by.get(n.input[1]) == "DequantizeLinear" for n in m.graph.node if n.op_type == "Gemm")
        weights = {i.name: i for i in m.graph.initializer}
        dq_inputs = [n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
        assert len(dq_inputs) >= len(convs)  # weights stored as int8 initializers, not float + QuantizeLinear
        assert all(weights[name].data_type == onnx.TensorProto.INT8 for name in dq_inputs)
        if target == "jetson-orin-nano":
            cache = (art_dir / "calibration.cache").read_text().splitlines()
            assert cache[0].startswith("TRT-") and len(cache) > 5
            zero_points = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
            assert not zero_points  # TensorRT: signed symmetric activations only


QAT_DIRS = {"onnxruntime-cpu": "qat-int8", "jetson-orin-nano": "trt-qat-int8", "x86-openvino-cpu": "qat-int8",
            "android-arm64-tflite": "tflite-qat-int8"}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(QAT_DIRS))
def test_qat_meets_the_budget_ptq_missed(target, run_dir, signing_key, tmp_path):
    for scale in SCALES:  # the smallest outlier scale at which post-training INT8 misses the budget
        out = tmp_path / f"x{scale:g}" / f"{target}.ekb"
        out.parent.mkdir()
        result = compile_model(outlier_config(run_dir, target, out, scale, keep_work=True), signing_key)
        report = result.report
        if "qat" in report:
            break
        assert [a["strategy"] for a in report["accuracy"]["attempts"]] == ["ptq"]  # PTQ passed: QAT never ran
    else:
        pytest.fail(f"PTQ met the {BUDGET_PTS}-point budget at every outlier scale {SCALES}")
    qat = report["qat"]
    assert qat["mode"] == "auto" and qat["ran"] is True and qat["epochs"] == 2 and qat["seconds"] > 0
    # PTQ missed the 1-point budget; QAT's exported artifact, run by the device engine, meets it
    assert not qat["ptq"]["passed"] and qat["ptq"]["drop_pts"] > BUDGET_PTS, qat["ptq"]
    assert qat["qat"]["passed"] and qat["qat"]["drop_pts"] <= BUDGET_PTS, qat["qat"]
    assert qat["qat"]["accuracy"] > qat["ptq"]["accuracy"]
    attempts = report["accuracy"]["attempts"]
    assert [a["strategy"] for a in attempts] == ["ptq", "qat"]  # passing QAT: the fallback never ran
    chosen = attempts[1]
    assert report["accuracy"]["int8"] == chosen["accuracy"] == qat["qat"]["accuracy"]
    # fine-tuning moved the weights: fidelity to the old FP32 is reported, the accuracy budget judges
    fid = {g["name"]: g for g in chosen["gates"] if g["name"].startswith("fidelity.")}
    assert fid["fidelity.cosine"]["status"] == "not_checked" and fid["fidelity.cosine"]["value"] > 0.8
    assert "accuracy budget judges" in fid["fidelity.cosine"]["detail"]
    assert any(g["name"] == "fidelity.cosine" and g["status"] == "failed" for g in attempts[0]["gates"]) or \
        attempts[0]["drop_pts"] > BUDGET_PTS
    assert chosen["finetune"]["epochs"] == 2
    assert report["result"] == "ok" and out.is_file()
    int8_everywhere(target, out.parent / f"{target}.work" / "qat" / QAT_DIRS[target])
