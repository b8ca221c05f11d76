"""Prune ratio 'auto': the least ratio whose INT8 p99, measured on the target's engine, meets a latency budget.

The same run as ``benchmarks/compression.py`` (resnet18 trained with ``edgekit train`` on digits upscaled
to 32×32; its cached work folder is reused). First the unpruned model is compiled for ``x86-openvino-cpu``
INT8 and its p99 read from the build's evaluate stage; the budget is ``--fraction`` of that p99 (a device
that needs the model faster than it is). Then the run is compiled with ``--prune-ratio auto`` and that
budget: the optimize stage prunes ``search_points`` ratios from 0 to ``max_ratio`` (one step, no
fine-tuning), quantizes each as the build does and times them in one interleaved run, picks the least
ratio that meets the budget (together with every larger one), prunes at it with fine-tuning, and the
build's own evaluate stage measures the shipped bundle against the same budget.

    .venv/bin/python benchmarks/prune_search.py [--fraction 0.6] [--finetune-epochs 6]

Writes ``--out``/prune_search.json and prune_search.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks import compression  # noqa: E402
from benchmarks.common import log  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=float, default=0.6, help="budget = this × the unpruned INT8 p99")
    p.add_argument("--budget-ms", type=float, default=None, help="a fixed budget instead of --fraction")
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--search-points", type=int, default=6)
    p.add_argument("--max-ratio", type=float, default=0.75)
    p.add_argument("--target", default=compression.TARGET)
    p.add_argument("--threads", type=int, default=common.usable_cores())
    p.add_argument("--work", type=Path, default=common.CACHE / "compression")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--markdown-only", action="store_true")
    return p.parse_args(argv)


def compile_with(run: Path, args, name: str, budget: float | None, prune: dict[str, Any] | None) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.signing import load_private_key
    from edgekit.train.run_folder import build_settings

    overrides = {"target": args.target, "output": args.work / f"{name}.ekb", "runtime.threads": args.threads,
                 "model.name": f"digits32-{name}"}
    if budget is not None:
        overrides["limits.latency_budget_ms"] = budget
    cfg = load_build(None, overrides, base=build_settings(run), passes={"prune": prune} if prune else None)
    log(f"compiling {name}" + (f" with {prune}, budget {budget} ms" if prune else ""))
    return compile_model(cfg, load_private_key(common.ensure_keys()["private"])).report


def markdown(doc: dict[str, Any]) -> str:
    r, s = doc["results"], doc["system"]
    flags = ", ".join(f for f in s.get("cpu_flags", []) if f in ("avx512_vnni", "amx_int8", "avx512_bf16"))
    lines = [
        "# Prune ratio 'auto' against a latency budget", "",
        f"{doc['generated_at']} · `{doc['command']}`", "",
        f"resnet18 trained with `edgekit train` on digits upscaled to 32×32, compiled for {doc['settings']['target']} "
        f"INT8 ({doc['settings']['threads']} threads, batch 1). Budget: {r['budget_ms']:.3f} ms p99 "
        f"({doc['settings']['fraction']} × the unpruned INT8 p99 of {r['unpruned_p99_ms']:.3f} ms measured by the "
        f"unpruned build).", "",
        f"Machine: {s.get('cpu', '?')}, {s.get('usable_cores', '?')} usable cores ({flags or 'no VNNI/AMX'}).", "",
        "Ratios measured by the optimize stage (pruned in one step without fine-tuning, INT8 PTQ, one "
        "interleaved run on the target's engine):", "",
        "| ratio | MMACs | INT8 p50 ms | INT8 p99 ms | meets budget |", "|---:|---:|---:|---:|:---:|",
        *[f"| {p['ratio']:g} | {p['macs'] / 1e6:.1f} | {p['p50_ms']:.3f} | {p['p99_ms']:.3f} | "
          f"{'✔' if p['meets_budget'] else '✘'} |" for p in r["probes"]], "",
        f"Chosen ratio: **{r['chosen']}** ({r['why']}). After {doc['settings']['finetune_epochs']} fine-tuning "
        f"epochs the shipped bundle measured p99 {r['shipped_p99_ms']:.3f} ms in the build's evaluate stage "
        f"(budget gate: {r['budget_gate']}); test top-1 {r['test_top1_unpruned']:.2f} % unpruned → "
        f"{r['test_top1_pruned']:.2f} % pruned (INT8 through the runtime).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        md = markdown(json.loads((args.out / "prune_search.json").read_text()))
        (args.out / "prune_search.md").write_text(md)
        print(md)
        return 0
    common.ensure_importable()
    from edgekit_runtime.bench import system_description

    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    targs = compression.parse_args([])
    targs.work = args.work
    data = compression.digits_upscaled(args.work / "digits32.npz", 32)
    run = compression.train_run(targs, data)
    unpruned = compile_with(run, args, "search-unpruned", None, None)
    p99 = unpruned["latency_ms"]["int8"]["p99_ms"]
    budget = args.budget_ms or round(args.fraction * p99, 4)
    pruned = compile_with(run, args, "search-pruned", budget,
                          {"ratio": "auto", "finetune_epochs": args.finetune_epochs,
                           "search_points": args.search_points, "max_ratio": args.max_ratio})
    opt = next(s for s in pruned["stages"] if s["name"] == "optimize")["passes"][0]
    search = opt["search"]
    gate = next(g for g in pruned["gates"] if g["name"] == "latency.budget")
    d = np.load(data)
    results = {
        "budget_ms": budget, "unpruned_p99_ms": p99, "probes": search["probes"], "chosen": search["chosen"],
        "why": search["why"], "shipped_precision": pruned["precision"],
        "shipped_p50_ms": pruned["latency_ms"][pruned["precision"]]["p50_ms"],
        "shipped_p99_ms": pruned["latency_ms"][pruned["precision"]]["p99_ms"], "budget_gate": gate["status"],
        "macs_reduction": pruned["optimize"]["macs_reduction"],
        "test_top1_unpruned": compression.test_accuracy(args.work / "search-unpruned.ekb", d["x_test"], d["y_test"]),
        "test_top1_pruned": compression.test_accuracy(args.work / "search-pruned.ekb", d["x_test"], d["y_test"]),
    }
    doc = {
        **common.run_header("prune-search", argv),
        "settings": {"fraction": args.fraction, "budget_ms": args.budget_ms, "finetune_epochs": args.finetune_epochs,
                     "search_points": args.search_points, "max_ratio": args.max_ratio, "target": args.target,
                     "threads": args.threads, "precision": "int8", "batch": 1},
        "system": system_description(),
        "provenance": common.provenance(),
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "prune_search.json").write_text(json.dumps(doc, indent=2, default=str))
    md = markdown(doc)
    (args.out / "prune_search.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
