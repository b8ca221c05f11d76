"""The build as stages: what each records, what a refused or broken build leaves behind (nothing), what ships."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.keyring import Keyring
from edgekit.build.pipeline import STAGES, compile_model
from edgekit.errors import ConfigError, ExitCode, GateError, VerificationError

from .conftest import build_config

TARGET = "onnxruntime-cpu"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_report_lists_every_stage_in_order_with_its_cost(int8_bundles):
    report = int8_bundles[TARGET].report
    assert [s["name"] for s in report["stages"]] == [s.name for s in STAGES] == [
        "data", "import", "optimize", "export", "quantize", "evaluate", "package"]
    assert all(s["seconds"] >= 0 for s in report["stages"])
    by_name = {s["name"]: s for s in report["stages"]}
    assert by_name["data"]["calibration"] == {"source": by_name["data"]["calibration"]["source"], "samples": 240,
                                              "held_back": 60, "unused": 0}
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["accuracy"]["status"] == "passed" and gates["fidelity.cosine"]["status"] == "passed"
    assert report["fidelity"]["cosine"] >= 0.99 and report["fidelity"]["samples"] == 60


def test_slower_int8_ships_the_faster_fp32_and_says_so(tmp_path, digits_checkpoint, signing_key, keys):
    # a margin no INT8 artifact can reach stands in for a model whose INT8 is slower on this host
    out = tmp_path / "m.ekb"
    # (the example ships INT8 at parity with keep_int8; this test is about the default, ship_faster)
    cfg = build_config(digits_checkpoint, TARGET, out, latency={"min_int8_speedup": 1000.0,
                                                                "on_slower": "ship_faster"})
    result = compile_model(cfg, signing_key)
    gate = next(g for g in result.report["gates"] if g["name"] == "latency.int8_speedup")
    assert gate["status"] == "failed"
    # which artifact is faster depends on the host's CPU (an 8x8 model is all per-call overhead): ship_faster
    # must ship the one the gate measured faster, and say so
    speedup = result.report["latency_ms"].get("speedup")
    fp32_faster = "shipping the faster FP32 artifact" in gate["detail"]
    assert fp32_faster or "FP32 is slower: shipping INT8" in gate["detail"], gate["detail"]
    shipped = "fp32" if fp32_faster else "int8"
    acc = result.report["accuracy"]
    assert result.report["precision"] == shipped and acc.get("deployed", acc.get("int8")) > 90
    if speedup is not None:
        assert (speedup < 1.0) == fp32_faster, (speedup, gate["detail"])
    m = edgekit_runtime.open_bundle(out, Keyring.from_paths(keys["public"])).manifest
    assert m.backend.precision == shipped and (m.calibration is None) == fp32_faster
    assert m.metrics.latency_ms.gated is True and m.metrics.latency_ms.speedup < 1000
    assert {g.name: g.status for g in m.metrics.gates}["latency.int8_speedup"] == "failed"


def test_slower_int8_fails_the_build_when_the_profile_says_fail(tmp_path, digits_checkpoint, signing_key):
    out = tmp_path / "m.ekb"
    cfg = build_config(digits_checkpoint, TARGET, out, latency={"min_int8_speedup": 1000.0, "on_slower": "fail"})
    with pytest.raises(GateError, match="latency.int8_speedup gate failed, no bundle written") as info:
        compile_model(cfg, signing_key)
    assert info.value.exit_code == ExitCode.GATE
    assert not out.exists() and _leftovers(tmp_path) == ["m.report.json"]  # no bundle, no work folder
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["result"] == "failed: latency gate"
    # the report names the stage that refused and its cost; the stages before it passed
    names = [s["name"] for s in report["stages"]]
    assert names == ["data", "import", "optimize", "export", "quantize", "evaluate"], names
    assert report["stages"][-1]["failed"] == "GateError" and report["stages"][-1]["seconds"] > 0
    assert not any("failed" in s for s in report["stages"][:-1])
    assert report["seconds"] >= sum(s["seconds"] for s in report["stages"])


def test_failed_health_check_leaves_nothing_at_the_output(tmp_path, digits_checkpoint, signing_key, monkeypatch):
    out = tmp_path / "m.ekb"
    out.write_bytes(b"the bundle of an earlier build")  # a failed build must not lose it either
    monkeypatch.setattr(edgekit_runtime.Model, "health_check", lambda self: {"ok": False, "max_abs_diff": 1.0})
    cfg = build_config(digits_checkpoint, TARGET, out)
    with pytest.raises(VerificationError, match="fails its own health check"):
        compile_model(cfg, signing_key)
    assert out.read_bytes() == b"the bundle of an earlier build"
    assert _leftovers(tmp_path) == ["m.ekb", "m.report.json"]  # no partial bundle, no work folder


def test_keep_work_keeps_the_work_folder_of_a_failed_build(tmp_path, digits_checkpoint, signing_key):
    out = tmp_path / "m.ekb"
    cfg = build_config(digits_checkpoint, TARGET, out, keep_work=True,
                       latency={"min_int8_speedup": 1000.0, "on_slower": "fail"})
    with pytest.raises(GateError):
        compile_model(cfg, signing_key)
    assert (tmp_path / "m.work" / "model_fp32.onnx").is_file() and not out.exists()


def test_labels_that_are_not_the_models_classes_are_refused(tmp_path, digits_checkpoint, signing_key):
    from edgekit.data import digits

    x, y = digits.validation()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=x, y=(y + 1) % 10)  # every label shifted: FP32 scores ~0 %
    cfg = build_config(digits_checkpoint, TARGET, tmp_path / "m.ekb", **{"validation.source": str(wrong)})
    with pytest.raises(GateError, match="at or below chance for 10 classes") as info:
        compile_model(cfg, signing_key)
    assert info.value.report["result"] == "failed: reference at chance"
    assert not (tmp_path / "m.ekb").exists()


def test_without_labels_the_report_says_accuracy_not_checked_beside_fidelity(tmp_path, digits_checkpoint,
                                                                          signing_key):
    cfg = build_config(digits_checkpoint, TARGET, tmp_path / "m.ekb", accuracy={"max_accuracy_drop": None})
    cfg.validation = None
    report = compile_model(cfg, signing_key).report
    assert report["accuracy_not_checked"].startswith("accuracy not checked")
    assert report["fidelity"]["cosine"] >= 0.99 and report["precision"] == "int8"
    assert {g["name"]: g["status"] for g in report["gates"]}["fidelity.cosine"] == "passed"


def test_output_inside_the_work_folder_is_refused_before_anything_runs(tmp_path, digits_checkpoint, signing_key):
    cfg = build_config(digits_checkpoint, TARGET, tmp_path / "w" / "m.ekb", workdir=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="inside the work folder"):
        compile_model(cfg, signing_key)
    assert _leftovers(tmp_path) == []


def test_preprocessing_the_device_would_refuse_is_a_config_error_up_front(tmp_path, digits_checkpoint, signing_key):
    cfg = build_config(digits_checkpoint, TARGET, tmp_path / "m.ekb", **{"preprocess.mean": [0.3, 0.3]})  # gray: 1
    with pytest.raises(ConfigError, match=r"preprocess\.mean has 2 values.*fix the build file"):
        compile_model(cfg, signing_key)
    report = json.loads((tmp_path / "m.report.json").read_text())
    # refused in the first stage, before any model work
    assert [(s["name"], s["failed"]) for s in report["stages"]] == [("data", "ConfigError")]
    assert not (tmp_path / "m.ekb").exists()


def test_label_count_is_checked_without_validation_data(tmp_path, digits_checkpoint, signing_key):
    cfg = build_config(digits_checkpoint, TARGET, tmp_path / "m.ekb", accuracy={"max_accuracy_drop": None},
                       **{"model.labels": [str(i) for i in range(9)]})
    cfg.validation = None
    with pytest.raises(ConfigError, match="10 output classes but 9 labels"):
        compile_model(cfg, signing_key)
    assert not (tmp_path / "m.ekb").exists()
