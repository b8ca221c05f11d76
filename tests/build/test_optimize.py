"""The optimize stage: structured pruning of a trained run, fine-tuning between steps, and the pruned model
compiling again from its saved .pt2; settings refused when the build file is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ConfigError, ExitCode

runner = CliRunner()
TARGET = "onnxruntime-cpu"


def cli_json(*args: Any, code: ExitCode = ExitCode.OK) -> Any:
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)


def _model_source(run: Path) -> dict[str, Any]:
    return {"model.source": "edgekit.train.models:from_checkpoint", "model.kwargs": {"path": str(run / "model.pt")}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """ResNetSmall (32/64/128 wide) trained for 1 epoch on scikit-learn's digits with edgekit train."""
    from edgekit.config.train import load_train
    from edgekit.demo import TRAIN_FILE, write_digits_npz
    from edgekit.train.run import train

    root = tmp_path_factory.mktemp("optimize")
    cfg = load_train(TRAIN_FILE, {"data.path": write_digits_npz(root / "digits.npz"), "out": root / "run",
                                  "train.epochs": 1, "evaluate": False, "robustness": False})
    train(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def pruned(run_dir, signing_key, tmp_path_factory):
    """The run compiled with a 2-step prune pass at ratio 0.5 (1 fine-tuning epoch after each step)."""
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    out = tmp_path_factory.mktemp("pruned") / "digits.ekb"
    cfg = load_build(None, {"target": TARGET, "output": out, "accuracy.max_accuracy_drop": 10},
                     base=build_settings(run_dir),
                     passes={"prune": {"ratio": 0.5, "iterations": 2, "finetune_epochs": 2}})
    return compile_model(cfg, signing_key)


@pytest.mark.slow
def test_prune_pass_cuts_macs_keeps_the_head_and_rounds_channels(pruned):
    report = pruned.report
    assert [s["name"] for s in report["stages"]][:4] == ["data", "import", "optimize", "export"]
    stage = next(s for s in report["stages"] if s["name"] == "optimize")
    (p,) = stage["passes"]
    before, after = p["before"], p["after"]
    assert before["macs"] / after["macs"] >= 1.8, (before, after)
    assert after["params"] < before["params"] and after["onnx_bytes"] < before["onnx_bytes"]
    assert p["round_to"] == 16  # the onnxruntime-cpu profile's VNNI block
    assert p["channels"]["head"] == 10  # the head keeps one output per class
    assert all(c % 16 == 0 for name, c in p["channels"].items() if name != "head"), p["channels"]
    assert p["max_abs_diff_vs_torch"] < 1e-3  # the pruned export matches torch
    for side in (before, after):  # the report carries both sides' figures
        assert side["metric_name"] == "accuracy" and 0 <= side["metric"] <= 100
        assert side["fp32_p50_ms"] > 0
    assert report["optimize"]["passes"][0]["pass"] == "prune" and report["optimize"]["passes"][0]["ratio"] == 0.5
    assert report["optimize"]["macs_reduction"] >= 1.8
    assert report["result"] == "ok" and pruned.bundle.is_file()


@pytest.mark.slow
def test_the_bundle_records_the_prune_pass(pruned, keys):
    from edgekit_runtime.bundle import open_bundle
    from edgekit_runtime.keyring import Keyring

    # the manifest carries the report's record (format 1.3), for the fleet and for people
    rec = open_bundle(pruned.bundle, Keyring.from_paths(keys["public"])).manifest.metrics.optimize
    (p,) = next(s for s in pruned.report["stages"] if s["name"] == "optimize")["passes"]
    assert [q.kind for q in rec.passes] == ["prune"] and rec.passes[0].settings["ratio"] == 0.5
    assert (rec.passes[0].macs_before, rec.passes[0].macs_after) == (p["before"]["macs"], p["after"]["macs"])
    assert rec.passes[0].int8_p50_ms_after == p["after"]["int8_p50_ms"] > 0
    assert rec.macs_reduction == pruned.report["optimize"]["macs_reduction"]


@pytest.mark.slow
def test_iterations_fine_tune_between_steps(pruned):
    stage = next(s for s in pruned.report["stages"] if s["name"] == "optimize")
    steps = stage["passes"][0]["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0]["macs"] > steps[1]["macs"]  # the ratio is reached in two steps
    for s in steps:
        ft = s["finetune"]
        assert ft["epochs"] == 1 and ft["metric"] == "accuracy"
        # pruning without fine-tuning loses accuracy; the epoch after it wins some back
        assert ft["after"] > ft["before"], ft


@pytest.mark.slow
def test_the_optimized_program_compiles_for_another_target(pruned, run_dir, keys, tmp_path):
    from edgekit.train.data import split_arrays

    pt2 = pruned.bundle.with_name(f"{pruned.bundle.stem}.optimized.pt2")
    assert pt2.is_file() and pruned.report["optimize"]["program"] == str(pt2)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=split_arrays(str(run_dir), "train", count=100, labels=False))
    doc = cli_json("compile", pt2, "--target", "x86-openvino-cpu", "--input-shape", "1,1,8,8", "--calibration", calib,
                   "--no-accuracy-check", "--key", keys["private"], "-o", tmp_path / "again.ekb")
    assert doc["result"] == "ok" and doc["target"] == "x86-openvino-cpu"
    assert doc["steps"]["export"]["source"] == "exported_program"
    assert "optimize" not in doc  # nothing to optimize: no passes given


@pytest.mark.slow
def test_onnx_source_with_prune_ratio_is_refused(run_dir, keys, tmp_path):
    from edgekit.config import ModelSource
    from edgekit.models.importer import export_onnx, load_torch_model

    src = ModelSource(source="edgekit.train.models:from_checkpoint", kwargs={"path": str(run_dir / "model.pt")},
                      name="digits", input_shape=[1, 1, 8, 8])
    model, _ = load_torch_model(src)
    onnx_path = tmp_path / "digits.onnx"
    export_onnx(model, src, onnx_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(20, 1, 8, 8)).astype(np.float32))
    doc = cli_json("compile", onnx_path, "--target", TARGET, "--input-shape", "1,1,8,8", "--calibration", calib,
                   "--no-accuracy-check",
                   "--prune-ratio", "0.5", "--finetune-epochs", "0", "--key", keys["private"],
                   "-o", tmp_path / "x.ekb", code=ExitCode.USAGE)
    assert "need the torch model" in doc["error"]["message"] and "ONNX" in doc["error"]["message"]
    assert not (tmp_path / "x.ekb").exists()


