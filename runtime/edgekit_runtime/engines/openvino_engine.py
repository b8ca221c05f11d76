"""OpenVINO engine (CPU plugin by default).

On CPUs with AVX512-BF16 or AMX, OpenVINO executes "FP32" models in bf16 unless
``INFERENCE_PRECISION_HINT`` says otherwise; the bundle's ``backend.options``
records the hint the model was validated with, and this engine applies it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np  # noqa: F401  (type of run()'s arrays)

from ..contract.errors import EngineError, ErrorCode
from ..contract.manifest import TensorSpec
from .base import Engine, EngineOptions, LayerTime, ProfiledRun, precision_of_kernel


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

        config: dict[str, str] = {"PERFORMANCE_HINT": options.performance_hint}
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = str(int(options.threads))
        if options.inference_precision:
            config["INFERENCE_PRECISION_HINT"] = options.inference_precision
        self.config = config
        self.compiled = self._compile(ov, config)
        self.request = self.compiled.create_infer_request()
        self._output_names = [o.get_any_name() for o in self.compiled.outputs]

    def _compile(self, ov, config: dict[str, str]) -> Any:
        path = self.artifact
        try:
            return ov.Core().compile_model(str(path), self.options.device, config)
        except Exception as exc:
            raise EngineError(f"OpenVINO could not load {path.name}: {exc}") from exc

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            result = self.request.infer(feeds)
        except Exception as exc:
            raise EngineError(f"inference failed: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
        # share_outputs defaults to False: the arrays are copies, safe to keep.
        return dict(zip(self._output_names, result.values()))

    @classmethod
    def profiling_unavailable_reason(cls) -> str | None:
        return None

    def profile(self, feeds: Sequence[dict[str, np.ndarray]], warmup: int) -> ProfiledRun:
        """OpenVINO's performance counters (``PERF_COUNT``) on a second compiled model with this one's settings.

        ``PERF_COUNT`` is a compile-time property, so the model this engine runs stays
        uncounted. The counters describe the *runtime* graph the plugin built: one entry per
        executed node, whose ``exec_type`` names the kernel and its precision
        (``brgconv_avx512_amx_I8`` ran in INT8, ``brgconv_avx512_f32`` did not). Nodes the
        plugin fused away or did not run (``NOT_RUN``, ``OPTIMIZED_OUT``) are left out.
        """
        import openvino as ov

        compiled = self._compile(ov, {**self.config, "PERF_COUNT": "YES"})
        request = compiled.create_infer_request()
        run = ProfiledRun()
        try:
            for i in range(warmup + len(feeds)):
                t0 = time.perf_counter_ns()
                request.infer(feeds[(i - warmup) % len(feeds)])
                elapsed = time.perf_counter_ns() - t0
                if i < warmup:
                    continue
                run.latency_ns.append(elapsed)
                run.layers.append([
                    LayerTime(name=info.node_name, op_type=info.node_type,
                              time_us=info.real_time.total_seconds() * 1e6,
                              precision=precision_of_kernel(info.exec_type), kernel=info.exec_type)
                    for info in request.get_profiling_info() if info.status == ov.ProfilingInfo.Status.EXECUTED])
        except Exception as exc:
            raise EngineError(f"profiling failed: {exc}", code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
        return run
