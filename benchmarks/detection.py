"""Detection and segmentation end to end: train on generated scenes, compile INT8 per target, score through the
device runtime.

1. Data: ``edgekit.data.scenes.write_dataset`` (seeded shapes with exact boxes and masks on crops of the
   sample photos), ``--train`` / 150 / 150 images at 128×128 per task.
2. Train: ``edgekit train --task detection`` (``detector_tiny``) and ``--task segmentation`` (``unet``), as
   a user runs it (the CLI's own code path), ``--epochs`` each.
3. Compile: ``edgekit compile RUN --target T`` for ``x86-openvino-cpu``, ``onnxruntime-cpu`` and
   ``android-arm64-tflite``: INT8 calibrated on the run's training images and gated on validation mAP50
   (mIoU) within 1 point through the target's engine; and an FP32 bundle (``--no-quantize``) per target.
4. Score: every *original* test image through each bundle on the device runtime (its preprocessing,
   engine and post-processing: decode, class-aware NMS, boxes back onto the photo), scored against the
   annotations with pycocotools (detection) or per-pixel IoU/Dice (segmentation); and the latency of
   pre-processing, inference and post-processing from ``edgekit_runtime.bench``.

Run: ``.venv/bin/python benchmarks/detection.py [--epochs 60] [--train 1000] [--seg-train 400] [--seg-epochs 60]``
→ ``benchmarks/results/detection.{json,md}``. Figures name the machine; latency on a shared machine is for
orientation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu", "android-arm64-tflite")
ARCH = {"detection": "detector_tiny", "segmentation": "unet"}
METRIC = {"detection": "map50", "segmentation": "miou"}
EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["detection", "segmentation"])
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--train", type=int, default=1000, help="detection training images")
    p.add_argument("--epochs", type=int, default=60, help="detection epochs (early stopping may end sooner)")
    p.add_argument("--seg-train", type=int, default=400, help="segmentation training images (a U-Net step "
                   "costs several detector steps on a CPU)")
    p.add_argument("--seg-epochs", type=int, default=60)
    p.add_argument("--seg-batch", type=int, default=8, help="segmentation batch size (more, smaller steps: "
                   "a U-Net on 400 images needs a few thousand updates)")
    p.add_argument("--work", type=Path, default=None, help="keep data, runs and bundles here")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def run(cmd: list[str]) -> dict[str, Any]:
    t0 = time.time()
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    doc = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"stdout": proc.stdout[-2000:]}
    if proc.returncode:
        doc.setdefault("error", {"message": proc.stderr[-2000:]})
    doc["seconds"] = round(time.time() - t0, 1)
    doc["exit_code"] = proc.returncode
    return doc


def latency(bundle: Path, keyring: Path, photos: list[Path]) -> dict[str, Any]:
    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, run_benchmark

    with edgekit_runtime.load(bundle, keyring=keyring) as model:
        res = run_benchmark(model, photos, BenchSettings(warmup=10, min_queries=100, min_duration_s=1.0,
                                                         offline_batch=None))
    s = res["single_stream"]
    return {k: s[k]["p50_ms"] for k in ("preprocess", "inference", "postprocess", "end_to_end") if k in s}


def main(argv=None) -> int:
    from edgekit.data.scenes import write_dataset
    from edgekit.train.dense import bundle_predictions, score
    from edgekit.train.dense_data import run_prepared
    from edgekit_runtime.keyring import Keyring

    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit_det_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "keys" / "edgekit.key").is_file():
        subprocess.run([*EDGEKIT, "keys", "generate", "--out", str(work / "keys")], check=True, capture_output=True)
    key, pub = work / "keys" / "edgekit.key", work / "keys" / "edgekit.pub"
    ring = Keyring.from_paths(pub)
    from benchmarks.prune_zoo import system

    doc: dict[str, Any] = {**common.run_header("detection", argv), "system": system(),
                           "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                        "work": str(work)}, "tasks": {}}
    previous = args.out / "detection.json"
    if previous.is_file():  # a run of some tasks keeps the others' figures
        doc["tasks"] = {k: v for k, v in json.loads(previous.read_text()).get("tasks", {}).items()
                        if k not in args.tasks}
    for task in args.tasks:
        count, epochs, batch = ((args.train, args.epochs, 32) if task == "detection" else
                                (args.seg_train, args.seg_epochs, args.seg_batch))
        data = work / f"scenes_{task}"
        if not (data / "train").is_dir():
            write_dataset(data, task, "coco", {"train": count, "val": 150, "test": 150}, seed=0)
        run_dir = work / f"run_{task}"
        if not (run_dir / "metrics.json").is_file():
            log(f"training {task} ({epochs} epochs)")
            trained = run([*EDGEKIT, "train", "--task", task, "--data", str(data), "--out", str(run_dir),
                           "--epochs", str(epochs), "--batch-size", str(batch), "--arch", ARCH[task]])
            if trained["exit_code"]:
                raise SystemExit(f"training failed: {trained.get('error')}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        p = run_prepared(run_dir)
        records = p.records["test"]
        entry: dict[str, Any] = {"train": {k: metrics[k] for k in ("epochs_run", "best_epoch", "seconds", "params")},
                                 "host_test": {k: metrics["test"].get(k) for k in ("map50", "map", "miou", "dice")},
                                 "targets": {}}
        for target in args.targets:
            cell: dict[str, Any] = {}
            for precision in ("fp32", "int8"):
                bundle = work / f"{task}-{target}-{precision}.ekb"
                log(f"compiling {task} for {target} ({precision})")
                res = run([*EDGEKIT, "compile", str(run_dir), "--target", target, "--key", str(key), "--output",
                           str(bundle), *(["--no-quantize"] if precision == "fp32" else [])])
                if res["exit_code"]:
                    cell[precision] = {"error": (res.get("error") or {}).get("message", "")[:600],
                                       "compile_s": res["seconds"]}
                    continue
                report = json.loads(bundle.with_suffix(".report.json").read_text())
                got = score(task, bundle_predictions(bundle, ring, records), records, p.labels)
                key_ = METRIC[task]
                cell[precision] = {
                    "shipped": report.get("precision"), "compile_s": res["seconds"],
                    "bundle_bytes": bundle.stat().st_size,
                    "val_gate": next((g for g in report.get("gates", []) if g["name"] == "accuracy"), None),
                    "test": {key_: got[key_], **({"map": got["map"]} if task == "detection" else
                                                  {"dice": got["mean_dice"]})},
                    "latency_p50_ms": latency(bundle, pub, [r.image for r in records[:32]]),
                }
                log(f"  {precision}: test {key_} {got[key_]:.4f}")
            if "test" in cell.get("fp32", {}) and "test" in cell.get("int8", {}):
                k = METRIC[task]
                cell["int8_drop_points"] = round(100 * (cell["fp32"]["test"][k] - cell["int8"]["test"][k]), 3)
            entry["targets"][target] = cell
            doc["tasks"][task] = entry
            common.write_results(args.out, "detection", doc, markdown)
    return 0


def _f(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Detection and segmentation: trained on generated scenes, INT8 per target, scored on the device",
             "", f"{doc.get('generated_at')} · `{doc.get('command')}`", "",
             "Test split: 150 generated 128×128 scenes never seen in training or model selection; every original "
             "image through the bundle on the device runtime (preprocessing, engine, decode + class-aware NMS, "
             "boxes back onto the photo), scored with pycocotools (mAP) or per-pixel IoU. INT8 is gated at "
             "compile time on the validation split (≤ 1 point). Latency: p50 ms of one image, single stream, "
             "on this host (the TFLite row is the LiteRT interpreter on x86, not a phone).", ""]
    for task, e in doc["tasks"].items():
        k = METRIC[task]
        t = e["train"]
        lines += [f"## {task}", "", f"Host evaluation of the trained run (torch FP32, test split): {k} "
                  f"{_f(e['host_test'].get(k))}; {t['epochs_run']} epochs (best {t['best_epoch']}), "
                  f"{t['params']:,} parameters, trained in {t['seconds'] / 60:.0f} min.", "",
                  f"| target | FP32 {k} | INT8 {k} | drop (points) | shipped | INT8 p50 pre / inf / post ms |",
                  "|---|---|---|---|---|---|"]
        for t, c in e["targets"].items():
            f, i = c.get("fp32", {}), c.get("int8", {})
            lat = i.get("latency_p50_ms", {})
            fp32, int8 = (_f(x.get("test", {}).get(k, x.get("error", "–"))) for x in (f, i))
            stages = " / ".join(f"{lat.get(s, 0):.3f}" for s in ("preprocess", "inference", "postprocess"))
            lines.append(f"| {t} | {fp32} | {int8} | {c.get('int8_drop_points', '–')} | {i.get('shipped', '–')} | "
                         f"{stages} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
