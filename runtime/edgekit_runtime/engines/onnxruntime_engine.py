"""ONNX Runtime engine (CPU execution provider by default)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import EngineError, ErrorCode
from ..contract.manifest import TensorSpec
from .base import Engine, EngineOptions, warn_once

log = logging.getLogger(__name__)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc}); pip install onnxruntime"
        return None

    @classmethod
    def library_version(cls) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def __init__(self, model_dir: Path, artifact: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: EngineOptions, **kwargs: Any):
        super().__init__(model_dir, artifact, inputs, outputs, options, **kwargs)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.spin_wait is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin_wait else "0")
        providers = self._providers(options.providers or ["CPUExecutionProvider"], ort)
        path = self.artifact
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors
            raise EngineError(f"ONNX Runtime could not load {path.name}: {exc}") from exc
        self._output_names = [o.name for o in self.session.get_outputs()]

    def _providers(self, wanted: list[str], ort) -> list[str]:
        """Keep the manifest's provider order, dropping (and reporting) those this build lacks.

        A Jetson bundle asks for TensorRT → CUDA → CPU; on a CPU-only device that
        ends on the CPU provider, and ``describe()`` says which were skipped.
        """
        available = set(ort.get_available_providers())
        usable = [p for p in wanted if p in available]
        self.skipped_providers = [p for p in wanted if p not in available]
        if self.skipped_providers:
            warn_once(log, "ONNX Runtime here lacks %s; using %s", self.skipped_providers, usable)
        if not usable:
            raise EngineError(
                f"none of the execution providers {wanted} is available (have {sorted(available)})",
                code=ErrorCode.ENGINE_UNAVAILABLE,
                hint="install the onnxruntime build with those providers (e.g. onnxruntime-gpu)",
            )
        return usable

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers(),
                "skipped_providers": self.skipped_providers}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise EngineError(f"inference failed: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
        return dict(zip(self._output_names, values))
