"""Mixed precision by sensitivity: layers kept in float, accuracy, fidelity and latency per backend.

The case is the one ``tests/build/test_mixed_precision.py`` builds: the digits CNN (width 16, trained
8 epochs, seed 0) with two outlier activations made by a function-preserving rescale (a channel's
BatchNorm ×100, the next layer's weights for it ÷100). Per-tensor INT8 activations then crush the
other channels of those two tensors, and plain PTQ breaks the 0.5 pt budget.

For each backend the project's pipeline compiles three signed bundles from the same checkpoint:

* **fp32** — ``quantize.enabled: false``;
* **int8** — plain PTQ, shipped whatever its quality (accuracy and fidelity budgets off);
* **mixed** — the profile's budgets; the fallback keeps the fewest ranked layers in float.

Accuracy and cosine come from the build reports (validation split, through the device engine). The
three bundles of ONNX Runtime and OpenVINO are then timed in one interleaved single-stream run
(``edgekit_runtime.bench.compare``, batch 1); the TensorRT bundle runs on ONNX Runtime's CPU EP here
and the TFLite one on x86 XNNPACK, so their timings would say nothing about a Jetson or an ARM board
and are not taken (the TFLite profiles still set ``max_excluded_nodes: 0``; the benchmark raises it
to 8 for its mixed build). It also compares, on ONNX Runtime, how many layers each ranking needs
(the isolated "only this layer in INT8" ranking edgekit uses, and the older local "error added per
node" one), and NNCF's accuracy control against the search on OpenVINO.

    .venv/bin/python benchmarks/mixed_precision.py

Writes ``--out``/mixed_precision.json and ``--out``/mixed_precision.md.
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

TARGETS = ("onnxruntime-cpu", "jetson-orin-nano", "x86-openvino-cpu", "rpi5-tflite")
TIMED = ("onnxruntime-cpu", "x86-openvino-cpu")
OUTLIER_SCALE = 100.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--queries", type=int, default=300, help="single-stream queries per bundle (at least)")
    p.add_argument("--seconds", type=float, default=3.0, help="single-stream duration (at least)")
    p.add_argument("--threads", type=int, default=1, help="inference threads (1: the 8x8 model is overhead-bound)")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=common.CACHE / "mixed_precision")
    p.add_argument("--markdown-only", action="store_true", help="only re-render the Markdown from the JSON")
    return p.parse_args(argv)


def outlier_checkpoint(work: Path) -> Path:
    """The trained digits CNN with two outlier activations (same function, see the module docstring)."""
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build, with_outliers
    from edgekit.train_minimal import train_classifier

    path = work / "digits_outliers.pt"
    if path.exists():
        return path
    torch.manual_seed(0)
    s = digits.splits()
    model, acc = train_classifier(build(width=16), digits.to_tensor(s["train"].images), s["train"].labels,
                                  digits.to_tensor(s["val"].images), s["val"].labels, epochs=8)
    log(f"trained the digits CNN: {acc:.2f} % val top-1")
    torch.save(with_outliers(model.state_dict(), OUTLIER_SCALE), path)
    return path


def compile_one(ckpt: Path, target: str, kind: str, work: Path, key) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.errors import GateError

    over: dict[str, Any] = {"target": target, "model.checkpoint": ckpt, "model.kwargs": {"width": 16},
                            "output": work / f"{target}-{kind}.ekb", "keep_work": True,
                            "workdir": work / f"{target}-{kind}.work",
                            "calibration.source": str(common.REPO / "calibration/digits/calib.npz"),
                            "latency": {"on_slower": "keep_int8"}}
    if kind == "fp32":
        over["quantize"] = {"enabled": False}
    if kind == "mixed" and target.endswith("tflite"):
        over["quantize"] = {"max_excluded_nodes": 8}  # the TFLite profiles still say 0 (recipe fallback only)
    if kind == "int8":
        over["accuracy"] = {"max_accuracy_drop": None}
        over["fidelity"] = {"min_cosine": None}
    t = time.perf_counter()
    try:
        rep = compile_model(load_build(common.REPO / "examples" / "digits.yaml", over), key).report
    except GateError as exc:  # a fallback that misses the budget: its report still says what it tried
        rep = exc.report
    seconds = time.perf_counter() - t
    acc = rep["accuracy"]
    attempts = acc.get("attempts") or []
    chosen = next((a for a in reversed(attempts) if a["passed"]), attempts[-1] if attempts else {})
    kept = chosen.get("excluded_nodes") or chosen.get("reverted_layers") or []
    return {"precision": rep.get("precision"), "compile_s": round(seconds, 1), "passed": rep.get("result") == "ok",
            "strategy": chosen.get("strategy"),
            "accuracy": acc.get("int8", acc.get("fp32")), "fp32_accuracy": acc.get("fp32"),
            "cosine": (rep.get("fidelity") or {}).get("cosine"),
            "kept_in_float": kept if kind not in ("fp32", "int8") else [],
            "ignored_ir_ops": chosen.get("ignored"), "candidates_tried": len(chosen.get("search", [])),
            "ranking": chosen.get("ranking") if kind == "mixed" else None,
            "bundle": str(work / f"{target}-{kind}.ekb")}


def time_bundles(paths: dict[str, str], threads: int, args, keys) -> dict[str, Any]:
    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, compare

    from edgekit.data import digits

    bundles = {k: edgekit_runtime.load(Path(p), keyring=keys["public"], threads=threads) for k, p in paths.items()}
    x = digits.calibration(64)
    name = next(iter(bundles.values())).inputs[0].name
    feeds = [{name: x[i : i + 1]} for i in range(len(x))]
    res = compare(bundles, feeds, BenchSettings(warmup=30, min_queries=args.queries, min_duration_s=args.seconds,
                                                 max_duration_s=120, offline_batch=None, seed=0))
    for b in bundles.values():
        b.close()
    return {k: res["models"][k]["single_stream"]["inference"]["p50_ms"] for k in paths}


def ranking_comparison(ckpt_work: Path) -> dict[str, Any]:
    """Layers each ranking needs on ONNX Runtime (same search rule, judged by the same two gates, directly)."""
    import onnxruntime as ort

    from edgekit.build.backends.quantize_onnxruntime import OnnxRuntimeCompiler
    from edgekit.build.backends.sensitivity import RANKING_SAMPLES, rank_added, rank_isolated, write_qdq
    from edgekit.build.gates import cosine_per_sample
    from edgekit.config import QuantizeSettings
    from edgekit.data import digits

    work = ckpt_work / "onnxruntime-cpu-mixed.work"
    src = work / "model_fp32.onnx"
    comp = OnnxRuntimeCompiler()
    settings = QuantizeSettings()
    pre = comp._preprocessed(src, work)  # noqa: SLF001 - the graph the backend ranks
    calib = np.load(common.REPO / "calibration/digits/calib.npz")["x"][:300]
    xv, yv = digits.validation()
    opts = comp.qdq_options(settings)

    def run(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: xv})[0]

    ref = run(pre)
    ref_acc = float((ref.argmax(1) == yv).mean() * 100)

    def passes(names: list[str]) -> tuple[bool, float, float]:
        out = run(write_qdq(pre, work / "cmp" / "m.onnx", calib, opts, work, exclude=names))
        acc = float((out.argmax(1) == yv).mean() * 100)
        cos = float(cosine_per_sample(ref, out).mean())
        return ref_acc - acc <= 0.5 and cos >= 0.99, acc, cos

    full = write_qdq(pre, work / "cmp" / "full.onnx", calib, opts, work)
    t = time.perf_counter()
    isolated = rank_isolated(pre, calib, opts, work, calib[:RANKING_SAMPLES])
    t_iso = time.perf_counter() - t
    t = time.perf_counter()
    added = rank_added(pre, full, calib[:RANKING_SAMPLES])
    t_added = time.perf_counter() - t
    out = {}
    for label, ranking, secs in (("isolated", isolated, t_iso), ("added", added, t_added)):
        need = None
        for k in range(1, len(ranking) + 1):
            ok, acc, cos = passes([e.name for e in ranking[:k]])
            if ok:
                need = {"k": k, "accuracy": acc, "cosine": cos}
                break
        out[label] = {"order": [e.name for e in ranking], "rank_seconds": round(secs, 2), "fewest_passing": need}
    return out


def accuracy_control_comparison(ckpt: Path, work: Path, key) -> dict[str, Any]:
    """The OpenVINO build again with NNCF's quantize_with_accuracy_control as the only fallback.

    The compiler's recover() is swapped for its ``accuracy_control`` for this one build (a measurement,
    not a product path), so both fallbacks meet the same goal through the same pipeline and gates.
    """
    from edgekit.build.backends.quantize_openvino import OpenVINOCompiler

    original = OpenVINOCompiler.recover
    OpenVINOCompiler.recover = lambda self, src, calib, settings, wd, goal, first: self.accuracy_control(
        src, calib, settings, wd, goal)
    try:
        r = compile_one(ckpt, "x86-openvino-cpu", "accuracy_control", work, key)
    finally:
        OpenVINOCompiler.recover = original
    return r


def _short(name: str) -> str:
    """A TFLite op scope (its output tensors' names, often hundreds of characters) cut to its last module."""
    return name if len(name) <= 40 else "…/" + "/".join(name.split(";;")[-1].split("/")[-2:]).rstrip(";1")


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Mixed precision by sensitivity", "",
             f"{doc['generated_at']} · `{doc['command']}`", "",
             "The digits CNN with two outlier activations (tests/build/test_mixed_precision.py); budgets: 0.5 pt "
             "top-1 on the validation split, cosine ≥ 0.99 on held-back calibration samples. Accuracy and cosine "
             "through each backend's device engine (TensorRT: its Q/DQ graph on ONNX Runtime's CPU EP). "
             f"p50: one interleaved single-stream run per backend, batch 1, {doc['settings']['threads']} thread(s).",
             "",
             f"**Caveat:** {doc['caveat']}", "",
             "| backend | bundle | layers in float | top-1 % | cosine | INT8 p50 ms | compile s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for target, r in doc["results"].items():
        for kind in ("fp32", "int8", "mixed"):
            b = r[kind]
            kept = "all" if kind == "fp32" else (", ".join(map(_short, b["kept_in_float"])) or "none")
            p50 = r.get("p50_ms", {}).get(kind)
            cos = "" if b["cosine"] is None else f"{b['cosine']:.4f}"
            p50_text = "" if p50 is None else f"{p50:.4f}"
            lines.append(f"| {target} | {kind} | {kept} | {b['accuracy']:.2f} | {cos} | {p50_text} | "
                         f"{b['compile_s']} |")
    rc = doc.get("rankings")
    if rc:
        lines += ["", "Rankings on ONNX Runtime (fewest top-ranked layers in float that pass both gates, "
                      "prefixes tried in order):", ""]
        for label, r in rc.items():
            need = r["fewest_passing"]
            lines.append(f"* **{label}**: " + (f"{need['k']} layer(s) ({need['accuracy']:.2f} %, cosine "
                                                f"{need['cosine']:.4f})" if need else "no prefix passes")
                         + f"; ranking took {r['rank_seconds']} s; order: {', '.join(r['order'][:5])}")
    ac = doc.get("accuracy_control")
    if ac:
        lines += ["", f"NNCF accuracy control as the only fallback on the same OpenVINO case: "
                      f"{'passed' if ac['passed'] else 'failed'}, {len(ac['kept_in_float'])} layer(s) returned to "
                      f"float ({', '.join(ac['kept_in_float']) or 'none'}), top-1 {ac['accuracy']:.2f} %, cosine "
                      f"{ac['cosine'] if ac['cosine'] is None else round(ac['cosine'], 4)}, compile {ac['compile_s']} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    stem = "mixed_precision"
    if args.markdown_only:
        return common.write_results(args.out, stem, None, markdown)
    common.ensure_importable()
    from edgekit_runtime.bench import system_description

    from edgekit.models.digits_cnn import OUTLIERS
    from edgekit.signing import load_private_key

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = common.ensure_keys()
    key = load_private_key(keys["private"])
    ckpt = outlier_checkpoint(args.work)
    results: dict[str, Any] = {}
    mon = common.CpuMonitor().start()
    for target in args.targets.split(","):
        log(f"{target}: compiling fp32, int8, mixed")
        r = {kind: compile_one(ckpt, target, kind, args.work, key) for kind in ("fp32", "int8", "mixed")}
        if target in TIMED:
            log(f"{target}: timing the three bundles interleaved")
            r["p50_ms"] = time_bundles({k: r[k]["bundle"] for k in ("fp32", "int8", "mixed")}, args.threads,
                                       args, keys)
        results[target] = r
    cpu_during = mon.stop()
    log("comparing rankings and NNCF accuracy control")
    doc = {
        **common.run_header("mixed_precision", argv),
        "settings": {"threads": args.threads, "queries": args.queries, "seconds": args.seconds, "batch": 1,
                     "outlier_scale": OUTLIER_SCALE, "outliers": OUTLIERS},
        "system": system_description(), "provenance": common.provenance(), "cpu_during": cpu_during,
        "caveat": (f"wall-clock figures from a shared machine (other processes used "
                   f"{cpu_during.get('other_processes_pct', 0):.0f} % of the CPU); rerun on a quiet one"),
        "results": results,
        "rankings": ranking_comparison(args.work) if "onnxruntime-cpu" in results else None,
        "accuracy_control": (accuracy_control_comparison(ckpt, args.work, key)
                             if "x86-openvino-cpu" in results else None),
    }
    return common.write_results(args.out, stem, doc, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
