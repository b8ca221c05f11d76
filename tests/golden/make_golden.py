"""Write the golden bundles (one per format version) that tests/runtime/test_golden.py loads.

Run ONCE per version, commit the outputs, and never regenerate them: the point of
a golden bundle is that it was written by an *old* edgekit and every later
runtime must still read it. The signing key is generated in memory and thrown
away, so a run can never reproduce the committed files (the signature differs);
that is the intent. Each version's bundle is a gray 2x2 image classifier with
three classes: ``y = flatten(x) @ W + b`` (ONNX: Flatten, MatMul, Add; opset 13).

* ``--version 1.0``: ``v1.0-onnxruntime-matmul.ekb`` and ``golden.pub`` (the
  public key that signed it), the manifest a dict literal as 1.0 writers made it;
* ``--version 1.1``: ``v1.1-onnxruntime-matmul.ekb`` and ``v1.1-golden.pub``,
  the manifest built with the typed ``Manifest`` and carrying every section 1.1
  appended (fidelity, gates, stages, accuracy direction, latency gating) and a
  drift histogram;
* ``--version 1.3``: ``v1.3-onnxruntime-matmul.ekb`` and ``v1.3-golden.pub``, the 1.1
  manifest plus ``metrics.optimize`` (a prune and a distill pass with their figures).
* ``--version 1.4``: ``v1.4-onnxruntime-detector.ekb`` and ``v1.4-golden.pub``, a detector
  with ``letterbox`` preprocessing and ``detection`` post-processing: a 3×32×32 input, an
  output ``[batch, 21, 6]`` (strides 8/16/32, two classes) that is a constant table whatever
  the image (``ReduceMean(x) * 0 + RAW_1_4``), so the boxes a runtime finds are known by hand.

Usage: python tests/golden/make_golden.py --version 1.1 [--force]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgekit.build.bundle_writer import write_bundle

HERE = Path(__file__).resolve().parent
BUNDLE = HERE / "v1.0-onnxruntime-matmul.ekb"
PUBLIC_KEY = HERE / "golden.pub"
OUTPUTS = {"1.0": (BUNDLE, PUBLIC_KEY),
           "1.1": (HERE / "v1.1-onnxruntime-matmul.ekb", HERE / "v1.1-golden.pub"),
           "1.3": (HERE / "v1.3-onnxruntime-matmul.ekb", HERE / "v1.3-golden.pub"),
           "1.4": (HERE / "v1.4-onnxruntime-detector.ekb", HERE / "v1.4-golden.pub")}

# Multiples of 1/8 and inputs that are multiples of 1/256: float32 results are exact.
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 8 - 0.75
B = np.array([0.5, -0.25, 0.125], dtype=np.float32)
HEALTH_INPUT = np.array([[[[0.25, 0.5], [0.75, 1.0]]]], dtype=np.float32)  # [1, 1, 2, 2]
LABELS = ["zero", "one", "two"]


def model_bytes() -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "golden_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="edgekit-golden")
    onnx.checker.check_model(model)
    return model.SerializeToString()


# v1.4: the detector's raw output, [1, A = 16 + 4 + 1, 4 + 2]: distances (l, t, r, b) in strides, then logits
RAW_1_4 = np.zeros((1, 21, 6), dtype=np.float32)
RAW_1_4[0, :, 4:] = -10.0
RAW_1_4[0, 19] = [0.5, 0.5, 0.5, 0.5, -10.0, 5.0]  # stride 16, row 1, col 1, centre (24, 24): [16, 16, 32, 32], "b"
RAW_1_4[0, 5] = [1.0, 1.0, 1.0, 1.0, 2.0, -10.0]  # stride 8, row 1, col 1, centre (12, 12): [4, 4, 20, 20], "a"
LABELS_1_4 = ["a", "b"]


def detector_bytes() -> bytes:
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], keepdims=1),
            helper.make_node("Mul", ["m", "zero"], ["m0"]),
            helper.make_node("Reshape", ["m0", "shape"], ["m1"]),
            helper.make_node("Add", ["m1", "raw"], ["y"]),
        ],
        "golden_detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 21, 6])],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
         numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
         numpy_helper.from_array(RAW_1_4, "raw")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="edgekit-golden")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_v1_4(model: bytes) -> dict:
    """The 1.1 manifest's sections for a detector, written as 1.4: letterbox preprocessing (RGB, 32×32, the
    format's default scale, mean 0.5, std 0.25) and detection post-processing (strides 8/16/32, score 0.25,
    NMS IoU 0.5, at most 10 boxes)."""
    from edgekit_runtime.contract import manifest as mf

    manifest = manifest_v1_1(model)
    manifest.update(format_version="1.4", created_at="2026-12-07T00:00:00+00:00",
                    created_by="edgekit 0.4.0 (tests/golden/make_golden.py)")
    manifest["model"].update(name="golden-detector", version="1.4.0", release=4)
    manifest["inputs"] = [mf.TensorSpec(name="x", dtype="float32", shape=["batch", 3, 32, 32],
                                        layout="NCHW").to_dict()]
    manifest["outputs"] = [mf.TensorSpec(name="y", dtype="float32", shape=["batch", 21, 6]).to_dict()]
    manifest["preprocess"] = mf.Preprocess(color="rgb", size=[32, 32], resize="letterbox", interpolation="linear",
                                           mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]).to_dict()
    manifest["postprocess"] = mf.Postprocess(type="detection", strides=[8, 16, 32], score_threshold=0.25,
                                             iou_threshold=0.5, max_detections=10).to_dict()
    manifest["metrics"]["accuracy"].update(metric="map50")
    manifest["input_stats"] = {}
    return manifest


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def manifest_v1_0(model: bytes) -> dict:
    """The 1.0 manifest, as written on 2026-01-01 (a dict literal, as 1.0 writers made it)."""
    return {
        "format": "edgekit-bundle",
        "format_version": "1.0",
        "created_at": "2026-01-01T00:00:00+00:00",
        "created_by": "edgekit 0.1.0 (tests/golden/make_golden.py)",
        "model": {"name": "golden-matmul", "version": "1.0.0", "release": 1},
        "target": {"name": "onnxruntime-cpu", "device": "generic", "latency_budget_ms": 50.0},
        "backend": {"name": "onnxruntime", "version": "1.17", "precision": "fp32", "artifact": "model.onnx",
                    "engines": ["onnxruntime"], "options": {"threads": 1}, "quantization": None},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 1, 2, 2], "layout": "NCHW",
                    "quantization": None}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3], "layout": None, "quantization": None}],
        "preprocess": {"type": "image", "color": "gray", "size": [2, 2], "resize": "stretch",
                       "interpolation": "nearest", "scale": 0.00390625, "mean": None, "std": None,
                       "layout": "NCHW", "dtype": "float32"},
        "postprocess": {"type": "classification", "softmax": True, "top_k": 3},
        "labels": "labels.txt",
        "metrics": {"accuracy": {"metric": "top1_percent", "dataset": None, "count": 0, "budget_pts": None},
                    "latency_ms": {}, "size_bytes": {"fp32": len(model)}},
        "calibration": None,
        "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                         "atol": 1e-5, "rtol": 1e-5},
        "input_stats": {"x": {"count": 1, "mean": float(HEALTH_INPUT.mean()), "std": float(HEALTH_INPUT.std()),
                              "min": float(HEALTH_INPUT.min()), "max": float(HEALTH_INPUT.max())}},
    }


def manifest_v1_1(model: bytes) -> dict:
    """The 1.1 manifest, built with the typed Manifest: every 1.1 section filled in.

    The preprocessing leaves ``scale`` out, so the bundle runs with the format's
    default (1/255), and normalizes with ``mean``/``std``.
    """
    from edgekit_runtime.contract import manifest as mf

    calib = (np.arange(64, dtype=np.float32).reshape(16, 1, 2, 2) / 63.0 - 0.25) / 0.5
    counts, edges = np.histogram(calib.astype(np.float64).ravel(), bins=8)
    per_sample = calib.reshape(16, -1).mean(axis=1)
    stats = mf.InputStats(
        count=16, mean=float(calib.mean()), std=float(calib.std()), min=float(calib.min()), max=float(calib.max()),
        percentiles={str(p): float(np.percentile(calib, p)) for p in (1, 5, 50, 95, 99)},
        histogram=mf.Histogram(edges=edges.tolist(), counts=counts.tolist()),
        sample_mean=mf.SampleMean(mean=float(per_sample.mean()), std=float(per_sample.std())))
    figures = mf.LatencyFigures(p50_ms=0.011, p90_ms=0.013, p99_ms=0.02, mean_ms=0.012, count=300)
    m = mf.Manifest(
        format_version="1.1",
        created_at="2026-12-04T00:00:00+00:00",
        created_by="edgekit 0.2.0 (tests/golden/make_golden.py)",
        model=mf.ModelInfo(name="golden-matmul", version="1.1.0", release=2),
        target=mf.TargetInfo(name="onnxruntime-cpu", device="generic", latency_budget_ms=50.0),
        backend=mf.BackendInfo(name="onnxruntime", version="1.20", precision="fp32", artifact="model.onnx",
                               engines=["onnxruntime"], options=mf.BackendOptions(threads=1),
                               quantization=None),
        inputs=[mf.TensorSpec(name="x", dtype="float32", shape=["batch", 1, 2, 2], layout="NCHW")],
        outputs=[mf.TensorSpec(name="y", dtype="float32", shape=["batch", 3])],
        preprocess=mf.Preprocess(color="gray", size=[2, 2], interpolation="nearest", mean=[0.25], std=[0.5]),
        postprocess=mf.Postprocess(top_k=2),
        labels="labels.txt",
        metrics=mf.BuildMetrics(
            accuracy=mf.AccuracyReport(metric="top1_percent", direction="higher", dataset=None, count=0,
                                       checked=False, budget_pts=None),
            fidelity=mf.Fidelity(cosine=1.0, cosine_min=1.0, top1_agreement=1.0, samples=4, min_cosine=0.99,
                                 min_top1_agreement=None, source="held-back calibration samples"),
            latency_ms=mf.LatencyReport(engine="onnxruntime", batch=1, threads=1, interleaved=False, speedup=None,
                                        gated=False, not_gated_reason="an FP32 build has no INT8 to compare",
                                        figures={"fp32": figures}),
            latency_measured_on="golden (not measured)",
            size_bytes={"fp32": len(model)},
            gates=[mf.GateRecord(name="accuracy", status="not_checked", detail="no labelled data"),
                   mf.GateRecord(name="fidelity.cosine", status="passed", value=1.0, threshold=0.99),
                   mf.GateRecord(name="latency.budget", status="passed", value=0.013, threshold=50.0, unit="ms")],
            stages=[mf.StageRecord(name="export", seconds=0.25), mf.StageRecord(name="package", seconds=0.5)]),
        calibration=None,
        health_check=mf.HealthCheck(input="health/input.npy", expected_output="health/expected_output.npy",
                                    atol=1e-5, rtol=1e-5),
        input_stats={"x": stats},
    )
    manifest = m.to_dict()
    del manifest["preprocess"]["scale"]  # the device takes the format's default
    return manifest


def manifest_v1_3(model: bytes) -> dict:
    """The 1.1 manifest written as 1.3, with the compression record 1.3 appended (``metrics.optimize``)."""
    from edgekit_runtime.contract import manifest as mf

    manifest = manifest_v1_1(model)
    manifest.update(format_version="1.3", created_at="2026-12-07T00:00:00+00:00",
                    created_by="edgekit 0.3.0 (tests/golden/make_golden.py)")
    manifest["model"].update(version="1.3.0", release=3)
    manifest["metrics"]["optimize"] = mf.OptimizeRecord(
        passes=[mf.OptimizePassRecord(kind="prune", settings={"ratio": 0.5, "iterations": 2, "round_to": 16},
                                      params_before=1200, params_after=330, macs_before=48000, macs_after=12500,
                                      metric="accuracy", metric_before=97.5, metric_after=97.0,
                                      fp32_p50_ms_before=0.5, fp32_p50_ms_after=0.2,
                                      int8_p50_ms_before=0.3, int8_p50_ms_after=0.125),
                mf.OptimizePassRecord(kind="distill", settings={"teacher": "self", "temperature": 4.0, "alpha": 0.7},
                                      metric="accuracy", metric_before=97.0, metric_after=97.75)],
        macs_reduction=3.84, params_reduction=3.636).to_dict()
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", choices=sorted(OUTPUTS), default="1.1", help="format version to write")
    parser.add_argument("--force", action="store_true", help="overwrite the committed golden files")
    args = parser.parse_args(argv)
    bundle, public_key = OUTPUTS[args.version]
    if (bundle.exists() or public_key.exists()) and not args.force:
        print(f"{bundle.name} exists: golden files are written once and committed (pass --force)", file=sys.stderr)
        return 1

    model = detector_bytes() if args.version == "1.4" else model_bytes()
    if args.version == "1.4":
        health_input, manifest = np.zeros((1, 3, 32, 32), np.float32), manifest_v1_4(model)
    elif args.version == "1.0":
        health_input, manifest = HEALTH_INPUT, manifest_v1_0(model)
    else:
        # the preprocessed image [[0, 255], [255, 0]] (scale 1/255, mean 0.25, std 0.5)
        health_input = (np.array([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=np.float32) - 0.25) / 0.5
        manifest = manifest_v1_1(model) if args.version == "1.1" else manifest_v1_3(model)
    expected = RAW_1_4 if args.version == "1.4" else health_input.reshape(1, 4) @ W + B
    members = {
        "model.onnx": model,
        "labels.txt": ("\n".join(LABELS_1_4 if args.version == "1.4" else LABELS) + "\n").encode(),
        "health/input.npy": npy(health_input),
        "health/expected_output.npy": npy(expected),
    }
    key = Ed25519PrivateKey.generate()  # never written: the golden bundle cannot be re-signed
    write_bundle(bundle, manifest, members, key)
    public_key.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"wrote {bundle} ({bundle.stat().st_size} bytes) and {public_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
