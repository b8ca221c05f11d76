"""Structured pruning that pays on the device: MACs, INT8 p50 latency and accuracy, unpruned vs pruned.

A ResNet-18-style network (torchvision's resnet18 from ``edgekit train``'s architecture zoo, 1 input
channel) is trained with ``edgekit train`` on scikit-learn's digits upscaled to 32×32 (the 8×8 images
resized with bilinear interpolation into an .npz in the work folder; x_test/y_test is the held-out
test split). The run is compiled twice for ``x86-openvino-cpu`` INT8 by the project's pipeline:
as trained, and with the build's prune pass (``--prune-ratio``, fine-tuned with the run's recipe).
Both signed bundles are loaded with ``edgekit_runtime.load`` and measured in ONE interleaved
single-stream run (``edgekit_runtime.bench.compare``: queries alternate between the bundles, so load
and clock drift hit both), and both are scored on the test split through the runtime.

Run from anywhere (the repository root is put on sys.path)::

    .venv/bin/python benchmarks/compression.py [--ratio 0.5] [--epochs 12] [--finetune-epochs 5]

Writes ``--out``/compression.json (everything, with the system description) and compression.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

TARGET = "x86-openvino-cpu"
SIDE = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18", help="architecture from edgekit train's zoo")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--ratio", type=float, default=0.5, help="prune ratio (channels removed per layer)")
    p.add_argument("--iterations", type=int, default=1, help="prune steps")
    p.add_argument("--finetune-epochs", type=int, default=6, help="fine-tuning epochs after pruning")
    p.add_argument("--target", default=TARGET)
    p.add_argument("--threads", type=int, default=common.usable_cores(), help="inference threads")
    p.add_argument("--queries", type=int, default=300, help="single-stream queries per bundle (at least)")
    p.add_argument("--seconds", type=float, default=5.0, help="single-stream duration (at least)")
    p.add_argument("--side", type=int, default=SIDE, help="digits upscaled to SIDE×SIDE (more compute per layer "
                                                           "as it grows); results for a side other than 32 are "
                                                           "written as compression_sideN.{json,md}")
    p.add_argument("--work", type=Path, default=None, help="work folder [default: the cache's compression[_sideN]]")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--retrain", action="store_true", help="train again even when the work folder has the run")
    p.add_argument("--markdown-only", action="store_true", help="only re-render compression.md from the JSON")
    return p.parse_args(argv)


def digits_upscaled(path: Path, side: int) -> Path:
    """scikit-learn's digits, 8×8 → side×side (bilinear), uint8 (N, 1, side, side); x_test/y_test held out."""
    import cv2

    from edgekit.demo import write_digits_npz

    small = np.load(write_digits_npz(path.with_name("digits8.npz")))

    def up(x: np.ndarray) -> np.ndarray:
        return np.stack([cv2.resize(img[0], (side, side), interpolation=cv2.INTER_LINEAR) for img in x])[:, None]

    np.savez_compressed(path, x=up(small["x"]), y=small["y"], x_test=up(small["x_test"]), y_test=small["y_test"])
    return path


def train_run(args, data: Path) -> Path:
    from edgekit.config.train import load_train
    from edgekit.demo import TRAIN_FILE
    from edgekit.train.run import train

    run = args.work / f"run-{args.arch}"
    if (run / "metrics.json").is_file() and not args.retrain:
        log(f"reusing the run {run}")
        return run
    if run.exists():
        import shutil

        shutil.rmtree(run)
    log(f"training {args.arch} on digits {args.side}×{args.side} for {args.epochs} epochs")
    cfg = load_train(TRAIN_FILE, {"data.path": data, "out": run, "model.arch": args.arch,
                                  "train.epochs": args.epochs, "train.early_stopping": None,
                                  "evaluate": False, "robustness": False})
    train(cfg)
    return run


