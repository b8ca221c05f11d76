"""OpenVINO: ONNX → OpenVINO IR, and NNCF post-training INT8 quantization.

The FP32 reference is measured with ``INFERENCE_PRECISION_HINT=f32``: on CPUs
with AVX512-BF16/AMX the CPU plugin would otherwise run "FP32" in bf16 and the
accuracy/latency figures would silently describe another precision. Over
budget, the fallback is mixed precision by sensitivity (:mod:`.sensitivity`):
layers are ranked on the ONNX graph, and the fewest that pass the gates are kept
in float through NNCF's ``IgnoredScope`` (ONNX node names map to the IR's ops:
OpenVINO's ONNX frontend names a Conv/Gemm ``<onnx name>/WithoutBiases`` and its
bias Add ``<onnx name>``). Only if that search fails does NNCF's
``quantize_with_accuracy_control`` run as a second attempt. Measured on the digits
CNN with two outlier activations (``benchmarks/mixed_precision.py``) both keep the
same one layer in float at about the same compile time; the search goes first
because each candidate is held to every quality gate (accuracy control scores one
metric), its ranking and candidates are in the report (accuracy control's choice
can only be read from its log), and it is the strategy every backend shares.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...config import QuantizeSettings, RuntimeSettings
from ..gates import Attempt, RecoveryGoal
from .attention import find_attention
from ...data.sources import named_feeds
from .base import Artifact, BackendCompiler, SourceModel, runtime_options
from .sensitivity import RANKED_OPS, RANKING_SAMPLES, QdqOptions, rank_isolated, search_fewest

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
    if x.dtype.names:  # several inputs: OpenVINO takes a dict by input name
        return nncf.Dataset([named_feeds(x[i : i + 1], list(x.dtype.names)) for i in range(len(x))]), len(x)
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

    def recipes(self, src: SourceModel) -> list[str]:
        """``transformer`` where the graph has attention (:func:`.attention.find_attention`)."""
        return ["transformer"] if find_attention(src.onnx) else []

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None, recipe: str | None = None) -> Artifact:
        """NNCF INT8; ``exclude`` (ONNX node names or IR op names) stays float through NNCF's ignored scope.

        ``recipe="transformer"``: NNCF's ``model_type=TRANSFORMER`` — its ignored patterns keep attention's
        Softmax, the normalizations and the residual/GELU elementwise ops in float and SmoothQuant migrates
        activation outliers into the MatMul weights (on ViT-Ti/16: cosine to FP32 0.91 → 0.998)."""
        import nncf

        dataset, n = _calibration_dataset(calib, settings)
        model = self._read(src.onnx)
        ignored, unmapped = ir_names(model, src.onnx, exclude or [])
        if unmapped:
            log.warning("no OpenVINO op for ONNX node(s) %s: they stay INT8", ", ".join(unmapped))
        if recipe not in (None, "transformer"):
            raise ValueError(f"unknown INT8 recipe {recipe!r} for {self.name}")
        q = nncf.quantize(
            model, dataset, preset=_preset(settings), subset_size=n,
            fast_bias_correction=settings.fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            **({"model_type": nncf.ModelType.TRANSFORMER} if recipe == "transformer" else {}),
        )
        tag = f"-{recipe}" if recipe else ""
        art = _save(q, workdir / (f"int8{tag}-x{len(exclude)}" if exclude else f"int8{tag}"))
        art.precision = "int8"
        art.details = {"method": "nncf.quantize", "preset": settings.preset, "subset_size": n,
                       **({"model_type": "TRANSFORMER"} if recipe == "transformer" else {}),
                       "fast_bias_correction": settings.fast_bias_correction, "ignored": ignored,
                       "excluded_nodes": list(exclude or []), **({"unmapped": unmapped} if unmapped else {})}
        return art

    def qdq_options(self, settings: QuantizeSettings) -> QdqOptions:
        """The Q/DQ graph the layers are ranked on, as close to NNCF's as ONNX Runtime writes it: per-channel
        int8 weights; symmetric int8 activations (preset performance) or asymmetric uint8 (mixed); and, as NNCF
        places its FakeQuantize on a layer's inputs only, no quantized outputs (ONNX Runtime would quantize a
        Conv's output too and rank the producer of an outlier tensor, which NNCF's ignored scope cannot help)."""
        act = "int8" if settings.preset == "performance" else "uint8"
        return QdqOptions(act, True, "minmax", {"ActivationSymmetric": act == "int8", "WeightSymmetric": True,
                                                "OpTypesToExcludeOutputQuantization": sorted(RANKED_OPS)})

    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """Mixed precision by sensitivity; if no candidate passes, NNCF's accuracy control as a second attempt."""
        x = calib[: settings.calibration_count]
        # ranked on the ONNX file OpenVINO reads (not ONNX Runtime's pre-processed copy): the names must be its own
        ranking = rank_isolated(src.onnx, x, self.qdq_options(settings), workdir, x[:RANKING_SAMPLES])
        attempts = search_fewest(ranking, settings.max_excluded_nodes,
                                 lambda names: self.quantize(src, calib, settings, workdir, exclude=names), goal,
                                 details=lambda art: {k: art.details[k] for k in ("ignored", "unmapped")
                                                      if k in art.details})
        if any(a.passed for a in attempts):
            return attempts
        return attempts + self.accuracy_control(src, calib, settings, workdir, goal)

    def accuracy_control(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                         goal: RecoveryGoal) -> list[Attempt]:
        """NNCF's accuracy control, scored by the gate that failed (task metric or cosine to FP32)."""
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        dataset, n = _calibration_dataset(calib, settings)
        # items carry their index: NNCF validates subsets when it ranks layers
        names = list(goal.x.dtype.names or [])
        items = [(named_feeds(goal.x[i : i + 1], names) if names else goal.x[i : i + 1], i) for i in range(len(goal.x))]
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


def ir_names(model, onnx_path: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """The IR ops that ONNX nodes ``names`` became, and the names with none.

    OpenVINO's ONNX frontend keeps a node's name on the op that produces its output and names the
    ops it adds in front ``<name>/...`` (a Conv or Gemm with bias: ``<name>/WithoutBiases`` + the Add
    ``<name>``); where the graph's output renames the last op, the node's output tensor finds it.
    """
    import onnx

    outputs = {n.name: set(n.output) for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    ops = [(op.get_friendly_name(), {t for o in op.outputs() for t in o.get_names()})
           for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Constant", "Result")]
    found: list[str] = []
    unmapped: list[str] = []
    for name in names:
        hits = [f for f, tensors in ops
                if f == name or f.startswith(name + "/") or tensors & outputs.get(name, set())]
        if hits:
            found += [h for h in hits if h not in found]
        else:
            unmapped.append(name)
    return found, unmapped


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
