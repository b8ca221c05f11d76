"""The training loop and run folders: resume gives the same run, DDP matches one process, refusals, find-lr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.config.train import load_train
from edgekit.errors import ConfigError
from edgekit.train.run import TrainingInterrupted, find_lr, train
from edgekit.train.trainer import DistInfo, EpochSampler


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """400 digits as uint8 (N, 1, 8, 8) plus a held-out test split of 200."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x[idx[:400]], y=d.target[idx[:400]], x_test=x[idx[400:600]], y_test=d.target[idx[400:600]])
    return path


@pytest.fixture(scope="module")
def airline_csv(tmp_path_factory) -> Path:
    """aeon's Airline series (144 monthly passenger counts) as a CSV with a date column."""
    pd = pytest.importorskip("pandas")
    aeon = pytest.importorskip("aeon.datasets")
    series = np.asarray(aeon.load_airline(), dtype=np.float64).ravel()
    csv = tmp_path_factory.mktemp("airline") / "airline.csv"
    pd.DataFrame({"month": pd.date_range("1949-01-01", periods=len(series), freq="MS"),
                  "passengers": series}).to_csv(csv, index=False)
    return csv


def _cfg(data: Path, out: Path, **over):
    base = {"data.path": data, "out": out, "train.epochs": 4, "train.batch_size": 32,
            "model.kwargs": {"widths": [8, 16, 32]}, "robustness": False, "evaluate": True,
            "optim.schedule": "cosine", "optim.warmup_epochs": 1, "optim.ema": 0.9}
    base.update(over)
    return load_train(None, base)


class _StopAt:
    """Callbacks that press Ctrl-C when epoch ``n`` has finished."""

    def __init__(self, n: int):
        self.n = n

    def on_epoch_start(self, epoch, epochs, steps):
        pass

    def on_batch(self, step, loss):
        pass

    def on_epoch_end(self, row):
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(small_digits, tmp_path):
    torch.set_num_threads(1)
    full = train(_cfg(small_digits, tmp_path / "full")).metrics
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(_cfg(small_digits, tmp_path / "cut"), callbacks=_StopAt(2))
    assert (tmp_path / "cut" / "last.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    # a second plain run into the interrupted folder would overwrite it: refused, nothing lost
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(small_digits, tmp_path / "cut"))
    resumed = train(_cfg(small_digits, tmp_path / "cut"), resume=True).metrics
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert resumed["test"]["accuracy"] == full["test"]["accuracy"]
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["epochs_run"] == 4
    # the run folder holds what the issue lists
    run = tmp_path / "full"
    for name in ("train.yaml", "model.pt", "last.pt", "metrics.json", "report.md", "learning_curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    m = json.loads((run / "metrics.json").read_text())
    for key in ("val", "epochs_run", "best_epoch", "world_size", "seed", "seconds"):
        assert key in m
    assert {"accuracy", "macro_f1"} <= set(m["test"]) and m["world_size"] == 1
    assert m["test"]["accuracy"] > 60  # 4 tiny epochs on 400 digits: far above chance (10 %)


def test_resume_refuses_without_last_pt_and_with_another_seed(small_digits, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train(_cfg(small_digits, tmp_path / "none"), resume=True)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(small_digits, tmp_path / "r", **{"train.epochs": 2}), callbacks=_StopAt(1))
    with pytest.raises(ConfigError, match="seed"):
        train(_cfg(small_digits, tmp_path / "r", **{"train.epochs": 2, "train.seed": 5}), resume=True)


def test_ddp_two_processes_match_one(small_digits, tmp_path):
    """torch.distributed.run with 2 gloo processes, the same global batch: the same loss curve within tolerance."""
    over = {"train.epochs": 3, "augment.enabled": False, "evaluate": True, "optim.ema": None}
    one = train(_cfg(small_digits, tmp_path / "one", **over)).metrics
    two = train(_cfg(small_digits, tmp_path / "two", nproc=2, **over)).metrics
    assert two["world_size"] == 2 and one["world_size"] == 1
    a = np.array([r["train_loss"] for r in one["history"]])
    b = np.array([r["train_loss"] for r in two["history"]])
    assert len(a) == len(b) == 3
    assert b[-1] < b[0]  # it learns
    # per-rank batch norm statistics and sample order differ; the curves agree within 15 %
    assert np.max(np.abs(a - b) / a) < 0.15, (a, b)
    assert abs(one["test"]["accuracy"] - two["test"]["accuracy"]) < 10


def test_batch_must_divide_over_processes(small_digits, tmp_path):
    with pytest.raises(ConfigError, match="divide evenly"):
        _cfg(small_digits, tmp_path / "x", nproc=3)


def test_weighted_sampler_balances_classes():
    y = np.array([0] * 90 + [1] * 10)
    weights = (1.0 / np.bincount(y))[y]
    drawn = np.concatenate([y[EpochSampler(100, 0, DistInfo(), weights).indices(e)] for e in range(20)])
    share = drawn.mean()
    assert 0.4 < share < 0.6  # the 10 % class is drawn about half the time
    # ranks split one epoch's order without overlap
    a = EpochSampler(10, 0, DistInfo(0, 2, 0)).indices(3)
    b = EpochSampler(10, 0, DistInfo(1, 2, 0)).indices(3)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(10))


