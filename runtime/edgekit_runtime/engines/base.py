"""The interface every inference engine implements."""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import ErrorCode, InputError
from ..contract.manifest import BackendOptions, ModelInfo, TensorRTOptions, TensorSpec


_WARNED: set[str] = set()


def warn_once(logger: logging.Logger, message: str, *args: Any) -> None:
    """Log a warning about this machine (a missing provider, an engine that is absent) once per process.

    A build or a benchmark makes many engines; the same fact about the host said once is
    information, said eight times it is noise. Each engine still records it (``describe()``).
    """
    text = message % args if args else message
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning("%s", text)


def check_input(spec: TensorSpec, array: np.ndarray) -> None:
    """Raise :class:`InputError` unless ``array`` fits the manifest's ``spec`` (dtype, rank, fixed dimensions)."""
    if array.dtype != np.dtype(spec.dtype):
        raise InputError(
            f"input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}",
            code=ErrorCode.INPUT_BAD_DTYPE,
            hint="pass images (they are preprocessed for you) or convert the array",
        )
    if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != a for d, a in zip(spec.shape, array.shape)):
        raise InputError(
            f"input {spec.name!r} has shape {tuple(array.shape)}, the model expects {tuple(spec.shape)}",
            code=ErrorCode.INPUT_BAD_SHAPE,
        )


@dataclass
class EngineOptions:
    """How an engine runs a model: the manifest's ``backend.options`` plus this device's overrides.

    Defaults are the format's (``BackendOptions``); build one with :meth:`from_backend`.
    """

    threads: int | None = None
    # OpenVINO: "f32" runs FP32 models in f32 even on CPUs whose default is bf16.
    inference_precision: str | None = None
    performance_hint: str = BackendOptions.performance_hint
    # ONNX Runtime: idle worker threads spin-wait for the next run by default. Two sessions
    # alternating in one process then steal each other's cores (latency roughly doubles), so
    # interleaved comparisons turn it off; None keeps the library default.
    spin_wait: bool | None = None
    providers: list[str] | None = None  # ONNX Runtime
    device: str = BackendOptions.device  # OpenVINO
    tensorrt: TensorRTOptions | None = None
    engine_cache_dir: str | None = None  # TensorRT plans; None: $EDGEKIT_ENGINE_CACHE or ~/.cache

    @classmethod
    def from_backend(cls, options: BackendOptions, **overrides: Any) -> "EngineOptions":
        """The manifest's options, with ``overrides`` that are not None taking precedence."""
        base = {f.name: getattr(options, f.name) for f in fields(options)}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


class Engine(abc.ABC):
    """Loads one backend artifact and runs it on named numpy arrays.

    ``artifact`` is the file under ``model_dir`` the engine loads; ``inputs`` and
    ``outputs`` are the manifest's tensor specs; ``model`` (optional) names the
    model for engines that record it (TensorRT's plan cache).
    """

    name: str = ""

    def __init__(self, model_dir: Path, artifact: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: EngineOptions, *, model: ModelInfo | None = None):
        self.model_dir = Path(model_dir)
        self.artifact = self.model_dir / artifact
        self.options = options
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.model = model
        self.fallback_from: list[str] = []

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` if the backend library can be imported, else why not."""

    @classmethod
    @abc.abstractmethod
    def library_version(cls) -> str:
        """Version of the inference library, for results and telemetry."""

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; inputs must already match :attr:`inputs`."""

    def describe(self) -> dict[str, Any]:
        """What runs the model, for results and telemetry."""
        return {
            "engine": self.name,
            "version": self.library_version(),
            "threads": self.options.threads,
            "inference_precision": self.options.inference_precision,
            "spin_wait": self.options.spin_wait,
            "fallback_from": self.fallback_from,
        }
