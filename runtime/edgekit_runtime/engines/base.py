"""The interface every inference engine implements."""

from __future__ import annotations

import abc
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import ErrorCode, InputError, RuntimeConfigError
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
class LayerTime:
    """One layer's execution in one profiled query, as the engine's own profiler reports it.

    ``name`` is the layer as the engine ran it (OpenVINO: the runtime graph node, which can be
    a fusion of several model nodes; ONNX Runtime: the optimized graph's node). ``node`` is
    the model's own graph node it came from, where the engine's name says so (ORT's layout
    transformer renames ``node_Conv_68`` to ``node_Conv_68_token_1``). ``precision`` ("int8",
    "fp32", "bf16", "fp16", ...) and ``kernel`` (OpenVINO's exec type such as
    ``brgconv_avx512_amx_I8``, ORT's execution provider) are what the engine says, None where
    it says nothing: they are how a layer that did *not* run in INT8 is found.
    """

    name: str
    op_type: str
    time_us: float
    precision: str | None = None
    kernel: str | None = None
    node: str | None = None


@dataclass
class ProfiledRun:
    """What an engine's profiling pass measured: per query, the layers and the wall time of the whole query.

    ``engine_total_us`` is the engine's own figure for each query where it has one (ONNX
    Runtime's ``model_run``), so the layer sum can be checked against both.
    """

    layers: list[list[LayerTime]] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)
    engine_total_us: list[float] | None = None


_PRECISION_SUFFIX = re.compile(r"_(i8|u8|i32|f32|bf16|f16|fp32|fp16)$", re.IGNORECASE)
_PRECISION_NAMES = {"i8": "int8", "u8": "int8", "i32": "int32", "f32": "fp32", "fp32": "fp32", "bf16": "bf16",
                    "f16": "fp16", "fp16": "fp16"}


def precision_of_kernel(kernel: str | None) -> str | None:
    """``brgconv_avx512_amx_I8`` → "int8", ``jit_avx512_f32`` → "fp32"; None where the name carries no precision."""
    m = _PRECISION_SUFFIX.search(kernel or "")
    return _PRECISION_NAMES[m.group(1).lower()] if m else None


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

    @classmethod
    def profiling_unavailable_reason(cls) -> str | None:
        """``None`` if :meth:`profile` works for this engine, else why not (said before any work starts)."""
        return f"the {cls.name or cls.__name__} engine has no per-layer profiler that edgekit-runtime can read"

    def profile(self, feeds: Sequence[dict[str, np.ndarray]], warmup: int) -> ProfiledRun:
        """Run ``warmup`` unrecorded queries, then each of ``feeds``, with the engine's per-layer profiler on.

        Engines that implement it load a *separate* profiling session (profilers cost time
        and some are a load-time setting), so the model this engine runs is never slowed
        down and a benchmark taken before or after is not distorted. The default refuses
        with the reason :meth:`profiling_unavailable_reason` gives.
        """
        raise RuntimeConfigError(
            f"per-layer profiling is not available: {self.profiling_unavailable_reason()}",
            code=ErrorCode.CONFIG_INVALID,
            hint="benchmark without --profile, or profile the model on an OpenVINO or ONNX Runtime target",
        )

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
