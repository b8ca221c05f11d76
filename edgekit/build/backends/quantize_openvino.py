"""OpenVINO: ONNX → OpenVINO IR, and NNCF post-training INT8 quantization.

The FP32 reference is measured with ``INFERENCE_PRECISION_HINT=f32``: on CPUs
with AVX512-BF16/AMX the CPU plugin would otherwise run "FP32" in bf16 and the
accuracy/latency figures would silently describe another precision. Over
budget, the fallback is NNCF's ``quantize_with_accuracy_control``, which
returns layers to float one group at a time, most harmful first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...config import QuantizeSettings, RuntimeSettings
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

    def recover(self, src: SourceModel, calib: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                settings: QuantizeSettings, workdir: Path, max_drop_pts: float,
                evaluate: Callable[[Artifact], float], fp32_accuracy: float) -> tuple[Artifact, list[dict]]:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        dataset, n = _calibration_dataset(calib, settings)
        batches = [(val_x[i : i + 1], val_y[i : i + 1]) for i in range(len(val_x))]
        validation = nncf.Dataset(batches, lambda item: item[0])

        def validate(compiled, items) -> float:
            out = compiled.outputs[0]
            hits = [int(compiled(x)[out].argmax(-1)[0] == y[0]) for x, y in items]
            return float(np.mean(hits))

        q = nncf.quantize_with_accuracy_control(
            self._read(src.onnx), dataset, validation, validate,
            max_drop=max_drop_pts / 100.0, drop_type=nncf.DropType.ABSOLUTE, preset=_preset(settings),
            subset_size=n, fast_bias_correction=settings.fast_bias_correction,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=settings.max_excluded_nodes
            ),
        )
        art = _save(q, workdir / "int8-accuracy-control")
        art.precision = "int8"
        art.details = {"method": "nncf.quantize_with_accuracy_control", "preset": settings.preset,
                       "max_num_iterations": settings.max_excluded_nodes}
        acc = evaluate(art)
        return art, [{"strategy": "nncf_accuracy_control", "accuracy": acc, "drop_pts": fp32_accuracy - acc}]