def test_bad_pass_settings_are_refused_when_the_build_file_is_read(tmp_path):
    from edgekit.config import load_build

    base = {"target": TARGET, "model.name": "m", "model.input_shape": [1, 1, 8, 8], **_model_source(tmp_path)}
    with pytest.raises(ConfigError, match="ratio"):
        load_build(None, base, passes={"prune": {"ratio": 1.2}})
    with pytest.raises(ConfigError, match="importance"):
        load_build(None, {**base, "optimize": [{"prune": {"importance": "random"}}]})
    with pytest.raises(ConfigError, match="one pass"):
        load_build(None, {**base, "optimize": [{"prune": {}, "distill": {}}]})
    cfg = load_build(None, {**base, "optimize": [{"prune": {"ratio": 0.3, "global": True}}]},
                     passes={"prune": {"iterations": 3}, "distill": {"teacher": "self"}})
    assert [p.kind for p in cfg.optimize] == ["prune", "distill"]  # the flag updated the file's pass, added one
    assert cfg.optimize[0].prune.ratio == 0.3 and cfg.optimize[0].prune.iterations == 3
    assert cfg.optimize[0].prune.global_pruning


@pytest.mark.slow
def test_run_folder_settings_name_the_run_to_fine_tune_with(run_dir):
    from edgekit.train.run_folder import build_settings

    assert build_settings(run_dir)["finetune"] == {"run": str(run_dir.resolve())}


@pytest.mark.slow
def test_fine_tuning_without_a_run_says_what_to_add(run_dir, signing_key, tmp_path):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    base = build_settings(run_dir)
    base.pop("finetune")
    cfg = load_build(None, {"target": TARGET, "output": tmp_path / "x.ekb"}, base=base,
                     passes={"prune": {"ratio": 0.5}})
    with pytest.raises(ConfigError, match=r"finetune: \{run: runs/NAME\}"):
        compile_model(cfg, signing_key)
    assert not (tmp_path / "x.ekb").exists()


def test_epochs_are_split_over_the_steps():
    from edgekit.build.stages.optimize import _split

    assert _split(5, 2) == [2, 3] and _split(3, 1) == [3] and _split(1, 2) == [0, 1] and _split(0, 3) == [0, 0, 0]


@pytest.mark.slow
def test_prune_then_distill_from_the_unpruned_self(run_dir, signing_key, tmp_path):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    cfg = load_build(None, {"target": TARGET, "output": tmp_path / "x.ekb", "accuracy.max_accuracy_drop": 50},
                     base=build_settings(run_dir),
                     passes={"prune": {"ratio": 0.25, "finetune_epochs": 0}, "distill": {"teacher": "self",
                                                                                       "epochs": 1}})
    report = compile_model(cfg, signing_key).report
    prune, distill = next(s for s in report["stages"] if s["name"] == "optimize")["passes"]
    assert prune["pass"] == "prune" and distill["pass"] == "distill" and distill["teacher"] == "self"
    ft = distill["finetune"]
    assert ft["epochs"] == 1 and ft["metric"] == "accuracy" and 0 <= ft["after"] <= 100
    assert distill["before"]["macs"] == distill["after"]["macs"] == prune["after"]["macs"]  # distilling keeps shapes
    assert [p["pass"] for p in report["optimize"]["passes"]] == ["prune", "distill"]


