"""Export stage: the FP32 artifact in the backend's format, and the FP32 reference the gates compare with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgekit_runtime.engines import engine_class

from ...config import TargetProfile
from ...errors import ConfigError, ModelImportError
from ...models.importer import onnx_first_output
from ..gates import AccuracyCheck, FidelityCheck, check_labels
from ..measure import Measurer
from ..state import BuildState

log = logging.getLogger(__name__)


def evaluation_engine(profile: TargetProfile, backend_engine: str) -> str:
    """The first engine of the profile's order that runs on this host (TensorRT usually does not)."""
    reasons = []
    for name in profile.engines:
        reason = engine_class(name).unavailable_reason()
        if reason is None:
            if name != backend_engine:
                log.info("measuring %s artifacts with %s: %s", backend_engine, name, "; ".join(reasons))
            return name
        reasons.append(f"{name}: {reason}")
    raise ConfigError(f"no engine of target {profile.name} runs on this host to validate the build: "
                      + "; ".join(reasons))


class ExportStage:
    name = "export"

    def run(self, state: BuildState) -> dict[str, Any]:
        compiler, profile = state.compiler, state.profile
        engine = evaluation_engine(profile, state.backend.engine)
        state.measurer = Measurer(compiler, state.sig, engine, compiler.reference_options(profile.runtime),
                                  compiler.deploy_options(profile.runtime, state.sig))
        compiler.use_deploy_options(state.measurer.deploy_options)
        state.fp32 = compiler.fp32(state.src, state.workdir)
        ref: dict[str, Any] = {"engine": engine, "options": state.measurer.reference_options}
        # one label per output, checked on every build (with or without validation data)
        probe_out = state.measurer.outputs(state.fp32, state.probe, "probe", reference=True)
        if (conversion := check_conversion(state.src.onnx, state.fp32, state.probe, probe_out)) is not None:
            ref["conversion"] = conversion
        classes = output_classes(state.cfg.postprocess.type, probe_out)
        if classes is not None:
            check_labels(state.labels, classes)
        if state.val is not None:
            # The reference is measured the way the device would run FP32, through the same engine.
            acc = AccuracyCheck(profile.accuracy, state.labels, state.metric_context())
            out = state.measurer.outputs(state.fp32, state.val.x, "validation", reference=True)
            ref["accuracy"] = acc.value(out, state.val.y)
            acc.check_reference(out, state.val.y, ref["accuracy"], state.val.source)
        if state.holdout is not None:
            ref["holdout_outputs"] = state.measurer.outputs(state.fp32, state.holdout, "holdout", reference=True)
            if getattr(state.cfg.postprocess, "type", None) != "detections":  # rows after NMS: not gated by fidelity (quantize stage)
                FidelityCheck(profile.fidelity).check_reference(ref["holdout_outputs"])
            # a model with several outputs: INT8 is held to each of them (a detector's boxes as well as its scores)
            ref["holdout_more_outputs"] = {name: state.measurer.outputs(state.fp32, state.holdout, "holdout",
                                                                        reference=True, output=name)
                                           for name, _ in state.sig.more_outputs}
        state.reference = ref
        state.chosen = state.fp32
        summary = {"artifact": state.fp32.main, "bytes": state.fp32.size_bytes(), "measured_with": engine}
        if "accuracy" in ref:
            summary["fp32_" + profile.accuracy.metric] = ref["accuracy"]
        return summary


# an FP32 artifact in another format computes what the ONNX file computes, up to float rounding: a lower cosine
# on any probe input is a converter's error, not quantization's
MIN_CONVERSION_COSINE = 0.999


def check_conversion(onnx_path, fp32, probe: np.ndarray | None, probe_out: np.ndarray) -> dict[str, Any] | None:
    """The FP32 artifact's first output against ONNX Runtime's on the source ONNX file, on the probe inputs.

    Only for artifacts that are not the ONNX file itself (OpenVINO IR, ``.tflite``) and single-input graphs
    whose first output has the artifact's shape; returns the figures (None when not checked), or refuses a
    conversion that changed what the model computes. The INT8 gates compare with the FP32 artifact, so a
    converter's error would otherwise pass them: INT8 agrees with a wrong FP32.
    """
    if probe is None or fp32.main.endswith(".onnx") or len(probe) == 0:
        return None
    ref = onnx_first_output(onnx_path, probe)
    if ref is None or ref.shape != probe_out.shape or not np.issubdtype(ref.dtype, np.floating):
        return None
    a, b = ref.reshape(len(ref), -1).astype(np.float64), probe_out.reshape(len(ref), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-300), np.all(a == b, axis=1).astype(float))
    out = {"cosine_min": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max()), "samples": len(ref),
           "against": "onnxruntime on the source ONNX"}
    if out["cosine_min"] < MIN_CONVERSION_COSINE:
        raise ModelImportError(
            f"the FP32 {fp32.main} does not compute what {Path(onnx_path).name} computes: cosine "
            f"{out['cosine_min']:.4f} (at least {MIN_CONVERSION_COSINE}) and largest difference "
            f"{out['max_abs_diff']:.3g} on {len(ref)} probe inputs, against ONNX Runtime. The converter changed the "
            f"model; nothing was quantized or written",
            hint="compile it for onnxruntime-cpu or x86-openvino-cpu, or give this target the torch module "
                 "(module:factory or .pt2) rather than an ONNX file")
    return out


def output_classes(postprocess: str, out: np.ndarray) -> int | None:
    """How many classes the first output holds: a detector's ``[B, A, 4 + C]`` has C, a segmenter's
    ``[B, K, H, W]`` has K (background first), a classifier one per output value; None for rows after a
    graph's own NMS, whose class is a value (the device refuses a class beyond the labels)."""
    if postprocess == "detections":
        return None
    if postprocess == "detection" and out.ndim == 3:
        return int(out.shape[2]) - 4
    if postprocess == "segmentation" and out.ndim == 4:
        return int(out.shape[1])
    return int(np.prod(out.shape[1:]))
