"""ONNX Runtime: static INT8 quantization to a Q/DQ ONNX model.

``quant_pre_process`` (shape inference + graph optimization), then
``quantize_static`` in QDQ format with per-channel int8 weights. Over budget,
the fallback ranks the quantized layers by how much error each one adds (float
vs Q/DQ activations on calibration samples) and keeps the worst ones in float,
a few at a time, until the budget is met or ``max_excluded_nodes`` is reached.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from edgekit_runtime.fileio import sha256_file

from ...config import QuantizeSettings
from ..gates import Attempt, RecoveryGoal
from .base import Artifact, BackendCompiler, SourceModel

log = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class _Reader:
    """CalibrationDataReader over a tensor, one sample per call."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 1):
        self._items = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._items, None)


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


class OnnxRuntimeCompiler(BackendCompiler):
    name = "onnxruntime"
    engine = "onnxruntime"

    def library_version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def fp32(self, src: SourceModel, workdir: Path) -> Artifact:
        out = workdir / "fp32"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.onnx, out / "model.onnx")
        return Artifact(out, "model.onnx", ["model.onnx"], "fp32")

    def _preprocessed(self, onnx_path: Path, workdir: Path) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # keyed by the model's hash: a kept work folder must never hand a retrained model the old graph
        pre = workdir / f"model_pre.{sha256_file(onnx_path)[:12]}.onnx"
        if not pre.exists():
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=False)
        return pre

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None) -> Artifact:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        pre = self._preprocessed(src.onnx, workdir)
        tag = f"int8-x{len(exclude)}" if exclude else "int8"
        out = workdir / tag
        out.mkdir(parents=True, exist_ok=True)
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        act = QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8
        quantize_static(
            str(pre), str(out / "model.onnx"), _Reader(_input_name(pre), calib[: settings.calibration_count]),
            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel, activation_type=act,
            weight_type=QuantType.QInt8, calibrate_method=methods[settings.calibrate_method],
            nodes_to_exclude=list(exclude or []),
            extra_options={"ActivationSymmetric": settings.activation_type == "int8"},
        )
        return Artifact(out, "model.onnx", ["model.onnx"], "int8",
                        {"format": "QDQ", "per_channel": settings.per_channel,
                         "calibrate_method": settings.calibrate_method, "excluded_nodes": list(exclude or [])})

    # -- fallback -------------------------------------------------------------
    def rank_sensitive_nodes(self, pre: Path, qdq: Path, samples: np.ndarray) -> list[tuple[str, float]]:
        """Weighted nodes sorted by the relative error they add (largest first)."""
        import onnx
        import onnxruntime as ort

        fm = onnx.load(str(pre))
        nodes = [n for n in fm.graph.node if n.op_type in WEIGHTED_OPS]
        # every node output and node input of interest, exposed as graph outputs in both models
        watch = {t for n in nodes for t in (n.output[0], n.input[0])}

        def run_with(path: Path) -> dict[str, np.ndarray]:
            m = onnx.load(str(path))
            have = {o.name for o in m.graph.output}
            produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
            for t in sorted(watch & produced - have):
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            feed = sess.get_inputs()[0].name
            # one sample per run: works for fixed-batch models too
            runs = [sess.run(names, {feed: samples[i : i + 1]}) for i in range(len(samples))]
            return {n: np.concatenate([r[j] for r in runs]) for j, n in enumerate(names)}

        f, q = run_with(pre), run_with(qdq)

        def rel_err(t: str) -> float:
            if t not in f or t not in q:
                return 0.0
            num = float(np.linalg.norm(f[t].astype(np.float64) - q[t]))
            return num / (float(np.linalg.norm(f[t])) + 1e-12)

        added = [(n.name, rel_err(n.output[0]) - rel_err(n.input[0])) for n in nodes]
        return sorted(added, key=lambda kv: kv[1], reverse=True)

    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """Keep the layers that add the most error in float, doubling their number until the gates pass."""
        pre = self._preprocessed(src.onnx, workdir)
        ranking = self.rank_sensitive_nodes(pre, first.directory / first.main, calib[:32])
        attempts: list[Attempt] = []
        limit = min(settings.max_excluded_nodes, len(ranking))
        k = 1
        while k <= limit:
            exclude = [name for name, _ in ranking[:k]]
            art = self.quantize(src, calib, settings, workdir, exclude=exclude)
            attempt = goal.evaluate(art, "exclude_sensitive_nodes", {"excluded_nodes": exclude})
            attempts.append(attempt)
            log.info("kept %d layer(s) in float: %s", k, "passes" if attempt.passed else "still fails")
            if attempt.passed or k == limit:
                break
            k = min(2 * k, limit)
        return attempts
