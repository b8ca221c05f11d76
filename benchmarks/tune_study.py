"""edgekit tune end to end: two worker processes share one SQLite study of 20 trials; one is killed mid-study.

Each trial trains ResNetSmall (16/32 wide) on 1200 of scikit-learn's digits for 2–4 epochs with a sampled
learning rate, compiles it for ``onnxruntime-cpu`` INT8 with a sampled prune ratio (two fine-tuning
epochs), and scores the bundle by its INT8 validation top-1 (through ONNX Runtime) and its p50 latency
measured by the compile's evaluate stage on this machine. After ``--kill-after`` complete trials,
worker 0 is SIGKILLed; the benchmark checks that every trial complete before the kill is still there
with the same values, that the killed worker's trial was failed and run again, and that the study
reaches ``--trials`` finished trials. Then it prints the Pareto front.

Run from anywhere (the repository root is put on sys.path)::

    .venv/bin/python benchmarks/tune_study.py [--trials 20] [--workers 2] [--kill-after 3]

Writes ``--out``/tune_study.json and tune_study.md. Wall-clock figures depend on the machine's load
(both workers and the latency measurement share its cores); CPU seconds per trial are steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

TARGET = "onnxruntime-cpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kill-after", type=int, default=3, help="complete trials before worker 0 is killed")
    p.add_argument("--target", default=TARGET)
    p.add_argument("--samples", type=int, default=1200, help="digits used for training + validation")
    p.add_argument("--work", type=Path, default=common.CACHE / "tune_study")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def tune_file(work: Path, data: Path) -> Path:
    doc = {
        "train": str(common.REPO / "examples" / "digits-train.yaml"),
        "study": "tune_study",
        "fixed": {
            "train": {"data.path": str(data), "model.kwargs": {"widths": [16, 32]}, "train.batch_size": 64,
                      "optim.schedule": "constant", "optim.warmup_epochs": 0, "augment.enabled": False},
            "compile": {"prune.finetune_epochs": 2, "prune.round_to": 4, "accuracy.max_accuracy_drop": 30,
                        "quantize.qat": "off"},
        },
        "search": {"train": {"optim.lr": {"log_float": [0.005, 0.05]}, "train.epochs": {"int": [2, 4]}},
                   "compile": {"prune.ratio": {"float": [0.0, 0.7]}}},
        "objectives": {"latency": "p50", "budgets_ms": [0.03, 0.04, 0.06, 0.1]},
        # keep the top 75 % from epoch 2 on: the median rule against the few survivors of a 20-trial study
        # pruned 15 of 20 here, leaving a one-point front
        "pruner": {"type": "percentile", "percentile": 75, "startup_trials": 4, "warmup_epochs": 2},
        "sampler": {"type": "tpe", "startup_trials": 6},
        "heartbeat_s": 2,
        "grace_s": 6,
    }
    path = work / "tune.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def small_digits(work: Path, samples: int) -> Path:
    from edgekit.demo import write_digits_npz

    full = np.load(write_digits_npz(work / "digits_full.npz"))
    path = work / "digits.npz"
    np.savez_compressed(path, x=full["x"][:samples], y=full["y"][:samples], x_test=full["x_test"][:150],
                        y_test=full["y_test"][:150])
    return path


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    common.ensure_importable()
    import optuna

    from edgekit.tune.study import finished, storage_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    keys = common.ensure_keys()
    conf = tune_file(args.work, small_digits(args.work, args.samples))
    out = args.work / "study"
    url = storage_url(None, out)
    cmd = [sys.executable, "-m", "edgekit.cli", "tune", str(conf), "--trials", str(args.trials), "--target",
           args.target, "--workers", str(args.workers), "--key", str(keys["private"]), "--out", str(out), "--json"]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.REPO)

    def complete() -> dict[int, list[float]]:
        if not (out / "workers" / "0.pid").is_file():  # the study is made before the workers start: opening
            return {}  # the file earlier would race the parent creating its tables
        try:
            study = optuna.load_study(study_name="tune_study", storage=url)
        except KeyError:
            return {}
        return {t.number: t.values for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}

    while len(complete()) < args.kill_after:
        if parent.poll() is not None:
            raise SystemExit(f"edgekit tune exited {parent.returncode} before the kill:\n{parent.stderr.read()}")
        time.sleep(1)
    pid = int((out / "workers" / "0.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    killed_at = time.perf_counter() - t0
    kept = complete()
    log(f"killed worker 0 (pid {pid}) after {killed_at:.0f} s with {len(kept)} complete trials")
    stdout, stderr = parent.communicate()
    wall = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if parent.returncode != 0:
        raise SystemExit(f"edgekit tune exited {parent.returncode}:\n{stderr[-4000:]}")
    doc = json.loads(stdout)
    study = optuna.load_study(study_name="tune_study", storage=url)
    trials = study.trials
    by_number = {t.number: t for t in trials}
    still_there = all(by_number[n].state.name == "COMPLETE" and by_number[n].values == v for n, v in kept.items())
    lost = [t.number for t in trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    retried = {t.number: t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    seconds = [t.user_attrs["seconds"] for t in trials if t.state.name == "COMPLETE" and "seconds" in t.user_attrs]
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(cmd[1:]).replace(str(common.REPO) + "/", ""),
        "system": __import__("edgekit_runtime.bench", fromlist=["system_description"]).system_description(),
        "provenance": common.provenance(),
        "trials_asked": args.trials, "workers": args.workers, "target": args.target,
        "counts": doc["counts"], "worker_exit_codes": doc["workers"]["exit_codes"],
        "kill": {"after_complete": len(kept), "at_s": round(killed_at, 1), "complete_before_kill": sorted(kept),
                 "all_kept_unchanged": still_there, "lost_trials": lost, "retries": retried,
                 "retries_finished": all(finished(by_number[n]) for n in retried)},
        "wall_s": round(wall, 1), "cpu_s_all_processes": round(cpu.ru_utime + cpu.ru_stime, 1),
        "trial_wall_s": {"median": float(np.median(seconds)), "max": float(np.max(seconds))} if seconds else None,
        "front": doc["front"], "budgets": doc["budgets"],
        "trials": [{"trial": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                    "worker": t.user_attrs.get("worker"), "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
                    "error": t.user_attrs.get("error"), "retry_of": t.system_attrs.get("failed_trial")}
                   for t in trials],
        "front_png": doc["files"]["png"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_study.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "tune_study.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    c, k = r["counts"], r["kill"]
    lines = [
        f"# edgekit tune: {r['trials_asked']} trials, {r['workers']} workers, one killed ({r['when']})",
        "",
        f"`{r['command']}` on {r['system'].get('cpu')} ({r['system'].get('usable_cores')} usable cores, shared "
        f"with other work while measured: wall-clock figures are noisy).",
        "",
        f"- finished trials: **{c['finished']}** ({c['complete']} complete, {c['pruned']} pruned, {c['fail']} "
        f"failed); worker exit codes {r['worker_exit_codes']} (-9: SIGKILL)",
        f"- worker 0 killed at {k['at_s']} s with {k['after_complete']} complete trials: all kept unchanged "
        f"**{k['all_kept_unchanged']}**; lost trial(s) {k['lost_trials']} run again as {k['retries']} "
        f"(finished: {k['retries_finished']})",
        f"- wall {r['wall_s']} s; CPU {r['cpu_s_all_processes']} s over all processes "
        f"({r['cpu_s_all_processes'] / max(1, c['finished']):.1f} CPU s per finished trial); trial wall median "
        f"{r['trial_wall_s']['median']:.1f} s",
        "",
        "## Pareto front (INT8 top-1 on the validation split via ONNX Runtime vs p50 ms from the compile)",
        "",
        "| trial | top-1 % | p50 ms | lr | epochs | prune ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in r["front"]:
        p = f["params"]
        lines.append(f"| {f['trial']} | {f['metric']:.1f} | {f['latency_ms']:.4f} | {p.get('optim.lr', 0):.3g} | "
                     f"{p.get('train.epochs')} | {p.get('compile.prune.ratio', 0):.2f} |")
    lines += ["", "## Best bundle per latency budget", "", "| budget ms | trial | top-1 % | p50 ms |",
              "| ---: | ---: | ---: | ---: |"]
    for b in r["budgets"]:
        best = b["best"]
        lines.append(f"| {b['budget_ms']:g} | " + (f"{best['trial']} | {best['metric']:.1f} | "
                                                   f"{best['latency_ms']:.4f} |" if best else "— | — | — |"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
