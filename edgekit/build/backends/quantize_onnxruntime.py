"""ONNX Runtime: static INT8 quantization to a Q/DQ ONNX model.

``quant_pre_process`` (shape inference + graph optimization), then
``quantize_static`` in QDQ format with per-channel int8 weights. The activation
ranges are calibrated once per model and calibration set and cached in the work
folder, so every candidate of the fallback reuses them. Over budget, the fallback
is mixed precision by sensitivity (:mod:`.sensitivity`): the fewest layers, ranked
by the error each adds on its own, are kept in float until every gate passes.
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
from .sensitivity import RANKING_SAMPLES, QdqOptions, input_name, rank_isolated, search_fewest, write_qdq

log = logging.getLogger(__name__)


def _input_name(path: Path) -> str:
    """The model's data input (kept under this name for the modules that import it)."""
    return input_name(path)


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
        """``onnx_path`` after ORT's ``quant_pre_process``, or after the fallback that worked.

        ORT's symbolic shape inference asserts on some exporters' graphs; plain static
        quantization works on them, so a failure falls back (without symbolic inference,
        ONNX shape inference only, the model as is) rather than ending the build. The
        fallbacks taken are kept beside the file (``.fallbacks.json``) and logged.
        """
        import json

        from ...models.onnx_normalize import optimize_with_fallbacks

        # keyed by the model's hash: a kept work folder must never hand a retrained model the old graph
        pre = workdir / f"model_pre.{sha256_file(onnx_path)[:12]}.onnx"
        if not pre.exists():
            fallbacks = optimize_with_fallbacks(onnx_path, pre)
            if fallbacks:
                pre.with_suffix(".fallbacks.json").write_text(json.dumps(fallbacks, indent=2))
        return pre

    @staticmethod
    def preprocess_fallbacks(pre: Path) -> list:
        """The fallbacks ``_preprocessed`` took for ``pre`` (none: ORT's pre-processing ran as it is)."""
        import json

        fb = pre.with_suffix(".fallbacks.json")
        return json.loads(fb.read_text()) if fb.exists() else []

    def qdq_options(self, settings: QuantizeSettings) -> QdqOptions:
        """This backend's Q/DQ rules: the profile's activation type, per-channel int8 weights."""
        return QdqOptions(settings.activation_type, settings.per_channel, settings.calibrate_method,
                          {"ActivationSymmetric": settings.activation_type == "int8"})

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None) -> Artifact:
        pre = self._preprocessed(src.onnx, workdir)
        out = workdir / (f"int8-x{len(exclude)}" if exclude else "int8")
        write_qdq(pre, out / "model.onnx", calib[: settings.calibration_count], self.qdq_options(settings), workdir,
                  exclude=exclude)
        return Artifact(out, "model.onnx", ["model.onnx"], "int8",
                        {"format": "QDQ", "per_channel": settings.per_channel,
                         "calibrate_method": settings.calibrate_method, "excluded_nodes": list(exclude or []),
                         "preprocess_fallbacks": self.preprocess_fallbacks(pre)})

    # -- fallback -------------------------------------------------------------
    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """Mixed precision by sensitivity: the fewest layers kept in float (by ONNX node name) that pass the gates."""
        pre = self._preprocessed(src.onnx, workdir)
        x = calib[: settings.calibration_count]
        ranking = rank_isolated(pre, x, self.qdq_options(settings), workdir, x[:RANKING_SAMPLES])
        return search_fewest(ranking, settings.max_excluded_nodes,
                             lambda names: self.quantize(src, calib, settings, workdir, exclude=names), goal)
