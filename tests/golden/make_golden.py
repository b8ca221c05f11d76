"""Write the golden bundle-format-v1 bundle that tests/runtime/test_golden.py loads.

Run ONCE, commit the outputs, and never regenerate them: the point of a golden
bundle is that it was written by an *old* edgekit and every later runtime must
still read it. The signing key is generated in memory and thrown away, so a run
can never reproduce the committed files (the signature differs); that is the
intent. Outputs:

* ``v1.0-onnxruntime-matmul.ekb`` — a gray 2x2 image classifier with three
  classes: ``y = flatten(x) @ W + b`` (ONNX: Flatten, MatMul, Add; opset 13);
* ``golden.pub`` — the public key that signed it (the test's keyring).

Usage: python tests/golden/make_golden.py [--force]
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


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite the committed golden files")
    args = parser.parse_args(argv)
    if (BUNDLE.exists() or PUBLIC_KEY.exists()) and not args.force:
        print(f"{BUNDLE.name} exists: golden files are written once and committed (pass --force)", file=sys.stderr)
        return 1

    expected = HEALTH_INPUT.reshape(1, 4) @ W + B
    model = model_bytes()
    members = {
        "model.onnx": model,
        "labels.txt": ("\n".join(LABELS) + "\n").encode(),
        "health/input.npy": npy(HEALTH_INPUT),
        "health/expected_output.npy": npy(expected),
    }
    manifest = {
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
    key = Ed25519PrivateKey.generate()  # never written: the golden bundle cannot be re-signed
    write_bundle(BUNDLE, manifest, members, key)
    PUBLIC_KEY.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"wrote {BUNDLE} ({BUNDLE.stat().st_size} bytes) and {PUBLIC_KEY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
