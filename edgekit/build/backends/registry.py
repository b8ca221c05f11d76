"""The one registry of backends: name → host compiler and device engine.

A plain dict, no registration by import side effects. Adding a target means a
compiler module here, an engine module in ``edgekit_runtime.engines`` (plus its
entry in ``ENGINES``), and a profile YAML in ``targets/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import BackendCompiler
from ...errors import ConfigError


@dataclass(frozen=True)
class Backend:
    name: str
    compiler: str  # "module:Class" of a BackendCompiler
    engine: str  # key of edgekit_runtime.engines.ENGINES
    artifact: str  # what the bundle carries
    description: str


BACKENDS: dict[str, Backend] = {
    "openvino": Backend(
        "openvino", "edgekit.build.backends.quantize_openvino:OpenVINOCompiler", "openvino",
        "OpenVINO IR (model.xml + model.bin)", "Intel/AMD x86 CPUs through OpenVINO's CPU plugin; NNCF INT8",
    ),
    "onnxruntime": Backend(
        "onnxruntime", "edgekit.build.backends.quantize_onnxruntime:OnnxRuntimeCompiler", "onnxruntime",
        "ONNX (Q/DQ INT8)", "Any CPU through ONNX Runtime; static Q/DQ INT8 with per-channel weights",
    ),
    "tensorrt": Backend(
        "tensorrt", "edgekit.build.backends.quantize_tensorrt:TensorRTCompiler", "tensorrt",
        "explicit-quantization Q/DQ ONNX + TensorRT calibration cache (engine built on the device)",
        "NVIDIA Jetson / GPUs through TensorRT; falls back to ONNX Runtime (TensorRT EP → CUDA EP → CPU EP)",
    ),
    "tflite": Backend(
        "tflite", "edgekit.build.backends.quantize_tflite:TFLiteCompiler", "tflite",
        ".tflite (full-integer INT8, int8 input/output)",
        "Android/ARM boards through the LiteRT interpreter with XNNPACK; converted from PyTorch by litert-torch",
    ),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None


def load_compiler(name: str) -> BackendCompiler:
    module_name, _, cls = get_backend(name).compiler.partition(":")
    return getattr(importlib.import_module(module_name), cls)()
