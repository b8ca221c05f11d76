"""Transformer-safe INT8: ViT-Ti/16 through the build, plain PTQ against the transformer recipe, per backend.

The model is ViT-Ti/16 (torchvision ``VisionTransformer``: patch 16, 12 blocks, 3 heads, width 192, MLP
768, 224×224), random weights with a timm-style head init (``trunc_normal_(std=0.02)``; torchvision
zero-inits the head, which makes every output the same), exported to ONNX as a user would bring it. The
calibration set is 160 ImageNet-normalized crops of scikit-learn's two sample photos (no downloads).

Each target compiles it with the project's pipeline (``compile_model``) and its profile's fidelity gate
(cosine ≥ 0.99 on held-back crops; random weights have no accuracy). The report's attempts give plain
PTQ's and the transformer recipe's cosine and top-1 agreement through the device engine, which one
shipped, and the latency gate's interleaved FP32/INT8 single-stream p50 on this host (the TensorRT Q/DQ
graph runs on ONNX Runtime's CPU EP here: its latency says nothing about a Jetson and is not reported).

    .venv/bin/python benchmarks/transformer_int8.py [--targets x86-openvino-cpu,onnxruntime-cpu]

Writes ``--out``/transformer_int8.json and ``.md``.
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
from benchmarks.common import log  # noqa: E402

TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu", "jetson-orin-nano", "android-arm64-tflite")
TIMED = ("x86-openvino-cpu", "onnxruntime-cpu")  # the others' host figures say nothing about their devices
SIDE = 224


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=common.CACHE / "transformer_int8")
    p.add_argument("--markdown-only", action="store_true", help="only re-render the Markdown from the JSON")
    p.add_argument("--keep-others", action="store_true",
                   help="keep the JSON's rows of targets not run now (each row names the machine it ran on)")
    return p.parse_args(argv)


def vit_tiny():
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=SIDE, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
                              mlp_dim=768)
    torch.nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def prepare(work: Path) -> tuple[Path, Path]:
    """The ONNX file and the calibration set (made once, kept in ``work``)."""
    import torch

    onnx_path, calib = work / "vit_ti16.onnx", work / "calib.npz"
    if not onnx_path.exists():
        torch.onnx.export(vit_tiny(), torch.zeros(1, 3, SIDE, SIDE), onnx_path, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    if not calib.exists():
        x = common.normalize(common.random_crops(common.sample_photos(), 160, 1))
        np.savez(calib, x=np.ascontiguousarray(x, dtype=np.float32))
    return onnx_path, calib


def compile_one(onnx_path: Path, calib: Path, target: str, work: Path, key) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.errors import EdgekitError

    over = {"model.source": str(onnx_path), "model.name": "vit_ti16", "target": target,
            "output": work / f"{target}.ekb", "calibration.source": str(calib),
            # the subject is which INT8 artifact passes; the latency figures are reported, not gated
            "latency.on_slower": "keep_int8"}
    t = time.perf_counter()
    try:
        rep = compile_model(load_build(None, over), key).report
    except EdgekitError as exc:  # a gate's refusal carries the attempts; a conversion error only its message
        rep = getattr(exc, "report", None) or {"result": f"failed: {type(exc).__name__}", "accuracy": {}}
        rep.setdefault("error", str(exc))
    attempts = rep["accuracy"].get("attempts") or []
    lat = rep.get("latency_ms") or {}
    row: dict[str, Any] = {
        "result": rep.get("result"), "precision": rep.get("precision"), "compile_s": round(time.perf_counter() - t, 1),
        "attempts": [{"strategy": a["strategy"], "passed": a["passed"],
                      "cosine": round(a["fidelity"]["cosine"], 5), "cosine_min": round(a["fidelity"]["cosine_min"], 5),
                      "top1_agreement": round(a["fidelity"]["top1_agreement"], 4),
                      **{k: a[k] for k in ("model_type", "quantized_op_types", "recipe_name", "method",
                                           "activations") if k in a},
                      **({"float_nodes": len(a["recipe_float_nodes"])} if "recipe_float_nodes" in a else {})}
                     for a in attempts if "fidelity" in a],
        "shipped": next((a["strategy"] for a in attempts if a["passed"]), None),
        "error": None if rep.get("result") == "ok" else rep.get("error"),
    }
    if target in TIMED and "int8" in lat:
        row["latency"] = {"fp32_p50_ms": round(lat["fp32"]["p50_ms"], 3), "int8_p50_ms": round(lat["int8"]["p50_ms"], 3),
                          "speedup": round(lat["speedup"], 3), "engine": lat["engine"], "threads": lat["threads"]}
    return row


def markdown(doc: dict[str, Any]) -> str:
    sysd = doc["system"]
    lines = [
        "# Transformer-safe INT8: ViT-Ti/16, plain PTQ vs the transformer recipe", "",
        f"{doc['generated_at']} · `{doc['command']}` · {sysd.get('cpu', '?')}, {sysd.get('usable_cores', '?')} cores",
        "",
        "ViT-Ti/16 at 224×224, random weights (timm-style head init), compiled by `compile_model` with each "
        "profile's fidelity gate (cosine ≥ 0.99 to FP32, held-back crops of the sample photos, through the "
        "device engine). The transformer recipe is tried only because plain PTQ missed the gate.", "",
        "| target | plain PTQ cosine / top-1 agr. | transformer recipe cosine / top-1 agr. | recipe | shipped | "
        "FP32 p50 ms | INT8 p50 ms | speed-up |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for target, r in doc["results"].items():
        by = {a["strategy"]: a for a in r["attempts"]}
        ptq, tr = by.get("ptq"), by.get("ptq_transformer")
        what = (f"model_type {tr['model_type']}" if tr and "model_type" in tr else
                f"Q/DQ on {'/'.join(tr['quantized_op_types'])}, {tr.get('float_nodes', 0)} attention MatMuls float"
                if tr and "quantized_op_types" in tr else
                f"{tr['method']}: {tr['activations']} activations, int8 weights" if tr and "activations" in tr
                else "–")
        if ptq is None:  # refused before any INT8 attempt (a conversion error)
            lines.append(f"| {target} | – | – | – | nothing: {str(r.get('error'))[:160]} | – | – | – |")
            continue
        if r.get("machine") and r["machine"] != sysd.get("cpu"):
            target = f"{target} ({r['machine']})"
        lat = r.get("latency") or {}
        lines.append(
            f"| {target} | {ptq['cosine']:.4f} / {ptq['top1_agreement']:.2f} | "
            + (f"{tr['cosine']:.4f} / {tr['top1_agreement']:.2f}" if tr else "not tried") + f" | {what} | "
            f"{r['shipped'] or 'nothing (refused)'} | {lat.get('fp32_p50_ms', '–')} | {lat.get('int8_p50_ms', '–')} | "
            + (f"{lat['speedup']:.2f}×" if lat else "– (not this host's figure)") + " |")
    lines += ["", f"Latency: the build's latency gate, FP32 and INT8 interleaved single-stream, batch 1, engine "
                  f"default threads; rows that name a machine ran there (their figures compare within the row). "
                  f"{doc['caveat']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    stem = "transformer_int8"
    if args.markdown_only:
        return common.write_results(args.out, stem, None, markdown)
    common.ensure_importable()
    from edgekit_runtime.bench import system_description

    from edgekit.signing import load_private_key

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    key = load_private_key(common.ensure_keys()["private"])
    onnx_path, calib = prepare(args.work)
    mon = common.CpuMonitor().start()
    system = system_description()
    results = {}
    for target in args.targets.split(","):
        log(f"{target}: compiling ViT-Ti/16")
        results[target] = {**compile_one(onnx_path, calib, target, args.work, key), "machine": system.get("cpu")}
        log(f"{target}: {results[target]['shipped']} · {results[target]['attempts']}")
    cpu_during = mon.stop()
    previous = args.out / f"{stem}.json"
    if args.keep_others and previous.is_file():  # rows of other targets, run before (maybe on another machine)
        old = json.loads(previous.read_text())
        results = {**{t: {"machine": old["system"].get("cpu"), **r} for t, r in old["results"].items()
                      if t not in results}, **results}
    doc = {
        **common.run_header("transformer_int8", argv),
        "system": system, "provenance": common.provenance(), "cpu_during": cpu_during,
        "caveat": (f"Other processes used {cpu_during.get('other_processes_pct', 0):.0f} % of the CPU during the "
                   f"run: cosine and agreement are unaffected, wall-clock figures are only as good as that"),
        "results": results,
    }
    return common.write_results(args.out, stem, doc, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
