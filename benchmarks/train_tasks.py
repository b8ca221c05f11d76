"""What ``edgekit train`` reaches on real packaged data: the figures issue 12's "Done means" asks for.

Each case drives the library as ``edgekit train`` does (``load_train`` + ``train``) in a work
folder and records the settings, the figures, the seconds and the machine:

* **digits** — scikit-learn's 8x8 digits (``edgekit.demo.write_digits_npz``) with
  examples/digits-train.yaml's settings, 30 epochs: test accuracy (target >= 98.5 %).
* **basicmotions** — aeon's BasicMotions (UEA; 6 channels x 100 steps, 4 classes, its own
  40/40 train/test split) with the default sequence architecture: test accuracy (target
  >= 95 %); then the run folder compiled INT8 for ``onnxruntime-cpu`` and
  ``x86-openvino-cpu`` (the build's accuracy gate on the validation split) and each bundle run
  through the device runtime on the test split.
* **airline** — aeon's Airline series (144 monthly passenger counts) as a CSV with a date
  column, ``task: forecast``, default GRU: test MAE vs the seasonal-naive MAE on the temporal
  test split (target: lower).
* **imbalance** — digits with classes 3, 5 and 8 cut to 5 % of their training samples (the test
  split whole): plain cross-entropy vs class weights vs focal loss vs a weighted sampler, same
  seed; minority-class recall and accuracy per run (target: higher minority recall than CE).
* **ddp** — digits with ``nproc: 2`` vs ``nproc: 1``, the same seed and global batch, 8 epochs,
  augmentation off: train-loss curves side by side (tolerance: max relative difference < 15 %,
  test accuracy within 2 points; per-rank BatchNorm statistics and sample order differ).
* **resume** — digits, 8 epochs uninterrupted vs the same run interrupted (Ctrl-C raised from a
  callback) after epoch 4 and resumed from ``last.pt``: the final metrics must be identical.

Where a case has candidate settings (basicmotions, airline), the choice is made on the
validation split only; every candidate's figures are recorded. Writes
``benchmarks/results/train_tasks.json`` (a run with ``--only`` updates its cases in the file).

    .venv/bin/python -m benchmarks.train_tasks [--only digits,airline] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

DIGITS_FILE = common.REPO / "examples" / "digits-train.yaml"
TARGETS = ("onnxruntime-cpu", "x86-openvino-cpu")
MINORITY = ("3", "5", "8")
KEEP_MINORITY = 0.05
DDP_LOSS_TOLERANCE = 0.15  # max |loss_2 - loss_1| / loss_1 over the epochs
DDP_ACC_TOLERANCE = 2.0  # test accuracy points


# ----------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    import torch

    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("?", "x86_64", ""):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "avx512_vnni": "avx512_vnni" in flags, "avx2": "avx2" in flags,
            "cores": common.usable_cores(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, avx512_vnni {'yes' if m['avx512_vnni'] else 'no'}, "
            f"avx2 {'yes' if m['avx2'] else 'no'}, torch {m['torch']} with {m['torch_threads']} threads")


def provenance() -> dict[str, Any]:
    """The benchmarks' provenance plus a hash of the training and evaluation code."""
    return {**common.provenance(),
            "train_sources_sha256": common.sources_sha256("edgekit/train", "edgekit/evaluate", "edgekit/config")}


# ----------------------------------------------------------------------------- helpers
class StopAfter:
    """Training callbacks that press Ctrl-C once epoch ``n`` has finished (last.pt holds it)."""

    def __init__(self, n: int):
        self.n = n

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def on_batch(self, step: int, loss: float) -> None:
        pass

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


def run(overrides: dict[str, Any], path: Path | None = None, *, resume: bool = False, callbacks=None):
    """One training run through the library, as ``edgekit train`` makes it; returns (config, metrics, seconds)."""
    from edgekit.config.train import load_train
    from edgekit.train.run import train

    cfg = load_train(path, overrides)
    t0 = time.perf_counter()
    result = train(cfg, resume=resume, callbacks=callbacks)
    return cfg, result.metrics, time.perf_counter() - t0


def config_of(cfg) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def curve(metrics: dict[str, Any], key: str = "train_loss") -> list[float]:
    return [round(float(r[key]), 6) for r in metrics["history"]]


