"""LiteRT (TensorFlow Lite) engine, XNNPACK-accelerated.

Uses ``ai_edge_litert`` and, where only the older ``tflite_runtime`` is
installed on a device (it needs numpy < 2), that one: both expose the same
``Interpreter``. Full-integer models have int8 input and output tensors; the
engine quantizes float inputs and dequantizes outputs with the scale and
zero-point recorded in the manifest (checked against the model's own), so an
application passes float tensors or images either way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import EngineError, ErrorCode
from ..contract.manifest import QuantParams, TensorSpec
from .base import Engine, EngineOptions


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


def quantize(x: np.ndarray, q: QuantParams) -> np.ndarray:
    """Float → the artifact's integer input (rounded, clipped to the dtype's range)."""
    info = np.iinfo(q.dtype)
    return np.clip(np.round(x / q.scale) + q.zero_point, info.min, info.max).astype(q.dtype)


def dequantize(x: np.ndarray, q: QuantParams) -> np.ndarray:
    """The artifact's integer output → float32."""
    return (x.astype(np.float32) - q.zero_point) * np.float32(q.scale)


class TFLiteEngine(Engine):
    name = "tflite"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            _interpreter_class()
        except ImportError as exc:
            return f"no LiteRT interpreter ({exc}); pip install ai-edge-litert (or tflite-runtime with numpy<2)"
        return None

    @classmethod
    def library_version(cls) -> str:
        import importlib.metadata as md

        for dist in ("ai-edge-litert", "tflite-runtime"):
            try:
                return f"{dist} {md.version(dist)}"
            except md.PackageNotFoundError:
                continue
        return "unknown"

    def __init__(self, model_dir: Path, artifact: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: EngineOptions, **kwargs: Any):
        super().__init__(model_dir, artifact, inputs, outputs, options, **kwargs)
        path = self.artifact
        try:
            self.interpreter = _interpreter_class()(model_path=str(path),
                                                    num_threads=int(options.threads or os.cpu_count() or 1))
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"LiteRT could not load {path.name}: {exc}") from exc
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        if len(self._in) != len(self.inputs) or len(self._out) != len(self.outputs):
            raise EngineError(f"{path.name} has {len(self._in)} inputs/{len(self._out)} outputs, "
                              f"the manifest lists {len(self.inputs)}/{len(self.outputs)}")
        for spec, detail in zip(self.inputs + self.outputs, self._in + self._out):
            self._check_quantization(spec.name, spec.quantization, detail)

    @classmethod
    def profiling_unavailable_reason(cls) -> str | None:
        # ai-edge-litert's Python Interpreter runs LiteRT's op profiler internally
        # (experimental_force_delegate_node_profiling) but exposes no call that returns its figures.
        return ("the LiteRT Python interpreter has no per-operator profiler that can be read from Python; "
                "on the device, LiteRT's benchmark_model tool gives per-op times "
                "(benchmark_model --graph=model.tflite --enable_op_profiling=true)")

    @staticmethod
    def _check_quantization(name: str, q: QuantParams | None, detail: dict) -> None:
        dtype = np.dtype(detail["dtype"]).name
        if q is None:
            if dtype != "float32":
                raise EngineError(f"tensor {name!r} is {dtype} in the model but the manifest gives no quantization")
            return
        scale, zero_point = detail["quantization"]
        if q.dtype != dtype or not np.isclose(q.scale, scale) or q.zero_point != zero_point:
            raise EngineError(f"tensor {name!r}: manifest quantization {q} differs from the model's "
                              f"({dtype}, {scale}, {zero_point})")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        it = self.interpreter
        try:
            for spec, detail in zip(self.inputs, self._in):
                x = feeds[spec.name]
                it.set_tensor(detail["index"], quantize(x, spec.quantization) if spec.quantization else x)
            it.invoke()
            out = {}
            for spec, detail in zip(self.outputs, self._out):
                y = it.get_tensor(detail["index"])
                out[spec.name] = dequantize(y, spec.quantization) if spec.quantization else y.copy()
            return out
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"inference failed: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
