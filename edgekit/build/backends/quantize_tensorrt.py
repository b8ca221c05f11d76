"""NVIDIA Jetson / TensorRT: explicit-quantization Q/DQ ONNX plus a TensorRT calibration cache.

The bundle does not carry an engine: a TensorRT plan only runs on the TensorRT
version and GPU it was built for, so the device builds it at install time
(``edgekit_runtime.engines.tensorrt_engine``) and caches it. What the host
produces is the form TensorRT's explicit quantization expects:

* weights: per-output-channel, symmetric int8, stored as int8 initializers
  followed by DequantizeLinear (TensorRT ≥ 8.6 reads these directly; the bundle
  stays about 4× smaller than with float weights and a Q/DQ pair);
* activations: per-tensor, symmetric int8 (zero point 0);
* a ``calibration.cache`` in TensorRT's own text format with the same
  activation ranges (amax / 127), for an implicitly quantized build from the
  same ranges or for auditing.

The Q/DQ graph also runs on ONNX Runtime (TensorRT EP → CUDA EP → CPU EP), which
is how the compiler measures its accuracy on a host without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...config import QuantizeSettings, RuntimeSettings
from .base import Artifact, Signature, SourceModel, runtime_options
from .quantize_onnxruntime import OnnxRuntimeCompiler
from .sensitivity import QdqOptions, write_qdq
from .tensorrt_calibration import write_cache


def activation_amax(qdq_path: Path) -> dict[str, float]:
    """amax of every quantized activation: scale × 127 of its QuantizeLinear (zero point 0)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq_path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    weights = {i.name for i in m.graph.initializer}
    amax: dict[str, float] = {}
    for node in m.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in weights:
            continue
        scale = inits.get(node.input[1])
        if scale is None or scale.size != 1:
            continue  # per-channel scales belong to weights
        amax[node.input[0]] = float(scale.reshape(-1)[0]) * 127.0
    return amax


class TensorRTCompiler(OnnxRuntimeCompiler):
    """Q/DQ placed for TensorRT; accuracy measured through ONNX Runtime on the host."""

    name = "tensorrt"
    engine = "tensorrt"

    def library_version(self) -> str:
        try:
            import tensorrt

            return tensorrt.__version__
        except ImportError:
            # The bundle is built by the device's TensorRT; record which ONNX tooling made the Q/DQ graph.
            import onnxruntime

            return f"none on host (Q/DQ by onnxruntime {onnxruntime.__version__})"

    def qdq_options(self, settings: QuantizeSettings) -> QdqOptions:
        """TensorRT's explicit-quantization rules: symmetric int8 activations, per-channel symmetric weights."""
        return QdqOptions("int8", True, settings.calibrate_method, {"ActivationSymmetric": True, "WeightSymmetric": True})

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None, recipe: str | None = None) -> Artifact:
        """Q/DQ for TensorRT; ``recipe="transformer"``: Q/DQ on the weight layers' inputs only, attention's
        activation × activation MatMuls, Softmax and LayerNorm in float (:func:`transformer_recipe`)."""
        pre = self._preprocessed(src.onnx, workdir)
        opts, kept = self._base(settings, pre, recipe)
        tag = f"-{recipe}" if recipe else ""
        out = workdir / (f"trt-int8{tag}-x{len(exclude)}" if exclude else f"trt-int8{tag}")
        write_qdq(pre, out / "model.onnx", calib[: settings.calibration_count], opts, workdir,
                  exclude=[*kept, *(exclude or [])])
        amax = activation_amax(out / "model.onnx")
        (out / "calibration.cache").write_text(write_cache(amax))
        return Artifact(out, "model.onnx", ["model.onnx", "calibration.cache"], "int8",
                        {"format": "QDQ (explicit quantization)", "weights": "per-channel symmetric int8",
                         "activations": "per-tensor symmetric int8", "calibrate_method": settings.calibrate_method,
                         "calibration_cache": "calibration.cache", "activation_tensors": len(amax),
                         "excluded_nodes": list(exclude or []),
                         **({"quantized_op_types": list(opts.op_types), "recipe_float_nodes": kept}
                            if opts.op_types else {}),
                         "preprocess_fallbacks": self.preprocess_fallbacks(pre)})

    def deploy_options(self, runtime: RuntimeSettings, sig: Signature) -> dict:
        """Runtime options plus TensorRT build shapes derived from the model's input."""
        opts = runtime_options(runtime)
        trt = dict(opts.get("tensorrt") or {})
        max_batch = int(trt.pop("max_batch", 1))
        trt["shapes"] = {}
        for name, shape in [(sig.input_name, sig.input_shape), *sig.more_inputs]:
            fixed = [d if isinstance(d, int) else 1 for d in shape]
            top = [max_batch if not isinstance(shape[0], int) else fixed[0], *fixed[1:]]
            trt["shapes"][name] = {"min": fixed, "opt": fixed, "max": top}
        opts["tensorrt"] = trt
        return opts
