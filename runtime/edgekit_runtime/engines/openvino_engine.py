"""OpenVINO engine (CPU plugin by default).

On CPUs with AVX512-BF16 or AMX, OpenVINO executes "FP32" models in bf16 unless
``INFERENCE_PRECISION_HINT`` says otherwise; the bundle's ``backend.options``
records the hint the model was validated with, and this engine applies it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np  # noqa: F401  (type of run()'s arrays)

from ..contract.errors import EngineError, ErrorCode
from ..contract.manifest import TensorSpec
from .base import Engine, EngineOptions


class OpenVINOEngine(Engine):
    name = "openvino"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return f"openvino is not installed ({exc}); pip install openvino"
        return None

    @classmethod
    def library_version(cls) -> str:
        import openvino

        return openvino.__version__.split("-")[0]

    def __init__(self, model_dir: Path, artifact: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 options: EngineOptions, **kwargs: Any):
        super().__init__(model_dir, artifact, inputs, outputs, options, **kwargs)
        import openvino as ov

        device = options.device
        config: dict[str, str] = {"PERFORMANCE_HINT": options.performance_hint}
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = str(int(options.threads))
        if options.inference_precision:
            config["INFERENCE_PRECISION_HINT"] = options.inference_precision
        path = self.artifact
        try:
            core = ov.Core()
            self.compiled = core.compile_model(str(path), device, config)
        except Exception as exc:
            raise EngineError(f"OpenVINO could not load {path.name}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self._output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.config = config

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            result = self.request.infer(feeds)
        except Exception as exc:
            raise EngineError(f"inference failed: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
        # share_outputs defaults to False: the arrays are copies, safe to keep.
        return dict(zip(self._output_names, result.values()))
