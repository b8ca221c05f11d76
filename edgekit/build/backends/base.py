"""What every backend compiler provides, and how artifacts are evaluated.

Evaluation runs the artifact through the *device runtime's* engine, so the
accuracy recorded in a bundle is the accuracy of the code path a device runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit_runtime.contract.manifest import BackendOptions, TensorSpec
from edgekit_runtime.engines import EngineOptions, engine_class

from ...config import QuantizeSettings, RuntimeSettings

if TYPE_CHECKING:
    from ..gates import Attempt, RecoveryGoal


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
                 exclude: list[str] | None = None, recipe: str | None = None) -> Artifact:
        """Post-training INT8 quantization calibrated on ``calib``; ``recipe``: one of :meth:`recipes`."""

    def recipes(self, src: SourceModel) -> list[str]:
        """Other post-training recipes this model's architecture calls for, in the order to try them when plain
        PTQ fails a quality gate (``quantize(recipe=...)``). ONNX-based backends offer ``transformer`` for graphs
        with attention (:mod:`.attention`); the default is none."""
        return []

    @abc.abstractmethod
    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: "RecoveryGoal", first: Artifact) -> list["Attempt"]:
        """The backend's fallback when ``first`` (plain PTQ) fails a quality gate.

        ``goal`` is the one object that says what to reach and how to check a candidate
        (``goal.evaluate(artifact, strategy, details)`` runs every quality gate through the
        device engine); returns the attempts made, each with its artifact and verdicts.
        """

    def use_deploy_options(self, options: dict[str, Any]) -> None:
        """The bundle's engine options, given once they are known (the export stage), for a compiler that times
        candidates on the target's engine while it quantizes (ONNX Runtime's recipe choice); others ignore it."""

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
    """The device engine ``engine`` on ``artifact``, with the manifest's typed tensors and ``options``
    (``backend.options``, plus ``spin_wait`` for interleaved measurements)."""
    options = dict(options)
    spin_wait = options.pop("spin_wait", None)
    ins, outs = sig.manifest_tensors()
    inputs = [TensorSpec.from_dict(t, f"manifest.inputs[{i}]") for i, t in enumerate(ins)]
    outputs = [TensorSpec.from_dict(t, f"manifest.outputs[{i}]") for i, t in enumerate(outs)]
    engine_options = EngineOptions.from_backend(BackendOptions.from_dict(options), spin_wait=spin_wait)
    return engine_class(engine)(artifact.directory, artifact.main, inputs, outputs, engine_options)


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


def onnx_signature(onnx_path: Path) -> Signature:
    """Input/output names and shapes of a one-input ONNX model (symbolic dims become names, the first "batch")."""
    import onnx

    from ...errors import ConfigError

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if len(ins) != 1 or len(m.graph.output) < 1:
        raise ConfigError(f"{onnx_path.name}: edgekit compiles models with one input (found {len(ins)})")

    def dims(vi) -> list[int | str]:
        # −1, 0 and empty dims are unknown, not sizes (older exporters write −1 for "any"): the first is the
        # batch unless named, others keep their symbol (the import fixes an input's before this is read)
        out: list[int | str] = []
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                out.append(int(d.dim_value))
            else:
                out.append(d.dim_param or ("batch" if i == 0 else f"d{i}"))
        return out

    return Signature(ins[0].name, m.graph.output[0].name, dims(ins[0]), dims(m.graph.output[0]))
