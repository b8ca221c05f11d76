"""What the build's gates do on models where INT8 goes wrong: fidelity on a ViT, latency on ONNX Runtime.

* **fidelity** — a ViT-Ti (timm's ``vit_tiny_patch16_224`` dimensions, torchvision's
  implementation, random weights with a trunc-normal head) compiled for ``x86-openvino-cpu``
  without labels (``accuracy.max_accuracy_drop: null``): plain PTQ, the fidelity gate's
  verdict, the fallback (NNCF accuracy control scored by cosine to FP32) and the layers it
  returned to float;
* **latency** — torchvision mobile CNNs (random weights, BatchNorm re-estimated on sample
  photos, see benchmarks/common.py) compiled for ``onnxruntime-cpu`` with the profile's
  defaults: INT8 vs FP32 p50 measured interleaved by the build, and what shipped.

Calibration: 300 crops of sklearn's sample photos (the last 60 held back for fidelity).
Writes ``--out``/build_gates.json and prints one line per model.

    .venv/bin/python benchmarks/build_gates.py [--models vit_tiny,mobilenet_v3_small,mobilenet_v2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402


def make_vit_tiny(seed: int = 0):
    """ViT-Ti from torchvision with random weights; torchvision zero-initialises the head, timm does not."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
                          mlp_dim=768, num_classes=1000)
    torch.nn.init.trunc_normal_(m.heads.head.weight, std=0.02)  # all-zero logits would make cosine meaningless
    return m.eval()


def compile_one(name: str, target: str, threads: int, min_cosine: float | None = None) -> dict[str, Any]:
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build
    from edgekit.errors import GateError
    from edgekit.signing import load_private_key

    data = common.ensure_data(log)
    keys = common.ensure_keys()
    out = common.CACHE / "gates" / f"{name}-{target}.ekb"
    overrides: dict[str, Any] = {"model.name": name, "model.input_shape": [1, 3, common.SIZE, common.SIZE],
                                 "target": target, "calibration.source": str(data["calib"]),
                                 "accuracy": {"max_accuracy_drop": None}, "output": str(out),
                                 "runtime": {"threads": threads}}
    if min_cosine is not None:  # a looser fidelity gate, to see what the latency gate does next
        overrides["fidelity"] = {"min_cosine": min_cosine}
    if name == "vit_tiny":
        overrides["model.source"] = "benchmarks.build_gates:make_vit_tiny"
    else:
        ckpt = common.ensure_checkpoint(name, threads, log)
        overrides.update({"model.source": "benchmarks.common:make_model", "model.kwargs": {"arch": name},
                          "model.checkpoint": str(common.REPO / ckpt["checkpoint"])})
    cfg = load_build(None, overrides)
    t0 = time.perf_counter()
    try:
        report = compile_model(cfg, load_private_key(keys["private"]), on_step=lambda s: log(f"  {name}: {s}")).report
    except GateError as exc:
        report = exc.report
    report["seconds"] = time.perf_counter() - t0
    return report


def summarize(name: str, target: str, report: dict[str, Any]) -> dict[str, Any]:
    attempts = report["accuracy"].get("attempts", [])
    lat = report.get("latency_ms", {})
    return {
        "model": name, "target": target, "result": report.get("result"), "shipped": report.get("precision"),
        "attempts": [{"strategy": a["strategy"], "passed": a["passed"], **a.get("fidelity", {}),
                      "kept_in_float": a.get("reverted_layers") or a.get("excluded_nodes") or []} for a in attempts],
        "fidelity": report.get("fidelity"),
        "gates": report.get("gates"),
        "p50_ms": {p: lat[p]["p50_ms"] for p in ("fp32", "int8") if p in lat},
        "int8_speedup": lat.get("speedup"), "latency_gated": lat.get("gated"),
        "seconds": report["seconds"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_tiny:x86-openvino-cpu,mobilenet_v3_small:onnxruntime-cpu,"
                                       "mobilenet_v2:onnxruntime-cpu,mobilenet_v3_small:onnxruntime-cpu:0.95,"
                                       "mobilenet_v2:onnxruntime-cpu:0.95",
                   help="comma-separated MODEL:TARGET[:MIN_COSINE] (MIN_COSINE overrides fidelity.min_cosine)")
    p.add_argument("--threads", type=int, default=common.usable_cores())
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    rows = []
    for pair in args.models.split(","):
        name, target, *rest = pair.split(":")
        min_cosine = float(rest[0]) if rest else None
        row = summarize(name, target, compile_one(name, target, args.threads, min_cosine))
        row["min_cosine"] = min_cosine
        rows.append(row)
        first = row["attempts"][0] if row["attempts"] else {}
        print(f"{name:20s} {target:18s} ptq cosine {first.get('cosine', float('nan')):.4f} -> shipped "
              f"{row['shipped']} ({row['result']}), cosine {(row['fidelity'] or {}).get('cosine', float('nan')):.4f}, "
              f"INT8 speedup {row['int8_speedup'] or float('nan'):.2f}x (gated: {row['latency_gated']}), "
              f"kept in float: {row['attempts'][-1]['kept_in_float'] if row['attempts'] else []}", flush=True)
    out = {"benchmark": "build_gates", "provenance": common.provenance(), "threads": args.threads, "models": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_gates.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
