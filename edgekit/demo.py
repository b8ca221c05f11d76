"""The built-in example, end to end: train → compile INT8 → verify → run → benchmark.

Uses scikit-learn's digits (shipped inside scikit-learn, nothing downloaded),
trained by ``edgekit train`` from ``examples/digits-train.yaml`` into a run folder that
is then compiled as a model source. Every figure in the final table
is measured in this run; latency comes from one interleaved FP32/INT8 run per
target on this machine at batch 1.

:func:`run_demo` returns the figures and reports each step through ``on_step``;
``edgekit demo`` (``edgekit/cli/demo.py``) prints them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRAIN_FILE = REPO / "examples" / "digits-train.yaml"
TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu")


def write_digits_npz(path: Path, seed: int = 0) -> Path:
    """scikit-learn's digits as uint8 (N, 1, 8, 8) images: x/y = train+validation, x_test/y_test = held out."""
    from .data import digits

    s = digits.splits(seed)
    x = np.concatenate([s["train"].images, s["val"].images])[:, None]
    y = np.concatenate([s["train"].labels, s["val"].labels])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x, y=y, x_test=s["test"].images[:, None], y_test=s["test"].labels)
    return path


def run_demo(workdir: Path, epochs: int = 20, seconds: float = 2.0,
             on_step: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Train, compile, verify, run and benchmark under ``workdir``; returns the summary (also in demo-summary.json).

    ``on_step(text)`` hears about each step as it starts and what it found (plain text).
    """
    def _say(text: str) -> None:
        if on_step is not None:
            on_step(text)

    import cv2

    import edgekit_runtime
    from edgekit_runtime.bench import BenchSettings, compare
    from edgekit_runtime.keyring import Keyring

    from .build.pipeline import compile_model
    from .config import load_build
    from .config.train import load_train
    from .data import digits
    from .signing import generate_keypair, load_private_key
    from .train.run import train
    from .train.run_folder import build_settings

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    keydir = workdir / "keys"
    if not (keydir / "edgekit.key").exists():
        generate_keypair(keydir)
    key = load_private_key(keydir / "edgekit.key")
    keyring = Keyring.from_paths(keydir / "edgekit.pub")

    # 1. train ---------------------------------------------------------------------------
    _say(f"1/4 train: edgekit train {TRAIN_FILE.relative_to(REPO)} (scikit-learn digits, ≤{epochs} epochs, CPU)")
    data = write_digits_npz(workdir / "digits.npz")
    run_dir = workdir / "runs" / "digits"
    if run_dir.exists():  # the demo owns its work folder: a re-run trains afresh
        import shutil

        shutil.rmtree(run_dir)
    cfg = load_train(TRAIN_FILE, {"data.path": data, "out": run_dir, "train.epochs": epochs,
                                  "robustness": False})
    metrics = train(cfg).metrics
    _say(f"    {metrics['arch']}: test top-1 {metrics['test']['accuracy']:.2f} % (validation "
         f"{metrics['val']['accuracy']:.2f} %, best epoch {metrics['best_epoch']})  → {run_dir}")
    s = digits.splits()

    # 2. compile -------------------------------------------------------------------------
    reports: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        for precision in ("int8", "fp32"):
            _say(f"2/4 compile: {precision.upper()} for {target}")
            overrides: dict[str, Any] = {"target": target, "model.name": "digits",
                                         "output": workdir / f"digits-{target}-{precision}.ekb"}
            if precision == "fp32":
                overrides["quantize"] = {"enabled": False}
            build = load_build(None, overrides, base=build_settings(run_dir))
            reports[f"{target}/{precision}"] = compile_model(build, key).report

    # 3. verify and run on image files through the runtime ------------------------------------
    _say("3/4 verify and run: every bundle with edgekit_runtime on the held-out test split (image files in)")
    images_dir = workdir / "images"
    images_dir.mkdir(exist_ok=True)
    test = s["test"]
    paths = []
    for i, (img, label) in enumerate(zip(test.images, test.labels)):
        p = images_dir / f"{i:04d}_label{label}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    runtime_acc: dict[str, float] = {}
    for target in TARGETS:
        for precision in ("fp32", "int8"):
            bundle = workdir / f"digits-{target}-{precision}.ekb"
            verified = edgekit_runtime.open_bundle(bundle, keyring)
            with edgekit_runtime.load(bundle, keyring=keyring) as m:
                health = m.health_check()
                preds = m.predict(paths)
            hits = [int(p["top_k"][0]["label"]) == int(lbl) for p, lbl in zip(preds, test.labels)]
            runtime_acc[f"{target}/{precision}"] = acc = float(np.mean(hits) * 100)
            _say(f"    {bundle.name}: signature OK (key {verified.key_id}), health check "
                 f"{'OK' if health['ok'] else 'FAILED'}, top-1 on {len(paths)} PNGs {acc:.2f} %")

    # 4. benchmark FP32 vs INT8, interleaved ------------------------------------------------
    _say(f"4/4 benchmark: FP32 vs INT8 interleaved, batch 1, ≥{seconds:.0f} s each target")
    settings = BenchSettings(min_queries=300, min_duration_s=seconds, offline_batch=32)
    bench: dict[str, Any] = {}
    for target in TARGETS:
        models = {p: edgekit_runtime.load(workdir / f"digits-{target}-{p}.ekb", keyring=keyring, spin_wait=False)
                  for p in ("fp32", "int8")}
        try:
            name = models["fp32"].inputs[0].name
            feeds = [{name: x[None]} for x in digits.to_tensor(test.images[:64])]
            bench[target] = compare(models, feeds, settings)
        finally:
            for m in models.values():
                m.close()

    rows = []
    for target in TARGETS:
        r8 = reports[f"{target}/int8"]
        acc = r8["accuracy"]
        res = bench[target]["models"]
        for precision in ("fp32", "int8"):
            inf = res[precision]["single_stream"]["inference"]
            rows.append({
                "target": target, "precision": precision,
                "top1": runtime_acc[f"{target}/{precision}"],  # held-out test PNGs through the runtime
                "drop_pts": None if precision == "fp32" else
                runtime_acc[f"{target}/fp32"] - runtime_acc[f"{target}/int8"],
                "build_val_top1": acc["fp32"] if precision == "fp32" else acc["int8"],  # what the gate measured
                # what the bundle holds: the latency gate ships FP32 from an INT8 build when INT8 is not faster
                "shipped": reports[f"{target}/{precision}"]["precision"],
                "size_bytes": reports[f"{target}/{precision}"]["sizes"][reports[f"{target}/{precision}"]["precision"]],
                "p50_ms": inf["p50_ms"], "p90_ms": inf["p90_ms"],
                "speedup": bench[target]["ratios"][precision]["p50_speedup_vs_fp32"],
                "measured_with": acc["fp32_measured_with" if precision == "fp32" else "int8_measured_with"],
            })
    system = bench[TARGETS[0]]["models"]["fp32"]["system"]
    summary = {"rows": rows, "train": {k: metrics[k] for k in ("arch", "test", "val", "best_epoch", "epochs_run",
                                                                "seconds")}, "system": {k: system[k] for k in ("cpu", "cpu_flags", "usable_cores", "os")},
               "test_images": len(paths), "seconds": time.perf_counter() - t0, "reports": reports}
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
