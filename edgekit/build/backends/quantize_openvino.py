"""OpenVINO: ONNX → OpenVINO IR, and NNCF post-training INT8 quantization.

The FP32 reference is measured with ``INFERENCE_PRECISION_HINT=f32``: on CPUs
with AVX512-BF16/AMX the CPU plugin would otherwise run "FP32" in bf16 and the
accuracy/latency figures would silently describe another precision. Over
budget, the fallback is NNCF's ``quantize_with_accuracy_control``, which
returns layers to float one group at a time, most harmful first.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...config import QuantizeSettings, RuntimeSettings
from ..gates import Attempt, RecoveryGoal
from .base import Artifact, BackendCompiler, SourceModel, runtime_options

log = logging.getLogger(__name__)


def _save(model, out: Path) -> Artifact:
    import openvino as ov

    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    return Artifact(out, "model.xml", ["model.xml", "model.bin"], "")


def _preset(settings: QuantizeSettings):
    import nncf

    return nncf.QuantizationPreset.MIXED if settings.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE


def _calibration_dataset(calib: np.ndarray, settings: QuantizeSettings):
    import nncf

    x = calib[: settings.calibration_count]
    return nncf.Dataset([x[i : i + 1] for i in range(len(x))]), len(x)


class OpenVINOCompiler(BackendCompiler):
    name = "openvino"
    engine = "openvino"

    def library_version(self) -> str:
        import openvino

        return openvino.__version__.split("-")[0]

    def reference_options(self, runtime: RuntimeSettings) -> dict[str, Any]:
        return {**runtime_options(runtime), "inference_precision": "f32"}

    def _read(self, onnx_path: Path):
        import openvino as ov

        # Core.read_model + the MOC transformations give the graph ov.convert_model gives (same op
        # count), without the converter's usage telemetry, which forks a sender process: unsafe
        # once JAX (pulled in by litert-torch) has started threads in this process. Without the
        # transformations, depthwise convolutions stay f32 after NNCF.
        from openvino._offline_transformations import apply_moc_transformations

        model = ov.Core().read_model(str(onnx_path))
        apply_moc_transformations(model, cf=False)
        return model

    def fp32(self, src: SourceModel, workdir: Path) -> Artifact:
        art = _save(self._read(src.onnx), workdir / "fp32")
        art.precision = "fp32"
        return art

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None) -> Artifact:
        import nncf

        dataset, n = _calibration_dataset(calib, settings)
        q = nncf.quantize(
            self._read(src.onnx), dataset, preset=_preset(settings), subset_size=n,
            fast_bias_correction=settings.fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=list(exclude), validate=False) if exclude else None,
        )
        art = _save(q, workdir / ("int8-x%d" % len(exclude) if exclude else "int8"))
        art.precision = "int8"
        art.details = {"method": "nncf.quantize", "preset": settings.preset, "subset_size": n,
                       "fast_bias_correction": settings.fast_bias_correction, "ignored": list(exclude or [])}
        return art

    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """NNCF's accuracy control, scored by the gate that failed (task metric or cosine to FP32)."""
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        dataset, n = _calibration_dataset(calib, settings)
        # items carry their index: NNCF validates subsets when it ranks layers
        items = [(goal.x[i : i + 1], i) for i in range(len(goal.x))]
        validation = nncf.Dataset(items, lambda item: item[0])

        def validate(compiled, subset) -> float:
            subset = list(subset)
            out = compiled.outputs[0]
            outputs = np.concatenate([compiled(x)[out] for x, _ in subset])
            return goal.score(outputs, np.array([i for _, i in subset]))

        with _nncf_log() as reverted:
            q = nncf.quantize_with_accuracy_control(
                self._read(src.onnx), dataset, validation, validate,
                max_drop=goal.max_drop, drop_type=nncf.DropType.ABSOLUTE, preset=_preset(settings),
                subset_size=n, fast_bias_correction=settings.fast_bias_correction,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=settings.max_excluded_nodes
                ),
            )
        art = _save(q, workdir / "int8-accuracy-control")
        art.precision = "int8"
        art.details = {"method": "nncf.quantize_with_accuracy_control", "preset": settings.preset,
                       "max_num_iterations": settings.max_excluded_nodes, "scored_by": goal.gate,
                       "reverted_layers": list(dict.fromkeys(reverted))}
        return [goal.evaluate(art, "nncf_accuracy_control", art.details)]


@contextlib.contextmanager
def _nncf_log():
    """Collect the layer names NNCF's accuracy control returns to float (it only logs them)."""
    names: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "floating-point precision" in text or "Reverted" in text:
                names.extend(line.strip() for line in text.splitlines()[1:] if line.strip())

    handler = Grab(level=logging.INFO)
    nlog = logging.getLogger("nncf")
    nlog.addHandler(handler)
    try:
        yield names
    finally:
        nlog.removeHandler(handler)