def test_bf16_accumulation_and_sgd_onecycle_run(small_digits, tmp_path):
    m = train(_cfg(small_digits, tmp_path / "bf16", **{
        "train.epochs": 3, "train.precision": "bf16", "train.accumulate": 2, "optim.optimizer": "sgd",
        "optim.lr": 0.05, "optim.schedule": "onecycle", "optim.ema": None, "loss.name": "focal",
        "loss.class_weights": "inverse", "augment.mixup": 0.2, "augment.cutmix": 1.0})).metrics
    losses = [r["train_loss"] for r in m["history"]]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert m["test"]["accuracy"] > 20


def test_find_lr_writes_a_plot_and_suggests_a_rate_in_range(small_digits, tmp_path):
    result = find_lr(_cfg(small_digits, tmp_path / "lr"), steps=30)
    assert Path(result["plot"]).is_file() and (tmp_path / "lr" / "lr_find.json").is_file()
    assert 1e-6 <= result["suggested_lr"] <= 1.0
    assert len(result["losses"]) >= 10


def test_forecast_run_reports_baselines(airline_csv, tmp_path):
    csv = airline_csv
    cfg = load_train(None, {"data.path": csv, "data.task": "forecast", "data.time": "month", "out": tmp_path / "f",
                            "train.epochs": 3, "robustness": False})
    m = train(cfg).metrics
    assert m["arch"] == "gru" and m["kind"] == "forecast"
    assert {"rmse", "mae", "mape"} <= set(m["test"])
    assert "seasonal_naive" in m["test"]["baselines"] and m["split"]["method"] == "temporal"
    # the model outputs passengers (real units), not standardized values
    assert 50 < m["test"]["mae"] + m["test"]["baselines"]["seasonal_naive"]["mae"] < 1000


class _StopInFirstEpoch(_StopAt):
    def on_batch(self, step, loss):
        raise KeyboardInterrupt


def test_ctrl_c_before_the_first_epoch_ends_leaves_nothing_half_done(small_digits, tmp_path):
    with pytest.raises(TrainingInterrupted, match="nothing to resume"):
        train(_cfg(small_digits, tmp_path / "r"), callbacks=_StopInFirstEpoch(0))
    assert not (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "model.pt").exists()


def test_ema_099_on_a_short_run_is_not_stuck_at_the_initial_weights(small_digits, tmp_path):
    m = train(_cfg(small_digits, tmp_path / "ema", **{"optim.ema": 0.999, "train.epochs": 3})).metrics
    assert m["test"]["accuracy"] > 50, m["test"]


def test_mixup_on_regression_is_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(120, 5)).astype(np.float32)
    data = tmp_path / "rows.npz"
    np.savez(data, x=x, y=x.sum(1))
    with pytest.raises(ConfigError, match="mixup"):
        train(load_train(None, {"data.path": data, "data.task": "regression", "out": tmp_path / "r",
                                "augment.mixup": 0.2}))


def test_a_run_folder_compiles_only_when_finished_and_calibrates_over_the_whole_train_split(small_digits, tmp_path):
    from edgekit.train.run_folder import build_settings

    with pytest.raises(TrainingInterrupted):
        train(_cfg(small_digits, tmp_path / "r", **{"train.epochs": 3}), callbacks=_StopAt(1))
    with pytest.raises(ConfigError, match="has not finished"):
        build_settings(tmp_path / "r")
    train(_cfg(small_digits, tmp_path / "r", **{"train.epochs": 3}), resume=True)
    s = build_settings(tmp_path / "r")
    assert s["calibration"]["kwargs"] == {"run": str((tmp_path / "r").resolve()), "split": "train", "labels": False,
                                          "count": 300}
    assert s["validation"]["kwargs"]["split"] == "val" and s["preprocess"]["type"] == "image"
    from edgekit.train.data import split_arrays

    x = split_arrays(s["calibration"]["kwargs"]["run"], "train", count=300, labels=False)
    _, y = split_arrays(s["calibration"]["kwargs"]["run"], "train", count=300)
    assert len(x) == 300 and len(np.unique(y)) == 10  # every class, not the first few


def test_a_forecast_run_compiles_under_an_mae_budget(airline_csv, tmp_path, signing_key):
    """The build gates a forecast on the validation MAE in real units (cosine to FP32 is blind to level errors)."""
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.train.run_folder import build_settings

    csv = airline_csv
    run = tmp_path / "f"
    m = train(load_train(None, {"data.path": csv, "data.task": "forecast", "data.time": "month", "out": run,
                                "data.lookback": 12, "train.epochs": 3, "evaluate": False})).metrics
    settings = build_settings(run)
    assert settings["accuracy"]["metric"] == "mae" and settings["accuracy"]["max_accuracy_drop"] > 0
    cfg = load_build(None, {"target": "x86-openvino-cpu", "output": tmp_path / "f.ekb"}, base=settings)
    report = compile_model(cfg, signing_key).report
    acc = report["accuracy"]
    assert acc["metric"] == "mae" and acc["direction"] == "lower" and acc["checked"]
    assert acc["count"] == m["split"]["sizes"]["val"]  # gated on the run's validation windows
    gate = next(g for g in report["gates"] if g["name"] == "accuracy")
    assert gate["status"] == "passed" and gate["value"] <= gate["threshold"]
    assert 10 < acc["fp32"] < 500  # MAE in passengers: the bundle outputs real units
