"""ONNX Runtime INT8 recipes per model: which one pays on this CPU, and which kernels actually run.

For each torchvision model (random weights, BatchNorm statistics re-estimated on crops of
scikit-learn's two sample photos, exported to ONNX at SIZE×SIZE and put through
``quant_pre_process`` like the compiler does) every INT8 recipe below is written with ONNX
Runtime's ``quantize_static`` on the same calibration crops, then all of them and the FP32
model are timed **interleaved** (one call of each in turn, shuffled per round) in one process,
single stream, with the engine's session settings (``ORT_ENABLE_ALL``). The figure is the
median over rounds; the ratio is INT8 p50 / FP32 p50 (< 1: INT8 is faster). ORT's profiler
lists the kernels that ran (op types after its Q/DQ fusion: QLinearConv vs float Conv ...).

Recipes:

* ``qdq_u8_nopool`` – what the compiler wrote before: QDQ, uint8 activations, per-channel int8 weights
* ``qdq_u8``     – the same after the compiler's rewrite of spatial ReduceMean (dynamo export) to GlobalAveragePool
  (every recipe below is written from the rewritten graph)
* ``qdq_s8``     – QDQ, int8 activations, symmetric (``ActivationSymmetric``)
* ``qop_u8``     – QOperator format (QLinearConv ... written by the quantizer), uint8 activations
* ``qdq_u8_pt``  – QDQ uint8, per-tensor weights
* ``qdq_u8_nodw``– QDQ uint8, depthwise convolutions kept float
* ``qdq_u8_nose``– QDQ uint8, elementwise Add/Mul/Sigmoid/HardSigmoid/HardSwish kept float
* ``qdq_u8 @EXT``– ``qdq_u8`` under ``ORT_ENABLE_EXTENDED`` (session setting, not a recipe)

Run: ``.venv/bin/python benchmarks/ort_int8.py [--size 224] [--threads 1 2] [--rounds 40] [--models ...]``
→ ``benchmarks/results/ort_int8.{json,md}``. The machine this ran on is shared: the load
average and busy share are recorded with every model; trust ratios of interleaved runs,
not absolute milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CpuMonitor, REPO, normalize, random_crops, sample_photos  # noqa: E402

CACHE = REPO / "benchmarks" / ".cache" / "ort_int8"
RESULTS = REPO / "benchmarks" / "results"
# ten common edge classifiers: the depthwise/SE mobile nets where ORT INT8 paid least, and the dense ones
MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
          "resnet18", "resnet50", "regnet_y_400mf", "mnasnet1_0", "convnext_tiny")
# The compiler's candidates for onnxruntime-cpu (uint8 activations, per-channel weights; see
# OnnxRuntimeCompiler.candidates): its own recipe on the graph as exported, the same with spatial means as
# pools, and the other weight granularity; another than its own is chosen only if > SPEED_MARGIN faster.
COMPILER_CANDIDATES = ("qdq_u8_nopool", "qdq_u8", "qdq_u8_pt")
CALIB = 32
EXPORTER = "dynamo"  # --exporter torchscript: the legacy exporter (GlobalAveragePool, HardSigmoid+Mul)
log = print  # benchmarks are scripts: progress goes to the terminal


def cpu_flags() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    want = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16"]
    return {"model": model, "flags": {f: f in flags for f in want}, "cores": os.cpu_count()}


def crops(count: int, seed: int, size: int) -> np.ndarray:
    from PIL import Image

    c = random_crops(sample_photos(), count, seed)
    if size != c.shape[1]:
        c = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in c])
    return normalize(c)


def model_onnx(arch: str, size: int) -> Path:
    """``arch`` with random weights (seed 0), BN re-estimated on 4×16 crops, exported and pre-processed."""
    import torch
    import torchvision

    from edgekit.build.backends.quantize_onnxruntime import OnnxRuntimeCompiler

    raw = CACHE / f"{arch}-{size}-{EXPORTER}.onnx"
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        m = getattr(torchvision.models, arch)(weights=None)
        bns = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
        m.train()
        x = crops(64, 2, size)
        with torch.no_grad():
            for i in range(0, 64, 16):
                m(torch.from_numpy(x[i : i + 16]))
        m.eval()
        if EXPORTER == "dynamo":  # what edgekit's importer uses
            torch.onnx.export(m, (torch.zeros(1, 3, size, size),), str(raw), dynamo=True, external_data=False,
                              input_names=["input"], output_names=["logits"])
        else:
            torch.onnx.export(m, (torch.zeros(1, 3, size, size),), str(raw), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"])
    return OnnxRuntimeCompiler()._preprocessed(raw, CACHE)


def recipes(raw_pre: Path, calib: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """Every recipe's INT8 model (written once, cached): of the compiler's quantization input (spatial
    ReduceMeans as pools), except ``qdq_u8_nopool``: the pre-processed graph as the compiler took it before."""
    from edgekit.build.backends.quantize_onnxruntime import OnnxRuntimeCompiler
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgekit.build.backends.quantize_onnxruntime import recipe_excludes
    from edgekit.build.backends.sensitivity import _Reader, calibration_cache, input_names

    import onnx

    pooled = OnnxRuntimeCompiler()._pooled(raw_pre) or raw_pre
    specs: dict[str, dict[str, Any]] = {
        "qdq_u8_nopool": {"activation_type": "uint8", "raw": True},
        "qdq_u8": {"activation_type": "uint8"},
        "qdq_s8": {"activation_type": "int8"},
        "qdq_u8_nodw": {"activation_type": "uint8", "exclude": "depthwise"},
        "qop_u8": {"activation_type": "uint8", "format": "QOperator"},
        "qdq_u8_pt": {"activation_type": "uint8", "per_channel": False},
        "qdq_u8_nose": {"activation_type": "uint8", "exclude": "elementwise"},
    }
    paths = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        out = out_dir / f"{name}.onnx"
        paths[name] = out
        if out.exists():
            continue
        pre = raw_pre if spec.get("raw") else pooled
        graph = onnx.load(str(pre))
        s8 = spec["activation_type"] == "int8"
        fmt = QuantFormat.QOperator if spec.get("format") == "QOperator" else QuantFormat.QDQ
        quantize_static(str(pre), str(out), _Reader(input_names(pre), calib), quant_format=fmt,
                        per_channel=spec.get("per_channel", True),
                        activation_type=QuantType.QInt8 if s8 else QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=recipe_excludes(graph, spec.get("exclude")),
                        extra_options={"ActivationSymmetric": s8},
                        calibration_cache_path=str(calibration_cache(pre, calib, "minmax", CACHE)))
    return paths


def session(path: Path, threads: int, level: str = "all", profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernels(path: Path, threads: int, x: np.ndarray, level: str = "all") -> dict[str, int]:
    """Op types of the nodes that ran (ORT profiler, one run after warm-up), counted."""
    sess = session(path, threads, level, profile=str(CACHE / "prof"))
    feed = {sess.get_inputs()[0].name: x[:1]}
    sess.run(None, feed)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    counts: dict[str, int] = {}
    seen = set()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["name"] not in seen:
            seen.add(e["name"])
            op = e["args"].get("op_name", "?")
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def interleaved(paths: dict[str, tuple[Path, str]], threads: int, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per model over ``rounds`` rounds of one call each, order shuffled per round."""
    sess = {k: session(p, threads, lvl) for k, (p, lvl) in paths.items()}
    feeds = {k: s.get_inputs()[0].name for k, s in sess.items()}
    times: dict[str, list[float]] = {k: [] for k in sess}
    for k, s in sess.items():  # warm-up
        for i in range(3):
            s.run(None, {feeds[k]: x[i : i + 1]})
    order = list(sess)
    rng = random.Random(0)
    for r in range(rounds):
        rng.shuffle(order)
        xi = x[r % len(x) : r % len(x) + 1]
        for k in order:
            t0 = time.perf_counter()
            sess[k].run(None, {feeds[k]: xi})
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def compiler_choice(ratios: dict[str, float]) -> dict[str, Any]:
    """The recipe the compiler's speed rule picks from its candidates (output error taken as within tolerance:
    this script does not measure it) and its INT8 speed-up; what ships is FP32 where INT8 is not faster."""
    from edgekit.build.backends.quantize_onnxruntime import SPEED_MARGIN

    own = COMPILER_CANDIDATES[0]
    faster = [k for k in COMPILER_CANDIDATES if ratios[k] < ratios[own] * (1 - SPEED_MARGIN)]
    chosen = min(faster, key=ratios.get) if faster else own
    speedup = 1.0 / ratios[chosen]
    return {"chosen": chosen, "int8_speedup": round(speedup, 3), "shipped_speedup": round(max(speedup, 1.0), 3)}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per thread count: the compiler's INT8 speed-up per model and the median over the models."""
    out: dict[str, Any] = {}
    for arch, e in result["models"].items():
        for t, r in e["threads"].items():
            row = out.setdefault(t, {"models": {}})
            row["models"][arch] = compiler_choice(r["ratio_int8_over_fp32"])
    for row in out.values():
        speed = [m["int8_speedup"] for m in row["models"].values()]
        row["median_int8_speedup"] = round(statistics.median(speed), 3)
        shipped = [m["shipped_speedup"] for m in row["models"].values()]
        row["median_shipped_speedup"] = round(statistics.median(shipped), 3)
        row["int8_slower_than_fp32"] = [a for a, m in row["models"].items() if m["int8_speedup"] < 1.0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--out", default="ort_int8")
    ap.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    a = ap.parse_args(argv)
    global EXPORTER
    EXPORTER = a.exporter
    import onnxruntime

    calib = crops(CALIB, 1, a.size)
    x = crops(8, 3, a.size)
    result: dict[str, Any] = {"cpu": cpu_flags(), "exporter": a.exporter, "onnxruntime": onnxruntime.__version__, "size": a.size,
                              "calibration_crops": CALIB, "rounds": a.rounds, "models": {}}
    for arch in a.models:
        t0 = time.time()
        pre = model_onnx(arch, a.size)
        paths = recipes(pre, calib, CACHE / f"{arch}-{a.size}-{EXPORTER}")
        entry: dict[str, Any] = {"kernels": {k: kernels(p, 1, x) for k, p in {"fp32": pre, **paths}.items()},
                                 "threads": {}}
        entry["kernels"]["qdq_u8@extended"] = kernels(paths["qdq_u8"], 1, x, "extended")
        for t in a.threads:
            mon = CpuMonitor().start()
            runs = {"fp32": (pre, "all"), **{k: (p, "all") for k, p in paths.items()},
                    "qdq_u8@extended": (paths["qdq_u8"], "extended")}  # FP32 stays ENABLE_ALL
            p50 = interleaved(runs, t, x, a.rounds)
            entry["threads"][str(t)] = {"p50_ms": {k: round(v, 3) for k, v in p50.items()},
                                        "ratio_int8_over_fp32": {k: round(v / p50["fp32"], 3)
                                                                 for k, v in p50.items() if k != "fp32"},
                                        "load": {k: round(v, 2) for k, v in mon.stop().items()}}
            log(f"{arch} threads={t}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                      entry["threads"][str(t)]["ratio_int8_over_fp32"].items()))
        entry["seconds"] = round(time.time() - t0, 1)
        result["models"][arch] = entry
        result["summary"] = summary(result)
        write(result, a.out)
    return 0


def write(result: dict[str, Any], out: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(result, indent=2))
    f = result["cpu"]["flags"]
    lines = [f"# ONNX Runtime {result['onnxruntime']} INT8 recipes, {result['size']}×{result['size']}, "
             f"{result.get('exporter', 'torchscript')} ONNX export",
             "", f"CPU: {result['cpu']['model']}, {result['cpu']['cores']} cores; flags: "
             + ", ".join(k for k, v in f.items() if v) + "; absent: " + (", ".join(k for k, v in f.items() if not v)
                                                                        or "none"),
             "", "Ratio = INT8 p50 / FP32 p50 of interleaved single-stream runs (< 1: INT8 faster); "
             "shared machine, load recorded per row.", ""]
    recipes = list(next(iter(result["models"].values()))["threads"].values())[0]["ratio_int8_over_fp32"]
    lines += ["## Summary: INT8 p50 / FP32 p50", "", "| model | threads | FP32 p50 ms | " + " | ".join(recipes) + " |",
              "|---|---|---|" + "---|" * len(recipes)]
    for arch, e in result["models"].items():
        for t, r in e["threads"].items():
            best = min(r["ratio_int8_over_fp32"].values())
            lines.append(f"| {arch} | {t} | {r['p50_ms']['fp32']:.2f} | " + " | ".join(
                (f"**{v:.2f}**" if v == best else f"{v:.2f}") for v in r["ratio_int8_over_fp32"].values()) + " |")
    lines += ["", "## What the compiler ships", "",
              "The compiler measures its candidates (" + ", ".join(COMPILER_CANDIDATES) + ") and takes another than "
              "its own (the first) only if it is more than 5 % faster; the latency gate then ships FP32 where INT8 "
              "is not faster. INT8 speed-up = FP32 p50 / chosen recipe's p50.", "",
              "| threads | " + " | ".join(result["models"]) + " | median INT8 speed-up | median shipped |",
              "|---|" + "---|" * (len(result["models"]) + 2)]
    for t, row in result.get("summary", {}).items():
        lines.append(f"| {t} | " + " | ".join(f"{m['int8_speedup']:.2f}× ({m['chosen']})"
                                              for m in row["models"].values())
                     + f" | **{row['median_int8_speedup']:.2f}×** | {row['median_shipped_speedup']:.2f}× |")
    lines += ["", "Kernel counts (ORT profiler, one run, 1 thread) per recipe are in the sections below.", ""]
    for arch, e in result["models"].items():
        for t, r in e["threads"].items():
            lines += [f"## {arch}, threads={t} (load {r['load'].get('loadavg_1m_start', '?')}, "
                      f"other processes {r['load'].get('other_processes_pct', 0):.0f} %)", "",
                      "| recipe | p50 ms | ratio | kernels that ran (top) |", "|---|---|---|---|"]
            for k, v in r["p50_ms"].items():
                ks = e["kernels"].get(k, {})
                top = ", ".join(f"{op}×{n}" for op, n in list(ks.items())[:6])
                lines.append(f"| {k} | {v:.3f} | {r['ratio_int8_over_fp32'].get(k, 1.0):.2f} | {top} |")
            lines.append("")
    (RESULTS / f"{out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
