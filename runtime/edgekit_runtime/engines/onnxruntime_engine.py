"""ONNX Runtime engine (CPU execution provider by default)."""

from __future__ import annotations

import bisect
import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import EngineError, ErrorCode
from ..contract.manifest import TensorSpec
from .base import Engine, EngineOptions, LayerTime, ProfiledRun, warn_once

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

        self._providers_used = self._providers(options.providers or ["CPUExecutionProvider"], ort)
        self.session = self._session(ort, self._session_options(ort))
        self._output_names = [o.name for o in self.session.get_outputs()]

    def _session_options(self, ort) -> Any:
        """The session settings this engine runs with (the profiling session copies them)."""
        so = ort.SessionOptions()
        if self.options.threads:
            so.intra_op_num_threads = int(self.options.threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.spin_wait is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spin_wait else "0")
        return so

    def _session(self, ort, so: Any) -> Any:
        path = self.artifact
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=self._providers_used)
        except Exception as exc:  # ORT raises its own untyped errors
            raise EngineError(f"ONNX Runtime could not load {path.name}: {exc}") from exc

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

    @classmethod
    def profiling_unavailable_reason(cls) -> str | None:
        return None

    def profile(self, feeds: Sequence[dict[str, np.ndarray]], warmup: int) -> ProfiledRun:
        """ONNX Runtime's profiler (``SessionOptions.enable_profiling``) on a second session with this one's settings.

        The profiler is a session-creation setting, so the running session is left as it is.
        Its JSON trace holds one ``model_run`` event per query and one ``<node>_kernel_time``
        event per node run; node events are assigned to the ``model_run`` whose time span
        holds them, so the warm-up queries are left out.
        """
        import onnxruntime as ort

        tmp = Path(tempfile.mkdtemp(prefix="edgekit-ort-profile-"))
        try:
            so = self._session_options(ort)
            so.enable_profiling = True
            so.profile_file_prefix = str(tmp / "ort")
            session = self._session(ort, so)
            latency: list[int] = []
            for i in range(warmup + len(feeds)):
                t0 = time.perf_counter_ns()
                session.run(self._output_names, feeds[(i - warmup) % len(feeds)])
                if i >= warmup:
                    latency.append(time.perf_counter_ns() - t0)
            trace = json.loads(Path(session.end_profiling()).read_text())
        except EngineError:
            raise
        except Exception as exc:  # ORT raises its own untyped errors; a trace that is not JSON is ValueError
            raise EngineError(f"ONNX Runtime's profiler failed: {exc}",
                              code=ErrorCode.ENGINE_INFERENCE_FAILED) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        layers, totals = parse_ort_trace(trace, skip_runs=warmup)
        return ProfiledRun(layers=layers, latency_ns=latency, engine_total_us=totals)


# ORT's layout transformer (NCHW → NHWC) renames the nodes it rewrites: node_Conv_68 → node_Conv_68_token_1.
_TOKEN_SUFFIX = re.compile(r"_token_\d+$")
_ORT_PRECISION = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16", "uint8": "int8", "int8": "int8",
                  "int32": "int32", "int64": "int64"}


def parse_ort_trace(trace: list[dict[str, Any]], skip_runs: int = 0) -> tuple[list[list[LayerTime]], list[float]]:
    """ONNX Runtime's profiler trace → (per query, the nodes it ran) and each query's ``model_run`` time in µs.

    A node's precision is the element type of its first input (``uint8``/``int8`` → "int8"):
    a QLinearConv or a Q/DQ-fused node fed 8-bit data ran the integer kernel, a Conv fed
    floats did not.
    """
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    layers: list[list[LayerTime]] = [[] for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in trace:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e["ts"]
        i = _run_of(starts, ts)
        if i is None or ts > runs[i]["ts"] + runs[i]["dur"]:
            continue  # a warm-up query's node
        args = e.get("args") or {}
        types = args.get("input_type_shape") or [{}]
        first = next(iter(types[0]), None) if types and isinstance(types[0], dict) else None
        name = e["name"][: -len("_kernel_time")]
        layers[i].append(LayerTime(
            name=name,
            node=_TOKEN_SUFFIX.sub("", name),
            op_type=str(args.get("op_name", "?")),
            time_us=float(e.get("dur", 0)),
            precision=_ORT_PRECISION.get(first, first),
            kernel=args.get("provider"),
        ))
    return layers, [float(r["dur"]) for r in runs]


def _run_of(starts: list[float], ts: float) -> int | None:
    """Index of the last run that started at or before ``ts``."""
    i = bisect.bisect_right(starts, ts) - 1
    return i if i >= 0 else None
