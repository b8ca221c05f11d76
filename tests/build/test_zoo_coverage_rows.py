"""benchmarks/zoo_coverage.py: what a row says about a build, and how failures are told apart.

A tiny ONNX classifier (as torch's exporter writes it: opset 20) goes through the same call the
benchmark makes for every zoo model — ``edgekit compile``'s overrides, a folder of JPEG crops, the
imagenet preset, no labels — in a forked child; the row must carry what the build report says. An
edgekit error is recorded with its exit code and type, anything else as a bug (a bare traceback)
with its last frame, a child that hangs as a timeout, and the Markdown counts each apart.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import zoo_coverage as zc  # noqa: E402
from edgekit.errors import ConfigError, GateError  # noqa: E402
from test_onnx_to_torch_opset import opset20_classifier  # noqa: E402


def _edgekit_error() -> dict:
    raise ConfigError("the build has no 'preprocess' section", hint="add --preprocess imagenet")


def _gate() -> dict:
    raise GateError("fidelity.cosine gate failed, no bundle written: cosine 0.9100 (at least 0.99). Tried 2 "
                    "artifact(s): ptq; mixed_precision. Options: more or better calibration data",
                    {"fidelity": {"cosine": 0.91, "min_cosine": 0.99},
                     "accuracy": {"attempts": [{"strategy": "ptq", "fidelity": {"cosine": 0.9}},
                                               {"strategy": "mixed_precision", "fidelity": {"cosine": 0.91}}]}})


def _bug() -> dict:
    return {"x": [][1]}


def _hang() -> dict:
    time.sleep(30)
    return {}


def test_children_tell_edgekit_errors_from_bugs_and_timeouts():
    err = zc.run_isolated(_edgekit_error, 60)
    assert not err["ok"] and err["failure"]["kind"] == "error"
    assert (err["failure"]["code"], err["failure"]["exit_code"], err["failure"]["type"]) == ("USAGE", 2, "ConfigError")
    assert err["failure"]["hint"] == "add --preprocess imagenet"
    gate = zc.run_isolated(_gate, 60)
    assert zc.outcome({"result": gate["failure"]["kind"], **gate}) == "gate"
    assert gate["failure"]["best_cosine"] == 0.91 and [a["strategy"] for a in gate["failure"]["attempts"]] == \
        ["ptq", "mixed_precision"]
    assert gate["failure"]["hint"] == "Options: more or better calibration data"  # what to do, from the message
    bug = zc.run_isolated(_bug, 60)
    assert bug["failure"]["kind"] == "bug" and bug["failure"]["type"] == "IndexError"
    assert "test_zoo_coverage_rows.py" in bug["failure"]["where"] and "_bug" in bug["failure"]["where"]
    hung = zc.run_isolated(_hang, 1)
    assert hung["failure"]["kind"] == "timeout" and "1 s" in hung["failure"]["message"]


def test_a_tiny_model_compiles_like_the_cli_and_its_row_renders(tmp_path, keys):
    onnx = opset20_classifier(tmp_path / "tiny.onnx", side=32)
    calib = zc.write_calibration(tmp_path / "crops", count=24)
    assert len(list(calib.glob("*.jpg"))) == 24
    overrides, _ = zc.cli_overrides(onnx, "onnxruntime-cpu", calib, tmp_path / "tiny.ekb")
    # the preset took its size and layout from the model's fixed 32×32 input, as `--preprocess imagenet` does
    assert overrides["preprocess"]["size"] == [32, 32] and overrides["preprocess"]["layout"] == "NCHW"
    assert overrides["accuracy"] == {"max_accuracy_drop": None}

    res = zc.run_isolated(lambda: zc.compile_target(onnx, "onnxruntime-cpu", calib, tmp_path / "tiny.ekb",
                                                    keys["private"]), 300)
    assert res["ok"], res.get("failure")
    assert res["result"] == "converted" and (tmp_path / "tiny.ekb").stat().st_size == res["bundle_bytes"]
    assert res["cpu_s"] > 0
    if res["precision"] == "int8":
        assert res["int8_within_gate"] and res["cosine"] >= res["min_cosine"] and res["strategy"].startswith("INT8")
    else:
        assert res["strategy"].startswith("FP32")
    assert res["p50_fp32_ms"] > 0 and res["speedup"] > 0 and res["engine"] == "onnxruntime"

    cell = {k: v for k, v in res.items() if k != "ok"}
    bug = zc.run_isolated(_bug, 60)
    doc = {
        "generated_at": "now", "command": "benchmarks/zoo_coverage.py --models tiny",
        "settings": {"targets": ["onnxruntime-cpu", "android-arm64-tflite"], "calib_images": 24, "quick": False},
        "versions": {}, "system": {"cpu": "test"}, "zoo": ["tiny", "other", "never_run"],
        "rows": [{"model": "tiny", "side": 32, "dynamic_batch": True, "export_cpu_s": 1.0,
                  "targets": {"onnxruntime-cpu": cell,
                              "android-arm64-tflite": {"result": "bug", "failure": bug["failure"], "cpu_s": 1.0}}},
                 {"model": "other", "export_cpu_s": 2.0, "targets": {}, "export_failure": zc.run_isolated(
                     _edgekit_error, 60)["failure"]}],
    }
    s = zc.summarize(doc)
    assert s["bugs"] == 1 and s["export_failures"] == 1
    assert s["targets"]["onnxruntime-cpu"]["converted"] == 1
    assert s["targets"]["android-arm64-tflite"] == {**s["targets"]["android-arm64-tflite"], "converted": 0,
                                                     "failures": {"bug": 1}}
    md = zc.markdown(doc)
    assert "**Bare tracebacks (bugs: an exception that is not an edgekit error): 1.**" in md
    assert "| onnxruntime-cpu | 1 | 1 (100% of run, 33% of zoo) |" in md
    assert f"| tiny | 32 | dynamic | – | onnxruntime-cpu | converted | {cell['strategy']} | {cell['cosine']:.4f}" in md
    assert "- **tiny** · android-arm64-tflite: **bare traceback** IndexError" in md
    assert "- **other** · export: USAGE (2) ConfigError: the build has no 'preprocess' section" in md
    assert "Not run (1 of 3): never_run." in md and "**noisy**" in md


def test_resume_retries_timeouts_and_missing_targets_only_and_a_one_target_rerun_keeps_the_other_cells():
    targets = ["x86-openvino-cpu", "android-arm64-tflite"]
    done = {"targets": {"x86-openvino-cpu": {"result": "converted"}, "android-arm64-tflite": {"result": "error"}}}
    assert zc.pending(done, targets) == []
    assert zc.pending(None, targets) == targets  # a model never run
    timed_out = {"targets": {**done["targets"], "android-arm64-tflite": {"result": "timeout"}}}
    assert zc.pending(timed_out, targets) == ["android-arm64-tflite"]  # the converted cell is not re-run
    assert zc.pending({"targets": {"x86-openvino-cpu": {"result": "converted"}}}, targets) == ["android-arm64-tflite"]
    assert zc.pending({"targets": {"x86-openvino-cpu": {"result": "died"}}}, targets) == targets
    assert zc.pending({"export_failure": {"kind": "error"}, "targets": {}}, targets) == []
    assert zc.pending({"export_failure": {"kind": "died"}, "targets": {}}, targets) == targets
    rerun = {"model": "m", "export_cpu_s": 3.0, "targets": {"android-arm64-tflite": {"result": "converted"}}}
    merged = zc.merge_row({"model": "m", "export_cpu_s": 1.0, **done}, rerun)
    assert merged["targets"] == {"x86-openvino-cpu": {"result": "converted"},
                                 "android-arm64-tflite": {"result": "converted"}}


def _outlier_net():
    """Conv 1×1 whose first output channel is 1000× the others, and a head that never reads that channel."""
    import torch

    torch.manual_seed(0)
    conv, head = torch.nn.Conv2d(3, 8, 1), torch.nn.Linear(8 * 4 * 4, 10)
    with torch.no_grad():
        conv.weight[0] *= 1000
        head.weight.view(10, 8, 16)[:, 0] = 0
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), head).eval()


def test_the_textbook_int8_reference_sees_what_per_tensor_activations_lose_and_leaves_the_model_alone():
    import torch

    x = np.random.default_rng(0).normal(size=(40, 3, 4, 4)).astype(np.float32)
    net = _outlier_net()
    before = net(torch.from_numpy(x)).detach()
    ref = zc.simulate_int8(net, x[:32], x[32:])
    # per-channel weights keep the small channels; one per-tensor activation range rounds them away
    assert ref["w8_cosine"] > 0.999 and ref["w8a8_cosine"] < 0.9 and ref["samples"] == 8
    assert ref["w8a8_min_cosine"] <= ref["w8a8_cosine"]
    assert torch.equal(net(torch.from_numpy(x)).detach(), before)  # the model itself is not quantized

    tame = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(128, 10)).eval()
    assert zc.simulate_int8(tame, x[:32], x[32:])["w8a8_cosine"] > 0.99

    gate = {"result": "error", "failure": {"kind": "error", "code": "GATE", "min_cosine": 0.99}}
    doc = {"settings": {"targets": ["onnxruntime-cpu"]}, "zoo": ["a", "b", "c"],
           "rows": [{"model": "a", "int8_reference": {"w8a8_cosine": 0.89}, "targets": {"onnxruntime-cpu": gate}},
                    {"model": "b", "int8_reference": {"w8a8_cosine": 0.997}, "targets": {"onnxruntime-cpu": gate}},
                    {"model": "c", "targets": {"onnxruntime-cpu": gate}},  # a row from before the reference
                    {"model": "d", "int8_reference": {"w8a8_cosine": 0.95}, "targets": {"onnxruntime-cpu": {
                        "result": "error", "failure": {"kind": "error", "code": "GATE", "message":
                                                       "fidelity.cosine gate failed, no bundle written: cosine "
                                                       "0.9 on 19 held-back calibration samples (at least 0.97)."}}}}]}
    st = zc.summarize(doc)["targets"]["onnxruntime-cpu"]
    # d: an older cell without min_cosine, whose message states the threshold (0.95 misses 0.97)
    assert st["failures"] == {"gate": 4} and st["gate_reference_misses"] == 2
