"""ONNX Runtime engine (CPU execution provider by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EngineError, ErrorCode
from .base import Engine, EngineOptions


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

    def __init__(self, model_dir: Path, manifest: dict, options: EngineOptions):
        super().__init__(model_dir, manifest, options)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = options.extra.get("providers") or ["CPUExecutionProvider"]
        path = self.model_dir / manifest["backend"]["artifact"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors
            raise EngineError(f"ONNX Runtime could not load {path.name}: {exc}") from exc
        self._output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise EngineError(f"inference failed: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
        return dict(zip(self._output_names, values))
