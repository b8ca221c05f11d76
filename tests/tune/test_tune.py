"""edgekit tune: the tune file is checked before anything trains, the space samples what it says, the front and
budget tables read a study correctly, and real studies (one process; two workers with one killed; PostgreSQL)
finish with every completed trial kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ConfigError
from edgekit.tune.config import TuneConfig, load_tune
from edgekit.tune.front import best_per_budget, pareto_front, summary, write_outputs
from edgekit.tune.space import TrialSettings, sample, split_compile
from edgekit.tune.study import StudyPlan, counts, create_or_load, finished, open_storage, should_prune, storage_url
from tests.polling import wait_until
from tests.tune.tune_files import TARGET, tune_settings, write_tune

runner = CliRunner()
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cfg(tmp_path: Path, data: Path, **extra: Any) -> TuneConfig:
    return load_tune(write_tune(tmp_path / "tune.yaml", tune_settings(data, **extra)))


# ----------------------------------------------------------------------------- the tune file
@pytest.mark.parametrize("search, message", [
    ({"compile": {"prune.ration": {"float": [0.1, 0.5]}}}, "did you mean 'ratio'"),
    ({"compile": {"quantise.qat": {"choice": ["on", "off"]}}}, "did you mean 'quantize'"),
    ({"compile": {"quantize.qatt": {"choice": ["on", "off"]}}}, "did you mean 'qat'"),
    ({"train": {"optim.lrr": {"log_float": [1e-4, 1e-2]}}}, "lrr"),
    ({"train": {"optim.lr": {"log_float": [0.0, 1e-2]}}}, "log_float needs low > 0"),
    ({"train": {"optim.lr": {"float": [0.1, 0.01]}}}, "low <= high"),
    ({"train": {"optim.lr": {"float": [0.01, 0.1], "int": [1, 2]}}}, "names one kind"),
    ({"train": {"train.epochs": {"int": [0, 2]}}}, "train.epochs"),  # 0 epochs is not a training file
    ({}, "search names no setting"),
])
def test_bad_tune_files_are_refused_before_anything_trains(tmp_path, small_digits, search, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, small_digits, search=search)


def test_heartbeat_grace_and_missing_training_file_are_refused(tmp_path, small_digits):
    with pytest.raises(ConfigError, match="at least twice heartbeat_s"):
        _cfg(tmp_path, small_digits, heartbeat_s=10, grace_s=15)
    with pytest.raises(ConfigError, match="does not exist"):
        _cfg(tmp_path, small_digits, train="no-such-train.yaml")


# ----------------------------------------------------------------------------- the search space
def test_sampling_stays_in_the_space_and_maps_to_train_and_compile_settings(tmp_path, small_digits):
    cfg = _cfg(tmp_path, small_digits, search={
        "train": {"optim.lr": {"log_float": [1e-3, 1e-1]}, "train.epochs": {"int": [1, 3]},
                  "data.image_size": {"choice": [[8, 8], [16, 16]]}},
        "compile": {"prune.ratio": {"float": [0.0, 0.6]}, "distill.alpha": {"float": [0.2, 0.8], "step": 0.2},
                    "quantize.qat": {"choice": [True, False]}},  # what YAML makes of `[on, off]`
    })
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen_prune, seen_no_prune, sizes = 0, 0, set()
    for _ in range(40):
        trial = study.ask()
        s = sample(trial, cfg)
        assert 1e-3 <= s.train["optim.lr"] <= 1e-1 and s.train["train.epochs"] in (1, 2, 3)
        sizes.add(tuple(s.train["data.image_size"]))  # a list choice comes back as a list
        assert s.build["quantize.qat"] in ("on", "off")
        assert s.build["accuracy.max_accuracy_drop"] == 30  # fixed settings ride along
        assert s.passes["distill"]["teacher"] == "self"
        assert round(s.passes["distill"]["alpha"], 9) in (0.2, 0.4, 0.6, 0.8)
        ratio = trial.params["compile.prune.ratio"]
        if ratio < 0.01:
            assert "prune" not in s.passes  # no prune pass at ratio ~0 (a pass needs a ratio > 0)
            seen_no_prune += 1
        else:
            assert s.passes["prune"] == {"finetune_epochs": 1, "round_to": 4, "ratio": ratio}
            seen_prune += 1
        study.tell(trial, [0.0, 1.0])
    assert sizes == {(8, 8), (16, 16)} and seen_prune > 30
    zero = TrialSettings(params={})
    split_compile({"prune.ratio": 0.0, "prune.finetune_epochs": 1, "quantize.qat": False}, zero)
    assert zero.passes == {} and zero.build == {"quantize.qat": "off"}
    # the same settings make a valid build and training file (what a trial hands to load_build/parse)
    from edgekit.config.build import load_build

    base = {"target": TARGET, "model.name": "m", "model.input_shape": [1, 1, 8, 8],
            "model.source": "edgekit.train.models:from_checkpoint", "model.kwargs": {"path": "x.pt"}}
    build = load_build(None, {**base, **s.build}, passes=s.passes)
    assert [p.kind for p in build.optimize] == (["prune", "distill"] if "prune" in s.passes else ["distill"])
    assert build.quantize.qat == s.build["quantize.qat"]


# ----------------------------------------------------------------------------- front and budgets
def _hand_made_study() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="hand")
    study.set_user_attr("target", TARGET)
    study.set_user_attr("measured_on", "local")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    points = [(90.0, 0.30), (88.0, 0.10), (95.0, 0.50), (85.0, 0.12), (95.0, 0.60), (70.0, 0.05), (88.0, 0.10)]
    for i, (metric, lat) in enumerate(points):
        study.add_trial(optuna.create_trial(values=[metric, lat], params={"x": i / 10}, distributions=dist,
                                            user_attrs={"bundle": f"b{i}.ekb", "precision": "int8"}))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.PRUNED, params={"x": 0.9}, distributions=dist))
    return study


def test_pareto_front_matches_optunas_and_budgets_pick_the_best_that_fits(tmp_path):
    study = _hand_made_study()
    doc = summary(study, "maximize", "p50", [0.04, 0.11, 0.3, 10.0], counts(study))
    front = [r["trial"] for r in doc["front"]]
    assert sorted(front) == sorted(t.number for t in study.best_trials)  # Optuna's own non-dominated set
    assert front == [5, 1, 6, 0, 2]  # fastest first; 3 (slower and worse than 1) and 4 (slower than 2) are out
    budgets = {b["budget_ms"]: b["best"] and b["best"]["trial"] for b in doc["budgets"]}
    assert budgets == {0.04: None, 0.11: 1, 0.3: 0, 10.0: 2}  # ties go to the faster; 0.04 fits nothing
    assert doc["budgets"][0]["fastest_ms"] == 0.05
    assert doc["counts"]["finished"] == 8 and doc["counts"]["pruned"] == 1
    files = write_outputs(doc, tmp_path, "maximize")
    assert Path(files["png"]).stat().st_size > 5000 and Path(files["png"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(files["json"]).read_text())["front"][0]["trial"] == 5
    # a metric to minimise (MAE) turns the metric's side of the order around
    rows = [{"trial": 0, "metric": 1.0, "latency_ms": 1.0}, {"trial": 1, "metric": 2.0, "latency_ms": 0.5},
            {"trial": 2, "metric": 3.0, "latency_ms": 0.8}]
    assert [r["trial"] for r in pareto_front(rows, "minimize")] == [1, 0]
    assert best_per_budget(rows, [0.9], "minimize")[0]["best"]["trial"] == 1


def test_the_pruning_rule_keeps_the_top_share_and_waits_for_startup_trials():
    others = [50.0, 60.0, 70.0, 80.0]
    assert should_prune([40.0, 64.0], others, "median", 50, 4, "maximize")  # best 64 < median 65
    assert not should_prune([40.0, 66.0], others, "median", 50, 4, "maximize")
    assert not should_prune([10.0], others, "median", 50, 5, "maximize")  # 4 trials < 5 startup trials
    assert should_prune([72.0], others, "percentile", 25, 4, "maximize")  # keep the top 25 %: >= 72.5
    assert should_prune([0.9], [0.1, 0.2, 0.3], "median", 50, 3, "minimize")  # a loss: lower is better
    assert not should_prune([0.0], others, "none", 50, 0, "maximize")


# ----------------------------------------------------------------------------- storage
def test_storage_urls(tmp_path):
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    assert storage_url("postgresql://u@h:5432/db", tmp_path) == "postgresql+psycopg://u@h:5432/db"
    assert storage_url("studies/a.db", tmp_path).startswith("sqlite:////")
    with pytest.raises(ConfigError, match="postgresql://"):
        storage_url("redis://h/0", tmp_path)


def test_a_resumed_study_must_measure_the_same_target(tmp_path, small_digits):
    cfg = _cfg(tmp_path, small_digits)
    url = storage_url(None, tmp_path)
    plan = StudyPlan(name="s", out=tmp_path, storage=url, trials=4, target=TARGET, config_path=None)
    create_or_load(plan, cfg, open_storage(url, cfg))
    create_or_load(plan, cfg, open_storage(url, cfg))  # the same settings: the study continues
    plan.target = "x86-openvino-cpu"
    with pytest.raises(ConfigError, match="target 'onnxruntime-cpu' → 'x86-openvino-cpu'"):
        create_or_load(plan, cfg, open_storage(url, cfg))


def test_a_trial_lost_with_its_worker_is_not_finished_its_retry_is(tmp_path, small_digits):
    cfg = _cfg(tmp_path, small_digits, heartbeat_s=1, grace_s=2)
    url = storage_url(None, tmp_path)
    plan = StudyPlan(name="s", out=tmp_path, storage=url, trials=4, target=TARGET, config_path=None)
    storage = open_storage(url, cfg)
    study = create_or_load(plan, cfg, storage)
    trial = study.ask()  # RUNNING, and its worker never beats again
    storage.record_heartbeat(trial._trial_id)
    time.sleep(cfg.grace_s + 1)
    optuna.storages.fail_stale_trials(study)
    lost, retry = study.get_trials(deepcopy=False)
    assert lost.state == optuna.trial.TrialState.FAIL and not finished(lost)
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["failed_trial"] == lost.number
    assert counts(study)["finished"] == 0 and counts(study)["waiting"] == 1


def test_postgresql_storage_holds_a_study(pg_url, tmp_path, small_digits):
    cfg = _cfg(tmp_path, small_digits)
    url = storage_url(pg_url, tmp_path)
    plan = StudyPlan(name="pg", out=tmp_path, storage=url, trials=2, target=TARGET, config_path=None)
    study = create_or_load(plan, cfg, open_storage(url, cfg))
    trial = study.ask()
    sample(trial, cfg)
    trial.set_user_attr("bundle", "x.ekb")
    study.tell(trial, [91.0, 0.2])
    again = create_or_load(plan, cfg, open_storage(url, cfg))  # another process on another machine
    (row,) = summary(again, "maximize", "p50", [1.0], counts(again))["front"]
    assert row["metric"] == 91.0 and row["bundle"] == "x.ekb" and "optim.lr" in row["params"]


# ----------------------------------------------------------------------------- real studies
def _tune(*args: Any) -> Any:
    result = runner.invoke(app, ["tune", *map(str, args), "--json"])
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_real_study_trains_compiles_measures_and_resumes(tmp_path, small_digits, keys):
    """Three trials on this machine, then the same command with --trials 4 continues the study."""
    conf = write_tune(tmp_path / "tune.yaml", tune_settings(small_digits))
    out = tmp_path / "study"
    doc = _tune(conf, "--trials", 3, "--target", TARGET, "--key", keys["private"], "--out", out)
    assert doc["counts"]["finished"] == 3 and doc["front"], doc["counts"]
    assert Path(doc["files"]["png"]).is_file() and doc["target"] == TARGET and doc["measured_on"] == "local"
    for row in doc["trials"]:
        assert 0 <= row["metric"] <= 100 and row["latency_ms"] > 0 and row["precision"] in ("int8", "fp32")
        assert Path(row["bundle"]).is_file()  # every complete trial keeps its signed bundle
        report = json.loads(Path(row["bundle"]).with_suffix(".report.json").read_text())
        assert report["latency_ms"][row["precision"]]["p50_ms"] == row["latency_ms"]  # the figure is the build's
        ratio = row["params"]["compile.prune.ratio"]
        passes = [p["pass"] for p in (report.get("optimize") or {}).get("passes", [])]
        assert passes == (["prune"] if ratio >= 0.01 else [])
    study = optuna.load_study(study_name="tune", storage=storage_url(None, out))
    curves = [t.user_attrs["val_curve"] for t in study.trials]
    assert all(len(c) == t.params["train.epochs"] for c, t in zip(curves, study.trials) if t.state.name == "COMPLETE")
    before = {t.number: t.values for t in study.trials if t.values}
    doc = _tune(conf, "--trials", 4, "--target", TARGET, "--key", keys["private"], "--out", out)
    assert doc["counts"]["finished"] == 4
    after = {r["trial"]: [r["metric"], r["latency_ms"]] for r in doc["trials"]}
    assert all(after[n] == v for n, v in before.items())  # the first three trials were kept, not re-run


@pytest.mark.slow
def test_two_workers_finish_twenty_trials_and_a_killed_worker_loses_no_finished_trial(tmp_path, small_digits, keys):
    """The issue's "done": 2 workers on one SQLite storage; worker 0 is SIGKILLed mid-study."""
    conf = write_tune(tmp_path / "tune.yaml", tune_settings(small_digits))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "edgekit.cli", "tune", str(conf), "--trials", "20", "--target", TARGET,
           "--workers", "2", "--key", str(keys["private"]), "--out", str(out), "--json"]
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = storage_url(None, out)

    def complete() -> dict[int, list[float]]:
        if not (out / "workers" / "0.pid").is_file():  # the study is made before the workers start: opening
            return {}  # the file earlier would race the parent creating its tables
        try:
            study = optuna.load_study(study_name="tune", storage=url)
        except KeyError:  # not created yet
            return {}
        return {t.number: t.values for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}

    try:
        wait_until(lambda: len(complete()) >= 3, timeout=600, what="3 complete trials")
        wait_until(lambda: (out / "workers" / "0.pid").is_file(), timeout=10, what="worker 0's pid file")
        pid = int((out / "workers" / "0.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        kept = complete()
        stdout, stderr = parent.communicate(timeout=1500)
    finally:
        if parent.poll() is None:
            parent.kill()
    doc = json.loads(stdout)
    assert parent.returncode == 0, stderr[-3000:]
    assert doc["workers"]["exit_codes"][0] == -signal.SIGKILL and doc["workers"]["exit_codes"][1] == 0
    assert doc["counts"]["finished"] >= 20 and doc["front"], doc["counts"]
    study = optuna.load_study(study_name="tune", storage=url)
    by_number = {t.number: t for t in study.trials}
    for number, values in kept.items():  # every trial complete before the kill is still there, unchanged
        assert by_number[number].state.name == "COMPLETE" and by_number[number].values == values
    lost = [t for t in study.trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    assert len(lost) == 1, [(t.number, t.state.name) for t in study.trials]  # the trial worker 0 was running
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost[0].number]
    assert len(retry) == 1 and finished(retry[0]) and retry[0].params == lost[0].params  # run again, same point
    # resuming the finished study runs nothing and prints the same front
    again = _tune(conf, "--trials", 20, "--target", TARGET, "--key", keys["private"], "--out", out)
    assert again["counts"] == doc["counts"] and again["front"] == doc["front"]


@pytest.mark.slow
def test_latency_on_a_device_flashes_each_trial_and_benchmarks_it_there(tmp_path, small_digits, keys, mqtt_broker):
    """A real Mosquitto and a real `edgekit-agent run` (no model at first): each trial's bundle is installed on
    the device over MQTT and its latency is the device's own benchmark."""
    fleet, device = "tunefleet", "dev000"
    settings = {"device_id": device, "fleet": fleet, "broker_url": mqtt_broker.url,
                "state_dir": str(tmp_path / "state"), "keyring": str(keys["public"]), "threads": 1,
                "telemetry_interval_s": 30.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                "shutdown_flush_s": 2.0}
    (tmp_path / "agent.json").write_text(json.dumps(settings))
    with open(tmp_path / "agent.log", "ab") as log:
        agent = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.agent.cli", "run", "--config",
                                  str(tmp_path / "agent.json"), "--log-level", "warning"], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def status() -> dict[str, Any]:
        try:
            return json.loads((tmp_path / "state" / "agent.json").read_text())
        except (OSError, ValueError):
            return {}

    try:
        wait_until(lambda: status().get("state") == "degraded", 60, "the agent connected (with no model yet)")
        conf = write_tune(tmp_path / "tune.yaml", tune_settings(small_digits))
        doc = _tune(conf, "--trials", 2, "--target", TARGET, "--key", keys["private"], "--out", tmp_path / "study",
                    "--device", device, "--fleet", fleet, "--broker", mqtt_broker.url, "--serve", "127.0.0.1:0")
    finally:
        agent.terminate()
        agent.wait(15)
    assert doc["measured_on"] == f"{fleet}/{device}" and doc["counts"]["complete"] == 2, doc["counts"]
    study = optuna.load_study(study_name="tune", storage=storage_url(None, tmp_path / "study"))
    from edgekit_runtime.fileio import sha256_file

    for t in study.trials:
        a = t.user_attrs
        assert a["latency_measured_on"] == f"{fleet}/{device}" and a["local_latency_ms"] > 0
        assert t.values[1] == a[f"{'p50'}_ms"] and t.values[1] > 0  # the device's single-stream p50
    last = max(study.trials, key=lambda t: t.number)
    assert (status().get("model") or {}).get("sha256") == sha256_file(Path(last.user_attrs["bundle"]))


@pytest.mark.slow
def test_trials_that_all_fail_the_same_way_stop_the_study_with_the_cause(tmp_path, small_digits, keys):
    """A wrong setting every trial shares (here pruner.monitor) fails 3 trials in a row, then the command stops."""
    doc = tune_settings(small_digits, pruner={"monitor": "top1"})
    doc["search"]["train"] = {"optim.lr": {"log_float": [0.005, 0.03]}}
    doc["fixed"]["train"]["train.epochs"] = 1
    conf = write_tune(tmp_path / "tune.yaml", doc)
    result = runner.invoke(app, ["tune", str(conf), "--trials", "10", "--target", TARGET, "--key",
                                 str(keys["private"]), "--out", str(tmp_path / "study"), "--json"])
    assert result.exit_code == 2, result.stdout
    err = json.loads(result.stdout)["error"]
    assert "3 trials in a row failed" in err["message"] and "pruner.monitor 'top1'" in err["message"]
    assert "accuracy" in err["message"]  # what the training loop does report
    study = optuna.load_study(study_name="tune", storage=storage_url(None, tmp_path / "study"))
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