@pytest.mark.slow
def test_taylor_and_global_pruning_on_the_trained_model(run_dir, tmp_path):
    import torch

    from edgekit.compress.finetune import FinetuneContext
    from edgekit.compress.prune import channel_counts, prune
    from edgekit.config.build import FinetuneSettings, PrunePass
    from edgekit.train.models import load_trained

    ctx = FinetuneContext.load(FinetuneSettings(run=run_dir), tmp_path)
    example = torch.zeros(1, 1, 8, 8)
    for settings in (PrunePass(ratio=0.5, importance="taylor", finetune_epochs=0),
                     PrunePass.model_validate({"ratio": 0.5, "global": True, "ignore": ["blocks.0.conv1"]})):
        model = load_trained(run_dir / "model.pt")
        with pytest.raises(ConfigError, match="no module"):
            prune(model, example, PrunePass(ignore=["blocks.9"]), 8)
        seen = []
        res = prune(model, example, settings, 8, gradients=lambda m: seen.append(ctx.accumulate_gradients(m)))
        assert res.before["macs"] / res.after["macs"] >= 1.5, (settings, res.before, res.after)
        assert all(c % 8 == 0 for n, c in channel_counts(model).items() if n != "head")
        assert channel_counts(model)["head"] == 10
        assert bool(seen) == (settings.importance == "taylor")  # Taylor ranks channels by training gradients
        if settings.global_pruning:  # an ignored layer keeps its output channels
            assert model.blocks[0].conv1.out_channels == 32
        assert 0 <= ctx.evaluate(model) <= 100


def test_the_least_ratio_is_one_every_larger_ratio_agrees_with():
    from edgekit.build.stages.optimize import least_ratio

    def probes(meets: list[bool]) -> list[dict[str, Any]]:
        return [{"ratio": i / 10, "meets_budget": m} for i, m in enumerate(meets)]

    assert least_ratio(probes([False, False, True, True])) == 0.2
    assert least_ratio(probes([True, True, True])) == 0.0  # the unpruned model already meets the budget
    # one lucky fast run at 0.1 does not pick it while 0.2 misses: 0.3 is the answer
    assert least_ratio(probes([False, True, False, True])) == 0.3
    assert least_ratio(probes([False, False, False])) is None


def test_prune_ratio_flag_takes_a_share_or_auto(tmp_path):
    result = runner.invoke(app, ["compile", "m.onnx", "--target", TARGET, "--prune-ratio", "half", "--json"])
    assert result.exit_code == ExitCode.USAGE
    assert "--prune-ratio takes a share of channels (e.g. 0.5) or 'auto'" in result.stdout


@pytest.mark.slow
def test_auto_ratio_needs_a_latency_budget(run_dir, signing_key, tmp_path):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    cfg = load_build(None, {"target": TARGET, "output": tmp_path / "x.ekb", "limits": {"latency_budget_ms": None}},
                     base=build_settings(run_dir), passes={"prune": {"ratio": "auto"}})
    with pytest.raises(ConfigError, match="limits.latency_budget_ms"):
        compile_model(cfg, signing_key)


@pytest.mark.slow
def test_auto_ratio_measures_int8_latency_per_ratio_and_refuses_an_unreachable_budget(run_dir, keys, tmp_path):
    doc = cli_json("compile", run_dir, "--target", TARGET, "--prune-ratio", "auto", "--latency-budget-ms", "1e-6",
                   "--key", keys["private"], "-o", tmp_path / "x.ekb", code=ExitCode.GATE)
    assert "no prune ratio up to 0.75 meets the latency budget" in doc["error"]["message"]
    report = json.loads((tmp_path / "x.report.json").read_text())
    search = report["optimize"]["search"]
    assert search["precision"] == "int8" and search["engine"] == "onnxruntime" and search["percentile"] == "p99"
    probes = search["probes"]
    assert [p["ratio"] for p in probes] == [0.0, 0.15, 0.3, 0.45, 0.6, 0.75]
    assert probes[0]["macs"] > probes[-1]["macs"] * 1.8  # each ratio really was pruned before it was timed
    assert all(p["p99_ms"] >= p["p50_ms"] > 0 and not p["meets_budget"] for p in probes)
    assert not (tmp_path / "x.ekb").exists()


@pytest.mark.slow
def test_auto_ratio_keeps_a_model_that_already_meets_the_budget(run_dir, signing_key, tmp_path):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    cfg = load_build(None, {"target": TARGET, "output": tmp_path / "x.ekb", "limits.latency_budget_ms": 1e4,
                            "accuracy.max_accuracy_drop": 10},
                     base=build_settings(run_dir), passes={"prune": {"ratio": "auto", "search_points": 3}})
    report = compile_model(cfg, signing_key).report
    (p,) = next(s for s in report["stages"] if s["name"] == "optimize")["passes"]
    assert p["search"]["chosen"] == 0.0 and "meets the budget" in p["skipped"]
    assert p["before"]["macs"] == p["after"]["macs"]  # nothing was removed
    assert p["before"]["int8_p50_ms"] > 0 and p["after"]["fp32_p50_ms"] > 0
