"""The interface every inference engine implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.errors import ErrorCode, InputError


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the manifest describes it."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    layout: str | None = None
    quantization: dict | None = None

    @classmethod
    def from_manifest(cls, entry: dict) -> "TensorSpec":
        return cls(
            name=entry["name"],
            dtype=entry["dtype"],
            shape=tuple(entry["shape"]),
            layout=entry.get("layout"),
            quantization=entry.get("quantization"),
        )

    def check(self, array: np.ndarray) -> None:
        """Raise :class:`InputError` unless ``array`` fits this spec."""
        if array.dtype != np.dtype(self.dtype):
            raise InputError(
                f"input {self.name!r} has dtype {array.dtype}, the model expects {self.dtype}",
                code=ErrorCode.INPUT_BAD_DTYPE,
                hint="pass images (they are preprocessed for you) or convert the array",
            )
        if array.ndim != len(self.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(self.shape, array.shape)
        ):
            raise InputError(
                f"input {self.name!r} has shape {tuple(array.shape)}, the model expects "
                f"{tuple(self.shape)}",
                code=ErrorCode.INPUT_BAD_SHAPE,
            )


@dataclass
class EngineOptions:
    """Runtime settings; defaults come from the manifest's ``backend.options``."""

    threads: int | None = None
    # OpenVINO: "f32" runs FP32 models in f32 even on CPUs whose default is bf16.
    inference_precision: str | None = None
    performance_hint: str = "LATENCY"
    # ONNX Runtime: idle worker threads spin-wait for the next run by default. Two sessions
    # alternating in one process then steal each other's cores (latency roughly doubles), so
    # interleaved comparisons turn it off; None keeps the library default.
    spin_wait: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: dict, **overrides: Any) -> "EngineOptions":
        opts = dict(manifest["backend"].get("options") or {})
        known = {k: opts.pop(k) for k in ("threads", "inference_precision", "performance_hint", "spin_wait")
                 if k in opts}
        known.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**known, extra=opts)


class Engine(abc.ABC):
    """Loads one backend artifact and runs it on named numpy arrays."""

    name: str = ""

    def __init__(self, model_dir: Path, manifest: dict, options: EngineOptions):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.options = options
        self.inputs = [TensorSpec.from_manifest(t) for t in manifest["inputs"]]
        self.outputs = [TensorSpec.from_manifest(t) for t in manifest["outputs"]]
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
        return {
            "engine": self.name,
            "version": self.library_version(),
            "threads": self.options.threads,
            "inference_precision": self.options.inference_precision,
            "spin_wait": self.options.spin_wait,
            "fallback_from": self.fallback_from,
        }
