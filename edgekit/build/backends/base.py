"""What every backend compiler provides, and how artifacts are evaluated.

Evaluation runs the artifact through the *device runtime's* engine, so the
accuracy recorded in a bundle is the accuracy of the code path a device runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekit_runtime.engines import EngineOptions, engine_class

from ...config import QuantizeSettings, RuntimeSettings


@dataclass
class Artifact:
    """Backend files in ``directory``; ``main`` is what the engine loads."""

    directory: Path
    main: str
    files: list[str]
    precision: str  # "fp32" | "int8"
    details: dict[str, Any] = field(default_factory=dict)

    def size_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)


@dataclass
class SourceModel:
    """The model as the compilers receive it: always a checked ONNX file, and the torch
    module too when the source was torch (converters such as litert-torch need it)."""

    onnx: Path
    torch: Any | None = None
    input_shape: list[int] | None = None


@dataclass
class Signature:
    input_name: str
    output_name: str
    input_shape: list[int | str]  # batch may be "batch"
    output_shape: list[int | str]
    # Where the artifact's own tensors are integer (full-INT8 TFLite), how to (de)quantize them.
    # The manifest dtype stays float32: the engine converts, users pass float.
    input_quantization: dict | None = None
    output_quantization: dict | None = None

    def manifest_tensors(self) -> tuple[list[dict], list[dict]]:
        layout = "NCHW" if len(self.input_shape) == 4 else None
        return (
            [{"name": self.input_name, "dtype": "float32", "shape": self.input_shape, "layout": layout,
              "quantization": self.input_quantization}],
            [{"name": self.output_name, "dtype": "float32", "shape": self.output_shape, "layout": None,
              "quantization": self.output_quantization}],
        )


EvaluateFn = Callable[[Artifact, dict[str, Any]], float]


class BackendCompiler(abc.ABC):
    """One per backend: FP32 artifact, INT8 quantization, and an accuracy fallback."""

    name: str = ""
    engine: str = ""  # runtime engine that runs this backend's artifacts
    needs_torch: bool = False  # True: the compiler converts from the torch module, not from ONNX

    @abc.abstractmethod
    def library_version(self) -> str: ...

    @abc.abstractmethod
    def fp32(self, src: SourceModel, workdir: Path) -> Artifact:
        """The unquantized model in this backend's format."""

    @abc.abstractmethod
    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None) -> Artifact:
        """Post-training INT8 quantization calibrated on ``calib``."""

    @abc.abstractmethod
    def recover(self, src: SourceModel, calib: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                settings: QuantizeSettings, workdir: Path, max_drop_pts: float,
                evaluate: Callable[[Artifact], float], fp32_accuracy: float) -> tuple[Artifact, list[dict]]:
        """Backend-specific fallback when INT8 is over budget; returns the best artifact and its attempts."""

    def reference_options(self, runtime: RuntimeSettings) -> dict[str, Any]:
        """Engine options for the FP32 reference measurement."""
        return runtime_options(runtime)

    def deploy_options(self, runtime: RuntimeSettings, sig: Signature) -> dict[str, Any]:
        """Engine options written into the bundle (``backend.options``)."""
        return runtime_options(runtime)

    def signature(self, artifact: Artifact, sig: Signature) -> Signature:
        """The deployed artifact's signature; backends whose format renames tensors override it."""
        return sig


def runtime_options(runtime: RuntimeSettings) -> dict[str, Any]:
    return {k: v for k, v in runtime.model_dump().items() if v is not None}


def make_engine(artifact: Artifact, engine: str, sig: Signature, options: dict[str, Any]):
    manifest = {
        "backend": {"artifact": artifact.main, "engines": [engine], "options": options},
        "inputs": sig.manifest_tensors()[0],
        "outputs": sig.manifest_tensors()[1],
    }
    return engine_class(engine)(artifact.directory, manifest, EngineOptions.from_manifest(manifest))


def predict_logits(eng, sig: Signature, x: np.ndarray, batch: int = 64) -> np.ndarray:
    fixed = isinstance(sig.input_shape[0], int)
    step = int(sig.input_shape[0]) if fixed else batch
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        if fixed and len(chunk) < step:  # pad the last batch of a fixed-batch model
            pad = np.repeat(chunk[-1:], step - len(chunk), axis=0)
            outs.append(eng.run({sig.input_name: np.concatenate([chunk, pad])})[sig.output_name][: len(chunk)])
        else:
            outs.append(eng.run({sig.input_name: chunk})[sig.output_name])
    return np.concatenate(outs)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.reshape(len(labels), -1).argmax(1) == labels).mean() * 100.0)
