"""`edgekit train` → `edgekit compile runs/NAME` → `edgekit eval`: the CLI contract on real sensor data (BasicMotions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ExitCode

runner = CliRunner()


def cli_json(*args: Any, code: ExitCode = ExitCode.OK) -> Any:
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def basic_motions(tmp_path_factory) -> Path:
    """aeon's BasicMotions (smartwatch accelerometer + gyroscope, 4 classes) with its own test split."""
    aeon = pytest.importorskip("aeon.datasets")
    x, y = aeon.load_basic_motions(split="train")
    xt, yt = aeon.load_basic_motions(split="test")
    path = tmp_path_factory.mktemp("bm") / "basic_motions.npz"
    np.savez(path, x=x.astype(np.float32), y=y, x_test=xt.astype(np.float32), y_test=yt)
    return path


@pytest.fixture(scope="module")
def run_dir(basic_motions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "motions"
    doc = cli_json("train", "--data", basic_motions, "--out", out, "--epochs", "8", "--batch-size", "16",
                   "--set", "split.val=0.2", "--set", "robustness=false")
    assert doc["arch"] == "inception_time" and doc["kind"] == "sequence"  # the default for (N, C, L) data
    assert doc["split"]["sizes"]["test"] == 40  # BasicMotions' own test split, untouched
    return out


def test_train_cli_writes_a_run_that_learns(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["test"]["accuracy"] >= 75, m["test"]  # 4 classes: chance is 25 %
    assert set(m["test"]["per_class_recall"]) == {"badminton", "running", "standing", "walking"}
    report = (run_dir / "report.md").read_text()
    assert "inception_time" in report and "confusion" in report.lower()


def test_compile_run_folder_int8_and_eval_bundles_side_by_side(run_dir, basic_motions, keys, tmp_path):
    int8 = cli_json("compile", run_dir, "--target", "onnxruntime-cpu", "--key", keys["private"],
                    "-o", tmp_path / "int8.ekb", "--max-accuracy-drop", "10")
    assert int8["precision"] in ("int8", "fp32")
    assert int8["stages"][0]["validation"]["samples"] == 8  # the run's validation split, not its test split
    cli_json("compile", run_dir, "--target", "onnxruntime-cpu", "--key", keys["private"], "--no-quantize",
             "-o", tmp_path / "fp32.ekb")
    man = json.loads(__import__("zipfile").ZipFile(tmp_path / "fp32.ekb").read("manifest.json"))
    assert man["preprocess"]["type"] == "tensor" and len(man["preprocess"]["mean"]) == 6
    doc = cli_json("eval", tmp_path / "int8.ekb", "--data", basic_motions, "--compare", tmp_path / "fp32.ekb",
                   "--keyring", keys["public"], "--no-robustness", "--out", tmp_path / "eval")
    names = list(doc["evaluation"]["predictors"])
    assert len(names) == 2 and doc["samples"] == 40
    acc = [doc["evaluation"]["predictors"][n]["accuracy"] for n in names]
    run_acc = json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]
    # the FP32 bundle through the runtime (raw windows in) is the torch model
    assert abs(acc[1] - run_acc) < 1e-6, (acc, run_acc)
    assert (tmp_path / "eval" / "report.md").is_file()


def test_eval_run_folder_on_its_test_split(run_dir):
    doc = cli_json("eval", run_dir, "--no-robustness")
    m = json.loads((run_dir / "metrics.json").read_text())
    assert doc["samples"] == 40 and "test split" in doc["data"]
    assert doc["evaluation"]["predictors"]["fp32 (torch)"]["accuracy"] == pytest.approx(m["test"]["accuracy"])


def test_train_cli_errors_are_usage_errors(basic_motions, tmp_path):
    err = cli_json("train", "--data", tmp_path / "missing.npz", "--out", tmp_path / "r", code=ExitCode.USAGE)
    assert "does not exist" in err["error"]["message"]
    err = cli_json("train", "--data", basic_motions, "--out", tmp_path / "r", "--set", "optim.lr=-1",
                   code=ExitCode.USAGE)
    assert "optim.lr" in err["error"]["message"]
    err = cli_json("train", "--data", basic_motions, "--out", tmp_path / "r", "--arch", "nope", code=ExitCode.USAGE)
    assert "inception_time" in err["error"]["message"]  # the message lists what exists
    err = cli_json("compile", tmp_path, "--target", "onnxruntime-cpu", code=ExitCode.USAGE)
    assert "model.pt" in err["error"]["message"]


def test_list_archs():
    doc = cli_json("train", "--list-archs")
    assert {"resnet_small", "inception_time", "gru", "mlp"} <= set(doc)


def test_ctrl_c_keeps_last_pt_and_resume_finishes(basic_motions, tmp_path):
    """SIGINT to `edgekit train`: exit 130, last.pt on disk, no metrics; --resume runs the rest."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgekit.cli", "train", "--data", str(basic_motions), "--out", str(out),
           "--epochs", "40", "--batch-size", "16", "--set", "evaluate=false", "--set", "train.early_stopping=null",
           "--set", "model.kwargs={nb_filters: 8, depth: 3}"]
    # SIGINT back to its default in the child: a test suite started in the background by a shell without job
    # control inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored (no KeyboardInterrupt)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "last.pt").exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == int(ExitCode.INTERRUPTED), err[-2000:]
    assert "--resume" in err and (out / "last.pt").exists() and not (out / "metrics.json").exists()
    done = subprocess.run(cmd + ["--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["epochs_run"] == 40 and (out / "metrics.json").exists()
    assert not (out / "report.md").exists()  # evaluate=false: the headline metrics only
