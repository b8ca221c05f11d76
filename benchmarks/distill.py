"""Does distillation pay? A tiny student distilled from a larger teacher vs the same student trained alone.

Issue 13's "Done means": on a packaged real data set, over 3 seeds, the distilled student beats
the student trained alone with the same seed and epochs (mean ± spread).

* **Data**: scikit-learn's 8x8 digits (``edgekit.demo.write_digits_npz``: 1,437 train+validation
  images, a held-out test split of 360 that no run trains or selects on).
* **Teacher**: ``resnet_small`` at its default widths (32/64/128, about 308 k parameters), trained
  once with examples/digits-train.yaml's settings (seed 0).
* **Student**: ``resnet_small`` with widths ``--student-widths`` (default 8/16: about 5 k parameters),
  the same training file and epochs. For each seed it is trained twice, through ``edgekit train``'s
  library path (``load_train`` + ``train``): alone, and with a ``distill:`` section naming the
  teacher's run folder. Same seed means the same split, initial weights, sample order and
  augmentation; only the loss differs.

The figure is the test accuracy of each run's best checkpoint (selected on its validation split).
Writes ``benchmarks/results/distill.json`` and ``distill.md`` with the machine and CPU seconds.

    .venv/bin/python -m benchmarks.distill [--epochs 20] [--temperature 4] [--alpha 0.7] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402
from benchmarks.train_tasks import machine, machine_line, provenance  # noqa: E402

TRAIN_FILE = common.REPO / "examples" / "digits-train.yaml"
# What was tried before the figures in results/distill.md (this machine, the same data and seeds 0-2, a teacher
# trained the same way but with 2 torch threads: 99.72 % test; test accuracy, mean over the seeds). The headline keeps the library's defaults (T 4, alpha 0.7), not the
# best of these: picking the best on the test split would flatter distillation.
TRIED = [
    "student widths 4/8 (1,382 parameters), T 4, alpha 0.7, 20 epochs, stopped after 2 seeds: alone 83.89 / "
    "85.28, distilled 83.89 / 84.17 (a tie and a loss: the student underfits, still improving at epoch 20); "
    "so the student became widths 8/16",
    "widths 8/16, T 4, alpha 0.7, features on: alone 96.67 ± 0.82, distilled 97.41 ± 0.13 (+0.74; 2 wins, 1 tie)",
    "widths 8/16, T 4, alpha 0.9: alone 96.67, distilled 96.76 (+0.09; 2 wins, 1 loss)",
    "widths 8/16, T 2, alpha 0.7: alone 96.67, distilled 96.48 (-0.19; 1 tie, 2 losses)",
]
RESULTS = common.REPO / "benchmarks" / "results"


def _run(overrides: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
    """One run as ``edgekit train`` makes it: (metrics, wall seconds, process CPU seconds)."""
    from edgekit.config.train import load_train
    from edgekit.train.run import train

    cfg = load_train(TRAIN_FILE, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = train(cfg).metrics
    return metrics, time.perf_counter() - t0, time.process_time() - c0


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 3), "std": round(statistics.pstdev(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--student-widths", default="8,16")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--features", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on a shared machine)")
    ap.add_argument("--reuse-teacher", action="store_true", help="keep a teacher already trained in --work")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true", help="print the figures, leave the results files alone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from edgekit.demo import write_digits_npz

    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-distill-"))
    data = write_digits_npz(work / "data" / "digits.npz")
    mach = machine()
    log(f"machine: {machine_line(mach)}; work in {work}")
    base = {"data.path": data, "robustness": False, "evaluate": False}
    widths = [int(w) for w in args.student_widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    teacher_dir = work / "runs" / "teacher"
    if args.reuse_teacher and (teacher_dir / "metrics.json").is_file():
        tm = json.loads((teacher_dir / "metrics.json").read_text())
        t_wall = t_cpu = float("nan")
    else:
        shutil.rmtree(teacher_dir, ignore_errors=True)
        tm, t_wall, t_cpu = _run({**base, "out": teacher_dir, "train.epochs": args.teacher_epochs, "train.seed": 0})
    teacher = {"arch": tm["arch"], "params": tm["params"], "epochs": args.teacher_epochs,
               "test_accuracy": tm["test"]["accuracy"], "seconds": round(t_wall, 1), "cpu_seconds": round(t_cpu, 1)}
    log(f"teacher: {tm['params']} parameters, test accuracy {tm['test']['accuracy']:.2f} % ({t_wall:.0f} s)")

    kd = {"teacher": str(teacher_dir), "temperature": args.temperature, "alpha": args.alpha,
          "features": args.features}
    pairs = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for name, extra in (("alone", {}), ("distilled", {"distill": kd})):
            out = work / "runs" / f"student-{name}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            m, wall, cpu = _run({**base, **extra, "out": out, "train.epochs": args.epochs, "train.seed": seed,
                                 "model.kwargs": {"widths": widths}})
            row[name] = {"test_accuracy": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"],
                         "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                         "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
            row["params"] = m["params"]
            log(f"seed {seed} {name:>9}: test accuracy {m['test']['accuracy']:.2f} % "
                f"(best epoch {m['best_epoch']}/{m['epochs_run']}, {wall:.0f} s)")
        row["gain"] = round(row["distilled"]["test_accuracy"] - row["alone"]["test_accuracy"], 3)
        pairs.append(row)

    alone = _spread([p["alone"]["test_accuracy"] for p in pairs])
    distilled = _spread([p["distilled"]["test_accuracy"] for p in pairs])
    result = {
        "data": "scikit-learn digits (8x8, 10 classes): 1,437 train+validation (split.val 0.2), 360 held-out test",
        "train_file": str(TRAIN_FILE.relative_to(common.REPO)),
        "teacher": teacher,
        "student": {"arch": "resnet_small", "widths": widths, "params": pairs[0]["params"], "epochs": args.epochs},
        "distill": {k: v for k, v in kd.items() if k != "teacher"},
        "seeds": seeds, "pairs": pairs,
        "alone": alone, "distilled": distilled,
        "mean_gain": round(distilled["mean"] - alone["mean"], 3),
        "wins": sum(p["gain"] > 0 for p in pairs), "ties": sum(p["gain"] == 0 for p in pairs),
        "distillation_wins_on_mean": distilled["mean"] > alone["mean"],
        "machine": mach, "provenance": provenance(),
        "tried": TRIED if (args.student_widths, args.temperature, args.alpha, args.features, args.epochs) == (
            "8,16", 4.0, 0.7, False, 20) else [],
        "note": "Wall seconds were taken on a shared machine (other jobs running): compare CPU seconds",
    }
    log(f"alone {alone['mean']:.2f} ± {alone['std']:.2f} (min {alone['min']:.2f}, max {alone['max']:.2f}); "
        f"distilled {distilled['mean']:.2f} ± {distilled['std']:.2f} (min {distilled['min']:.2f}, "
        f"max {distilled['max']:.2f}); gain {result['mean_gain']:+.2f} points")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "distill.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (RESULTS / "distill.md").write_text(markdown(result))
        log(f"wrote {RESULTS / 'distill.json'} and distill.md")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict[str, Any]) -> str:
    t, s, d = r["teacher"], r["student"], r["distill"]
    lines = [
        "# Distillation: a tiny student, alone vs distilled from a larger teacher",
        "",
        f"Data: {r['data']}. Training file `{r['train_file']}`, the same for every run.",
        f"Teacher: `{t['arch']}` default widths, {t['params']:,} parameters, {t['epochs']} epochs, "
        f"test accuracy **{t['test_accuracy']:.2f} %**.",
        f"Student: `{s['arch']}` widths {s['widths']}, {s['params']:,} parameters, {s['epochs']} epochs; "
        f"distilled with T = {d['temperature']}, α = {d['alpha']}, feature matching "
        f"{'on' if d['features'] else 'off'}.",
        "Each seed trains the student twice with the same split, initial weights, sample order and "
        "augmentation; test accuracy of the best checkpoint (chosen on the validation split).",
        "",
        "| seed | alone | distilled | gain (points) |",
        "| --- | --- | --- | --- |",
    ]
    for p in r["pairs"]:
        lines.append(f"| {p['seed']} | {p['alone']['test_accuracy']:.2f} % | {p['distilled']['test_accuracy']:.2f} % "
                     f"| {p['gain']:+.2f} |")
    a, b = r["alone"], r["distilled"]
    lines += [
        f"| **mean ± std (min–max)** | **{a['mean']:.2f} ± {a['std']:.2f}** ({a['min']:.2f}–{a['max']:.2f}) "
        f"| **{b['mean']:.2f} ± {b['std']:.2f}** ({b['min']:.2f}–{b['max']:.2f}) | **{r['mean_gain']:+.2f}** |",
        "",
        f"Distillation wins on {r['wins']} of {len(r['pairs'])} seeds ({r['ties']} tied). One test image is "
        f"{100 / 360:.2f} points: the gains are a few images per seed, never negative here but small.",
        "",
        f"Machine: {machine_line(r['machine'])}. {r['note']}; student runs took "
        f"{statistics.fmean(p['alone']['cpu_seconds'] for p in r['pairs']):.0f} CPU s alone and "
        f"{statistics.fmean(p['distilled']['cpu_seconds'] for p in r['pairs']):.0f} CPU s distilled (mean), "
        f"the teacher {t['cpu_seconds']:.0f} CPU s.",
    ]
    if r.get("tried"):
        lines += ["", "Settings tried before these (same seeds; a teacher trained the same way with 2 torch threads, "
                  "99.72 % test; test accuracy means):", ""]
        lines += [f"- {x}" for x in r["tried"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
