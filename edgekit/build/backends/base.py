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
from ...data.sources import named_feeds

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
    """The model's tensors as the manifest declares them. The first input is the one the bundle's
    preprocessing feeds and the first output the one its postprocessing and the accuracy gate read;
    ``more_inputs``/``more_outputs`` are the others, in the model's order (name, shape)."""

    input_name: str
    output_name: str
    input_shape: list[int | str]  # batch may be "batch"
    output_shape: list[int | str]
    # Where the artifact's own tensors are integer (full-INT8 TFLite), how to (de)quantize them.
    # The manifest dtype stays float32: the engine converts, users pass float.
    input_quantization: dict | None = None
    output_quantization: dict | None = None
    more_inputs: list[tuple[str, list[int | str]]] = field(default_factory=list)
    more_outputs: list[tuple[str, list[int | str]]] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [self.input_name] + [n for n, _ in self.more_inputs]

    @property
    def output_names(self) -> list[str]:
        return [self.output_name] + [n for n, _ in self.more_outputs]

    def manifest_tensors(self) -> tuple[list[dict], list[dict]]:
        def tensor(name: str, shape: list[int | str], quantization: dict | None) -> dict:
            layout = "NCHW" if len(shape) == 4 and name == self.input_name else None
            return {"name": name, "dtype": "float32", "shape": shape, "layout": layout, "quantization": quantization}

        return (
            [tensor(self.input_name, self.input_shape, self.input_quantization)]
            + [tensor(n, shape, None) for n, shape in self.more_inputs],
            [{**tensor(self.output_name, self.output_shape, self.output_quantization), "layout": None}]
            + [tensor(n, shape, None) for n, shape in self.more_outputs],
        )


def feeds(sig: Signature, x: np.ndarray) -> dict[str, np.ndarray]:
    """The engine's feeds for a batch of samples: a plain array goes to the one input; a structured array
    (a model with several inputs, see ``edgekit.data.sources``) holds one field per input name."""
    return named_feeds(x, sig.input_names)


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

    def check_signature(self, sig: Signature) -> None:
        """Refuse (an EdgekitError that says what to do) a model this backend cannot compile, before any work.
        Every backend here takes several inputs and outputs except where it overrides this."""

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
    """The first output on ``x`` (the one accuracy, labels and postprocessing read)."""
    return predict_outputs(eng, sig, x, batch)[sig.output_name]


def predict_outputs(eng, sig: Signature, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """Every output on ``x``, by name, run in batches (padded to a fixed batch where the model has one)."""
    fixed = isinstance(sig.input_shape[0], int)
    step = int(sig.input_shape[0]) if fixed else batch
    outs: list[dict[str, np.ndarray]] = []
    for i in range(0, len(x), step):
        chunk = x[i : i + step]
        if fixed and len(chunk) < step:  # pad the last batch of a fixed-batch model
            pad = np.repeat(chunk[-1:], step - len(chunk), axis=0)
            got = eng.run(feeds(sig, np.concatenate([chunk, pad])))
            outs.append({name: got[name][: len(chunk)] for name in sig.output_names})
        else:
            got = eng.run(feeds(sig, chunk))
            outs.append({name: got[name] for name in sig.output_names})
    return {name: np.concatenate([o[name] for o in outs]) for name in sig.output_names}


def onnx_signature(onnx_path: Path) -> Signature:
    """Input/output names and shapes of an ONNX model (symbolic dims become names, the first "batch")."""
    import onnx

    from ...errors import ConfigError

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if not ins or not m.graph.output:
        raise ConfigError(f"{onnx_path.name}: the model has {len(ins)} input(s) and {len(m.graph.output)} "
                          f"output(s); edgekit compiles models with at least one of each")

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

    outs = list(m.graph.output)
    return Signature(ins[0].name, outs[0].name, dims(ins[0]), dims(outs[0]),
                     more_inputs=[(i.name, dims(i)) for i in ins[1:]],
                     more_outputs=[(o.name, dims(o)) for o in outs[1:]])