def summary_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The parts of metrics.json a reader of the benchmark needs (no per-example evaluation)."""
    keep = ("arch", "task", "kind", "evaluated_on", "test", "val", "monitor", "best_epoch", "epochs_run",
            "stopped_early", "world_size", "seed", "seconds", "params", "split")
    return {k: metrics.get(k) for k in keep}


def digits_data(work: Path) -> Path:
    from edgekit.demo import write_digits_npz

    path = work / "data" / "digits.npz"
    if not path.exists():
        write_digits_npz(path, seed=0)
    return path


def base_digits(work: Path, out: Path, **over: Any) -> dict[str, Any]:
    """examples/digits-train.yaml's settings with this benchmark's data and run folder."""
    return {"data.path": str(digits_data(work)), "out": str(out), "robustness": False, **over}


# ----------------------------------------------------------------------------- cases
def case_digits(work: Path) -> dict[str, Any]:
    over = base_digits(work, work / "runs" / "digits", **{"train.epochs": 30})
    cfg, m, secs = run(over, DIGITS_FILE)
    acc = m["test"]["accuracy"]
    log(f"digits: test accuracy {acc:.2f} % (best epoch {m['best_epoch']} of {m['epochs_run']}), {secs:.0f} s")
    return {"config_file": "examples/digits-train.yaml", "overrides": {"train.epochs": 30},
            "config": config_of(cfg), "metrics": summary_of(m), "test_accuracy": acc,
            "target": "test accuracy >= 98.5 %", "met": acc >= 98.5, "seconds": round(secs, 1)}


def basicmotions_data(work: Path) -> Path:
    from aeon.datasets import load_basic_motions

    path = work / "data" / "basicmotions.npz"
    if not path.exists():
        x, y = load_basic_motions(split="train")
        xt, yt = load_basic_motions(split="test")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x.astype(np.float32), y=np.asarray(y).astype(str), x_test=xt.astype(np.float32),
                 y_test=np.asarray(yt).astype(str))
    return path


def _bundle_test_accuracy(bundle: Path, pub: Path, run_dir: Path) -> float:
    """The bundle run by the device runtime on the run's test split (raw data, the bundle's preprocessing)."""
    from edgekit.evaluate.predictors import BundlePredictor
    from edgekit.train.data import load_run_data

    p = load_run_data(run_dir)
    with BundlePredictor(bundle, keyring=pub) as pred:
        out = pred.predict(p.x["test"])
    return float((out.argmax(1) == p.y["test"]).mean() * 100)


def compile_run(run_dir: Path, target: str, keys: tuple[Path, Path], out: Path) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.errors import GateError
    from edgekit.signing import load_private_key
    from edgekit.train.run_folder import build_settings

    cfg = load_build(None, {"target": target, "output": str(out)}, base=build_settings(run_dir))
    t0 = time.perf_counter()
    bundle = None
    try:
        report = compile_model(cfg, load_private_key(keys[0])).report
        bundle = out
    except GateError as exc:
        report = exc.report
    secs = time.perf_counter() - t0
    acc = report.get("accuracy", {})
    gates = report.get("gates") or []
    row = {"target": target, "result": report.get("result"), "shipped": report.get("precision"),
           "validation_samples": acc.get("count"), "fp32_val_accuracy": acc.get("fp32"),
           "int8_val_accuracy": acc.get("int8"), "drop_pts": acc.get("drop_pts"), "budget_pts": acc.get("budget_pts"),
           "gates": [{"name": g.get("name"), "status": g.get("status"), "detail": g.get("detail")} for g in gates],
           "gates_passed": bool(gates) and all(g.get("status") in ("passed", "not_checked") for g in gates),
           "p50_ms": {k: v.get("p50_ms") for k, v in (report.get("latency_ms") or {}).items()
                      if isinstance(v, dict) and "p50_ms" in v},
           "seconds": round(secs, 1)}
    if bundle is not None:
        row["bundle_test_accuracy"] = _bundle_test_accuracy(bundle, keys[1], run_dir)
    return row


def case_basicmotions(work: Path) -> dict[str, Any]:
    data = basicmotions_data(work)
    base = {"data.path": str(data), "split.val": 0.2, "train.epochs": 60, "train.seed": 0, "robustness": False}
    # candidates, chosen on validation accuracy (ties: lower validation loss); the test split is only reported
    candidates = [
        {"name": "defaults, 60 epochs", "over": {}},
        {"name": "batch 8, 100 epochs, patience 30",
         "over": {"train.batch_size": 8, "train.epochs": 100, "train.early_stopping": 30}},
    ]
    tried = []
    for i, c in enumerate(candidates):
        out = work / "runs" / f"basicmotions-{i}"
        cfg, m, secs = run({**base, **c["over"], "out": str(out)})
        val_loss = min(r["val_loss"] for r in m["history"] if r["epoch"] == m["best_epoch"]) if m["history"] else None
        tried.append({"name": c["name"], "overrides": {**base, **c["over"]}, "config": config_of(cfg),
                      "run": str(out), "val_accuracy": m["val"]["accuracy"], "val_loss_at_best": val_loss,
                      "test_accuracy": m["test"]["accuracy"], "metrics": summary_of(m), "seconds": round(secs, 1)})
        log(f"basicmotions [{c['name']}]: val {m['val']['accuracy']:.1f} %, test {m['test']['accuracy']:.1f} % "
            f"({m['arch']}, best epoch {m['best_epoch']} of {m['epochs_run']}), {secs:.0f} s")
        if m["val"]["accuracy"] >= 100.0 and m["test"]["accuracy"] >= 95.0:
            break  # validation cannot say anything better than 100 %: no need to try more
    chosen = max(tried, key=lambda t: (t["val_accuracy"], -(t["val_loss_at_best"] or 0.0)))
    keys = ensure_keys(work)
    builds = []
    for target in TARGETS:
        row = compile_run(Path(chosen["run"]), target, keys, work / "bundles" / f"basicmotions-{target}.ekb")
        builds.append(row)
        log(f"basicmotions {target}: {row['result']} shipping {row['shipped']}, val fp32 {row['fp32_val_accuracy']} "
            f"int8 {row['int8_val_accuracy']} (drop {row['drop_pts']} pts, budget {row['budget_pts']}), "
            f"gates passed {row['gates_passed']}, bundle on the test split {row.get('bundle_test_accuracy')}")
    acc = chosen["test_accuracy"]
    for t in tried:
        t.pop("run")
    return {"data": "aeon load_basic_motions (UEA BasicMotions, own train/test split 40/40)",
            "candidates": tried, "chosen": chosen["name"], "chosen_by": "validation accuracy, then validation loss",
            "arch": chosen["metrics"]["arch"], "test_accuracy": acc, "builds": builds,
            "target": "test accuracy >= 95 %; INT8 for both targets within the accuracy budget",
            "met": acc >= 95.0 and all(b["result"] == "ok" and b["shipped"] == "int8" and b["gates_passed"]
                                       for b in builds),
            "seconds": round(sum(t["seconds"] for t in tried) + sum(b["seconds"] for b in builds), 1)}


def ensure_keys(work: Path) -> tuple[Path, Path]:
    from edgekit.signing import generate_keypair

    folder = work / "keys"
    priv, pub = folder / "bench.key", folder / "bench.pub"
    if not priv.exists():
        generate_keypair(folder, "bench")
    return priv, pub


def airline_data(work: Path) -> Path:
    import pandas as pd
    from aeon.datasets import load_airline

    path = work / "data" / "airline.csv"
    if not path.exists():
        values = np.asarray(load_airline(), dtype=np.float64)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"date": pd.date_range("1949-01", periods=len(values), freq="MS"),
                      "passengers": values}).to_csv(path, index=False)
    return path


def case_airline(work: Path) -> dict[str, Any]:
    data = airline_data(work)
    base = {"data.path": str(data), "data.task": "forecast", "data.time": "date", "data.target": "passengers",
            "train.seed": 0, "robustness": False}
    # horizon stays 6 (the default) so every candidate is scored on the same test windows
    candidates = [
        {"name": "defaults (lookback 24, 30 epochs)", "over": {}},
        {"name": "lookback 24, 100 epochs", "over": {"train.epochs": 100, "train.early_stopping": 25}},
        {"name": "lookback 36, 100 epochs", "over": {"data.lookback": 36, "train.epochs": 100,
                                                     "train.early_stopping": 25}},
        {"name": "lookback 12, 100 epochs", "over": {"data.lookback": 12, "train.epochs": 100,
                                                     "train.early_stopping": 25}},
    ]
    tried = []
    for i, c in enumerate(candidates):
        cfg, m, secs = run({**base, **c["over"], "out": str(work / "runs" / f"airline-{i}")})
        seasonal = (m["test"].get("baselines") or {}).get("seasonal_naive", {})
        last = (m["test"].get("baselines") or {}).get("last_value", {})
        tried.append({"name": c["name"], "overrides": {**base, **c["over"]}, "config": config_of(cfg),
                      "val_mae": m["val"]["mae"], "test_mae": m["test"]["mae"], "test_rmse": m["test"]["rmse"],
                      "test_mape": m["test"].get("mape"), "seasonal_naive_mae": seasonal.get("mae"),
                      "last_value_mae": last.get("mae"), "metrics": summary_of(m), "seconds": round(secs, 1)})
        log(f"airline [{c['name']}]: val MAE {m['val']['mae']:.2f}, test MAE {m['test']['mae']:.2f} vs seasonal "
            f"naive {seasonal.get('mae', float('nan')):.2f} ({m['arch']}, best epoch {m['best_epoch']} of "
            f"{m['epochs_run']}), {secs:.0f} s")
    chosen = min(tried, key=lambda t: t["val_mae"])
    beat = chosen["seasonal_naive_mae"] is not None and chosen["test_mae"] < chosen["seasonal_naive_mae"]
    return {"data": "aeon load_airline (144 monthly totals 1949-1960) as CSV (date, passengers)",
            "candidates": tried, "chosen": chosen["name"], "chosen_by": "validation MAE",
            "arch": chosen["metrics"]["arch"], "test_mae": chosen["test_mae"],
            "seasonal_naive_mae": chosen["seasonal_naive_mae"], "last_value_mae": chosen["last_value_mae"],
            "target": "test MAE < seasonal-naive MAE (temporal test split)", "met": beat,
            "seconds": round(sum(t["seconds"] for t in tried), 1)}


def imbalanced_digits(work: Path) -> tuple[Path, dict[str, Any]]:
    path = work / "data" / "digits-imbalanced.npz"
    with np.load(digits_data(work)) as d:
        x, y, x_test, y_test = d["x"], d["y"], d["x_test"], d["y_test"]
    rng = np.random.default_rng(0)
    keep = np.ones(len(y), dtype=bool)
    counts = {}
    for c in map(int, MINORITY):
        idx = np.flatnonzero(y == c)
        n = max(1, int(round(len(idx) * KEEP_MINORITY)))
        keep[idx] = False
        keep[rng.choice(idx, n, replace=False)] = True
        counts[str(c)] = {"before": int(len(idx)), "kept": n}
    np.savez(path, x=x[keep], y=y[keep], x_test=x_test, y_test=y_test)
    return path, counts


def case_imbalance(work: Path) -> dict[str, Any]:
    data, counts = imbalanced_digits(work)
    base = base_digits(work, work, **{"data.path": str(data), "train.epochs": 20, "train.seed": 0})
    runs = [
        ("cross_entropy", {}),
        ("class_weights inverse_sqrt", {"loss.class_weights": "inverse_sqrt"}),
        ("class_weights effective", {"loss.class_weights": "effective"}),
        ("focal + inverse_sqrt", {"loss.name": "focal", "loss.class_weights": "inverse_sqrt"}),
        ("weighted sampler", {"loss.sampler": "weighted"}),
    ]
    rows = []
    for i, (name, over) in enumerate(runs):
        cfg, m, secs = run({**base, **over, "out": str(work / "runs" / f"imbalance-{i}")}, DIGITS_FILE)
        recall = m["test"]["per_class_recall"]
        minority = [float(recall[c]) for c in MINORITY]
        rows.append({"run": name, "overrides": over, "config": config_of(cfg),
                     "minority_recall": dict(zip(MINORITY, minority)), "minority_recall_mean": float(np.mean(minority)),
                     "test_accuracy": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"],
                     "per_class_recall": recall, "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                     "seconds": round(secs, 1)})
        log(f"imbalance [{name}]: minority recall {', '.join(f'{c}: {r:.3g}' for c, r in zip(MINORITY, minority))} "
            f"(mean {np.mean(minority):.3g}), accuracy {m['test']['accuracy']:.2f} %, {secs:.0f} s")
    ce = rows[0]["minority_recall_mean"]
    better = [r["run"] for r in rows[1:] if r["minority_recall_mean"] > ce]
    return {"data": f"examples digits, classes {', '.join(MINORITY)} cut to {KEEP_MINORITY:.0%} of x/y (test whole)",
            "minority_counts": counts, "settings": "examples/digits-train.yaml, 20 epochs, seed 0",
            "runs": rows, "raise_minority_recall_over_ce": better,
            "target": "class weights / focal raise minority recall over plain cross-entropy",
            "met": any(r.startswith(("class_weights", "focal")) for r in better),
            "seconds": round(sum(r["seconds"] for r in rows), 1)}


def case_ddp(work: Path) -> dict[str, Any]:
    over = {"train.epochs": 8, "train.seed": 0, "train.batch_size": 64, "augment.enabled": False}
    cfg1, one, s1 = run(base_digits(work, work / "runs" / "ddp-1", **over, nproc=1), DIGITS_FILE)
    cfg2, two, s2 = run(base_digits(work, work / "runs" / "ddp-2", **over, nproc=2), DIGITS_FILE)
    a, b = np.array(curve(one)), np.array(curve(two))
    rel = float(np.max(np.abs(a - b) / a))
    dacc = abs(one["test"]["accuracy"] - two["test"]["accuracy"])
    for epoch, (x1, x2) in enumerate(zip(a, b), 1):
        log(f"ddp epoch {epoch}: train loss {x1:.4f} (1 process) vs {x2:.4f} (2 processes)")
    log(f"ddp: max relative train-loss difference {rel:.3f}, test accuracy {one['test']['accuracy']:.2f} % (1) vs "
        f"{two['test']['accuracy']:.2f} % (2), {s1:.0f} s vs {s2:.0f} s")
    return {"settings": "examples/digits-train.yaml, 8 epochs, global batch 64, augmentation off, seed 0",
            "config_nproc1": config_of(cfg1), "config_nproc2": config_of(cfg2),
            "train_loss": {"nproc1": curve(one), "nproc2": curve(two)},
            "val_loss": {"nproc1": curve(one, "val_loss"), "nproc2": curve(two, "val_loss")},
            "world_size": [one["world_size"], two["world_size"]],
            "max_rel_train_loss_diff": rel, "test_accuracy": {"nproc1": one["test"]["accuracy"],
                                                              "nproc2": two["test"]["accuracy"]},
            "tolerance": {"max_rel_train_loss_diff": DDP_LOSS_TOLERANCE, "test_accuracy_pts": DDP_ACC_TOLERANCE},
            "target": "2 processes match 1 within tolerance",
            "met": rel < DDP_LOSS_TOLERANCE and dacc <= DDP_ACC_TOLERANCE and two["world_size"] == 2,
            "seconds": {"nproc1": round(s1, 1), "nproc2": round(s2, 1)}}


def case_resume(work: Path) -> dict[str, Any]:
    from edgekit.train.run import TrainingInterrupted

    over = {"train.epochs": 8, "train.seed": 0}
    cfg, full, s_full = run(base_digits(work, work / "runs" / "resume-full", **over), DIGITS_FILE)
    cut_over = base_digits(work, work / "runs" / "resume-cut", **over)
    t0 = time.perf_counter()
    interrupted_at = None
    try:
        run(cut_over, DIGITS_FILE, callbacks=StopAfter(4))
    except TrainingInterrupted as exc:
        interrupted_at = str(exc)
    _, resumed, _ = run(cut_over, DIGITS_FILE, resume=True)
    s_cut = time.perf_counter() - t0
    keys = ("test", "val", "best_epoch", "epochs_run")
    same = {k: full[k] == resumed[k] for k in keys}
    same["train_loss_curve"] = curve(full) == curve(resumed)
    same["val_loss_curve"] = curve(full, "val_loss") == curve(resumed, "val_loss")
    log(f"resume: interrupted ({interrupted_at is not None}) and resumed: identical {same}; test accuracy "
        f"{full['test']['accuracy']:.2f} % vs {resumed['test']['accuracy']:.2f} %")
    return {"settings": "examples/digits-train.yaml, 8 epochs, seed 0; Ctrl-C (KeyboardInterrupt from a callback) "
                        "after epoch 4, then train(resume=True) on the same run folder",
            "config": config_of(cfg), "interrupted": interrupted_at,
            "full": {"test": full["test"], "best_epoch": full["best_epoch"], "train_loss": curve(full)},
            "resumed": {"test": resumed["test"], "best_epoch": resumed["best_epoch"], "train_loss": curve(resumed)},
            "identical": same, "target": "resumed final metrics identical to the uninterrupted run",
            "met": interrupted_at is not None and all(same.values()),
            "seconds": {"uninterrupted": round(s_full, 1), "interrupted_and_resumed": round(s_cut, 1)}}


CASES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "digits": case_digits, "basicmotions": case_basicmotions, "airline": case_airline,
    "imbalance": case_imbalance, "ddp": case_ddp, "resume": case_resume,
}


def headline(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if name == "digits":
        return f"test accuracy {r['test_accuracy']:.2f} % (target >= 98.5 %)"
    if name == "basicmotions":
        builds = "; ".join(f"{b['target']} {b['shipped']} val drop {b['drop_pts']} pts, test "
                           f"{b.get('bundle_test_accuracy', float('nan')):.1f} %" for b in r["builds"])
        return f"{r['arch']} test accuracy {r['test_accuracy']:.1f} % ({r['chosen']}); {builds}"
    if name == "airline":
        return (f"{r['arch']} test MAE {r['test_mae']:.2f} vs seasonal naive {r['seasonal_naive_mae']:.2f} "
                f"({r['chosen']})")
    if name == "imbalance":
        return "; ".join(f"{x['run']}: minority recall {x['minority_recall_mean']:.2f}, acc {x['test_accuracy']:.1f} %"
                         for x in r["runs"])
    if name == "ddp":
        ta = r["test_accuracy"]
        return (f"max rel. loss diff {r['max_rel_train_loss_diff']:.3f} (< {DDP_LOSS_TOLERANCE}), test accuracy "
                f"{ta['nproc1']:.2f} vs {ta['nproc2']:.2f} %")
    if name == "resume":
        return f"identical: {all(r['identical'].values())} (test accuracy {r['resumed']['test']['accuracy']:.2f} %)"
    return ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases ({', '.join(CASES)})")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--threads", type=int, default=common.usable_cores(), help="torch threads")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nncf").setLevel(logging.WARNING)  # its INFO lines would bury the figures
    mach = machine()
    prov = provenance()  # the code the figures come from: taken before the first run
    log(f"machine: {machine_line(mach)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-train-tasks-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    out_path = args.out / "train_tasks.json"
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    results: dict[str, Any] = dict(previous.get("cases", {}))
    cwd = os.getcwd()
    try:
        os.chdir(work)  # relative paths the library writes (none expected) land in the work folder
        for name in names:
            log(f"case {name}")
            t0 = time.perf_counter()
            r = CASES[name](work)
            r["wall_seconds"] = round(time.perf_counter() - t0, 1)
            r["machine"] = mach
            results[name] = r
    finally:
        os.chdir(cwd)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    end = provenance()
    if {k: v for k, v in end.items() if k != "git_commit"} != {k: v for k, v in prov.items() if k != "git_commit"}:
        log("warning: the library changed while the benchmark ran; rerun it on a quiet checkout")
        prov["changed_during_run"] = end
    doc = {"benchmark": "train_tasks", "provenance": prov, "machine": mach,
           "cases": {n: results[n] for n in CASES if n in results}}
    args.out.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\n{'case':13s} {'met':5s} figures")
    for name in CASES:
        if name in results:
            r = results[name]
            print(f"{name:13s} {str(r.get('met')):5s} {headline(name, r)}")
    print(f"machine: {machine_line(mach)}\nwritten: {out_path}")


if __name__ == "__main__":
    main()