def compile_run(run: Path, args, name: str, prune: dict[str, Any] | None) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.signing import load_private_key
    from edgekit.train.run_folder import build_settings

    out = args.work / f"{name}.ekb"
    cfg = load_build(None, {"target": args.target, "output": out, "runtime.threads": args.threads,
                            "model.name": f"digits{args.side}-{name}"},
                     base=build_settings(run), passes={"prune": prune} if prune else None)
    log(f"compiling {name} for {args.target}" + (f" with {prune}" if prune else ""))
    return compile_model(cfg, load_private_key(common.ensure_keys()["private"])).report


def test_accuracy(bundle: Path, x: np.ndarray, y: np.ndarray) -> float:
    from edgekit.evaluate.predictors import BundlePredictor

    pred = BundlePredictor(bundle, keyring=common.ensure_keys()["public"])
    try:
        return float((pred.predict(x).argmax(1) == y).mean() * 100)
    finally:
        pred.close()


def markdown(doc: dict[str, Any]) -> str:
    r, s = doc["results"], doc["system"]
    u, p = r["unpruned"], r["pruned"]
    rows = [
        ("MACs (M)", f"{u['macs'] / 1e6:.1f}", f"{p['macs'] / 1e6:.1f}", f"{u['macs'] / p['macs']:.2f}× fewer"),
        ("parameters (M)", f"{u['params'] / 1e6:.2f}", f"{p['params'] / 1e6:.2f}",
         f"{u['params'] / p['params']:.2f}× fewer"),
        ("INT8 bundle (KiB)", f"{u['bundle_bytes'] / 1024:.0f}", f"{p['bundle_bytes'] / 1024:.0f}", ""),
        ("INT8 p50 (ms)", f"{u['int8_p50_ms']:.3f}", f"{p['int8_p50_ms']:.3f}",
         f"{r['int8_p50_speedup']:.2f}× faster"),
        ("INT8 p90 (ms)", f"{u['int8_p90_ms']:.3f}", f"{p['int8_p90_ms']:.3f}", ""),
        ("FP32 p50 in the build (ms)", f"{u['fp32_p50_ms']:.3f}", f"{p['fp32_p50_ms']:.3f}",
         f"{u['fp32_p50_ms'] / p['fp32_p50_ms']:.2f}×"),
        ("test top-1 % (INT8 through the runtime)", f"{u['test_top1']:.2f}", f"{p['test_top1']:.2f}",
         f"{p['test_top1'] - u['test_top1']:+.2f} pt"),
        ("val top-1 % (torch FP32)", f"{u['val_top1']:.2f}", f"{p['val_top1']:.2f}", ""),
    ]
    done = doc["done"]
    lines = [
        "# Structured pruning: unpruned vs pruned INT8 bundle", "",
        f"{doc['generated_at']} · `{doc['command']}`", "",
        f"{doc['settings']['arch']} trained with `edgekit train` for {doc['settings']['epochs']} epochs on digits "
        f"upscaled to {doc['settings'].get('side', 32)}×{doc['settings'].get('side', 32)}; pruned with ratio {doc['settings']['ratio']} (round_to "
        f"{r['pruned']['round_to']}, {doc['settings']['finetune_epochs']} fine-tuning epochs); both compiled for "
        f"{doc['settings']['target']} INT8 and measured in one interleaved single-stream run "
        f"({doc['settings']['threads']} threads, batch 1).", "",
        f"Machine: {s.get('cpu', '?')}, {s.get('usable_cores', '?')} usable cores ({', '.join(f for f in s.get('cpu_flags', []) if f in ('avx512_vnni', 'amx_int8', 'avx512_bf16')) or 'no VNNI/AMX'}); other processes used "
        f"{doc['cpu_during'].get('other_processes_pct', 0):.0f} % of the CPU during the measurement.", "",
        "| | unpruned | pruned | |", "|---|---:|---:|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "",
        "Done means: ≥ 2× fewer MACs " + ("✔" if done["macs"] else "✘") + ", ≥ 1.5× lower INT8 p50 "
        + ("✔" if done["latency"] else "✘") + ", metric drop ≤ 1 pt " + ("✔" if done["metric"] else "✘") + ".",
    ]
    if doc.get("notes"):
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    suffix = "" if args.side == SIDE else f"_side{args.side}"
    stem = f"compression{suffix}"
    if args.work is None:
        args.work = common.CACHE / f"compression{suffix}"
    if args.markdown_only:
        return common.write_results(args.out, stem, None, markdown)
    common.ensure_importable()
    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, compare, system_description

    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = digits_upscaled(args.work / f"digits{args.side}.npz", args.side)
    run = train_run(args, data)
    t_trained = time.perf_counter()
    reports = {"unpruned": compile_run(run, args, "unpruned", None),
               "pruned": compile_run(run, args, "pruned", {"ratio": args.ratio, "iterations": args.iterations,
                                                           "finetune_epochs": args.finetune_epochs})}
    t_built = time.perf_counter()

    d = np.load(data)
    x_test, y_test = d["x_test"], d["y_test"]
    keys = common.ensure_keys()
    bundles = {k: edgekit_runtime.load(args.work / f"{k}.ekb", keyring=keys["public"], threads=args.threads)
               for k in reports}
    from edgekit.train.data import split_arrays

    feeds_x = split_arrays(str(run), "val", count=64, labels=False)
    name = bundles["unpruned"].inputs[0].name
    feeds = [{name: feeds_x[i : i + 1]} for i in range(len(feeds_x))]
    log(f"benchmarking unpruned vs pruned INT8 interleaved ({args.threads} threads)")
    mon = common.CpuMonitor().start()
    res = compare(bundles, feeds, BenchSettings(warmup=30, min_queries=args.queries, min_duration_s=args.seconds,
                                                 max_duration_s=300, offline_batch=None, seed=0))
    cpu_during = mon.stop()
    for b in bundles.values():
        b.close()

    results: dict[str, Any] = {}
    opt = next(s for s in reports["pruned"]["stages"] if s["name"] == "optimize")["passes"][0]
    for k, rep in reports.items():
        inf = res["models"][k]["single_stream"]["inference"]
        side = opt["before"] if k == "unpruned" else opt["after"]
        results[k] = {
            "macs": side["macs"], "params": side["params"], "onnx_bytes": side["onnx_bytes"],
            "val_top1": side["metric"], "fp32_p50_ms": side["fp32_p50_ms"],
            "precision": rep["precision"], "bundle_bytes": rep["bundle_bytes"],
            "int8_p50_ms": inf["p50_ms"], "int8_p90_ms": inf["p90_ms"], "int8_p99_ms": inf["p99_ms"],
            "build_latency_ms": rep.get("latency_ms"),
            "test_top1": test_accuracy(args.work / f"{k}.ekb", x_test, y_test),
        }
    results["pruned"].update(round_to=opt["round_to"], channels=opt["channels"], steps=opt["steps"])
    results["macs_reduction"] = results["unpruned"]["macs"] / results["pruned"]["macs"]
    results["int8_p50_speedup"] = results["unpruned"]["int8_p50_ms"] / results["pruned"]["int8_p50_ms"]
    results["test_top1_drop"] = results["unpruned"]["test_top1"] - results["pruned"]["test_top1"]
    notes = []
    if any(r["precision"] != "int8" for r in results.values() if isinstance(r, dict) and "precision" in r):
        notes.append("a bundle shipped FP32 (a gate refused INT8): the latency comparison is not INT8 vs INT8")
    doc = {
        **common.run_header("compression", argv),
        "settings": {"arch": args.arch, "side": args.side, "epochs": args.epochs, "ratio": args.ratio, "iterations": args.iterations,
                     "finetune_epochs": args.finetune_epochs, "target": args.target, "threads": args.threads,
                     "queries": args.queries, "seconds": args.seconds, "precision": "int8", "batch": 1},
        "system": system_description(),
        "provenance": common.provenance(),
        "cpu_during": cpu_during,
        "results": results,
        "compare": res,
        "done": {"macs": results["macs_reduction"] >= 2, "latency": results["int8_p50_speedup"] >= 1.5,
                 "metric": results["test_top1_drop"] <= 1.0},
        "notes": notes,
        "seconds": {"train": round(t_trained - t_start, 1), "compile": round(t_built - t_trained, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    return common.write_results(args.out, stem, doc, markdown, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
