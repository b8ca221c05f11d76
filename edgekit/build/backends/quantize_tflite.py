"""Mobile / ARM: PyTorch → ``.tflite`` with litert-torch, full-integer INT8 through PT2E.

* float: ``litert_torch.convert(model, (sample,))``;
* INT8: the model is exported with ``torch.export(strict=True)`` — non-strict
  export drops ``source_fn_stack`` and litert-torch's PT2E quantizer then leaves
  residual ADDs in float — calibrated in batches, converted with int8 input and
  output tensors (scale/zero-point recorded in the manifest; the runtime
  quantizes and dequantizes, so users still pass float images);
* fallback when over budget: ai-edge-quantizer's static int8 recipe on the
  float model (a different calibration and rounding path), the better of the two
  is kept.

The converted model has a fixed batch of 1 and keeps the NCHW input layout
(litert-torch inserts the transposes). Figures measured on an x86 host run the
same XNNPACK kernels the ARM build uses, but an x86 CPU without VNNI gains
nothing from INT8: latency on the device is what counts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...config import QuantizeSettings, RuntimeSettings
from ..gates import Attempt, RecoveryGoal
from .base import Artifact, BackendCompiler, Signature, SourceModel, runtime_options

log = logging.getLogger(__name__)
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")

CALIBRATION_BATCH = 16


def _module(src: SourceModel):
    import torch

    model = src.torch
    if not isinstance(model, torch.nn.Module):  # a torch.export program
        model = model.module()
    return model.eval()


def _sample(src: SourceModel):
    import torch

    return torch.zeros([1, *src.input_shape[1:]], dtype=torch.float32)


def io_quantization(path: Path) -> dict[str, dict | None]:
    """Quantization of the model's first input and output, as the manifest records it."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))

    def q(detail: dict) -> dict | None:
        dtype = np.dtype(detail["dtype"]).name
        if dtype not in ("int8", "uint8", "int16"):
            return None
        scale, zero_point = detail["quantization"]
        return {"dtype": dtype, "scale": float(scale), "zero_point": int(zero_point)}

    return {"input": q(it.get_input_details()[0]), "output": q(it.get_output_details()[0]),
            "input_shape": [int(d) for d in it.get_input_details()[0]["shape"]],
            "output_shape": [int(d) for d in it.get_output_details()[0]["shape"]]}


def _artifact(out: Path, precision: str, details: dict[str, Any]) -> Artifact:
    details = {**details, "io": io_quantization(out / "model.tflite")}
    return Artifact(out, "model.tflite", ["model.tflite"], precision, details)


class TFLiteCompiler(BackendCompiler):
    name = "tflite"
    engine = "tflite"
    needs_torch = True

    def library_version(self) -> str:
        import importlib.metadata as md

        return f"litert-torch {md.version('litert-torch')}, ai-edge-litert {md.version('ai-edge-litert')}"

    def fp32(self, src: SourceModel, workdir: Path) -> Artifact:
        import litert_torch

        out = workdir / "tflite-fp32"
        out.mkdir(parents=True, exist_ok=True)
        litert_torch.convert(_module(src), (_sample(src),)).export(str(out / "model.tflite"))
        return _artifact(out, "fp32", {"converter": "litert_torch.convert"})

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None) -> Artifact:
        import litert_torch
        import torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        if exclude:
            raise NotImplementedError("the TFLite compiler has no per-layer exclusion; recover() uses another recipe")
        x = torch.from_numpy(calib[: settings.calibration_count])
        batches = [x[i : i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)]
        model = _module(src)
        dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},)
        strict = True
        try:
            graph = torch.export.export(model, (batches[0],), strict=True, dynamic_shapes=dynamic).module()
        except Exception as exc:  # strict tracing rejects some Python constructs
            log.warning("strict torch.export failed (%s); non-strict export may leave residual adds in float", exc)
            strict = False
            graph = torch.export.export(model, (batches[0],), dynamic_shapes=dynamic).module()
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=settings.per_channel, is_dynamic=False))
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for xb in batches:
                prepared(xb)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        converted.training = False
        out = workdir / "tflite-int8"
        out.mkdir(parents=True, exist_ok=True)
        litert_torch.convert(converted, (_sample(src),), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
            str(out / "model.tflite"))
        return _artifact(out, "int8", {"method": "litert-torch PT2E static", "per_channel": settings.per_channel,
                                       "strict_export": strict, "calibration_samples": len(x),
                                       "int8_ops": int8_op_share(out / "model.tflite")})

    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """Another recipe: ai-edge-quantizer's static int8 (all-int8 residual adds, other rounding)."""
        from ai_edge_quantizer import quantizer as aeq_quantizer
        from ai_edge_quantizer import recipe as aeq_recipe

        fp32 = self.fp32(src, workdir)
        qt = aeq_quantizer.Quantizer(str(fp32.directory / fp32.main))
        qt.load_quantization_recipe(aeq_recipe.static_wi8_ai8())
        name = _input_name(fp32.directory / fp32.main)
        x = calib[: settings.calibration_count]
        stats = qt.calibrate({"serving_default": [{name: x[i : i + 1]} for i in range(len(x))]})
        out = workdir / "tflite-int8-aeq"
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.tflite").write_bytes(qt.quantize(stats).quantized_model)
        art = _artifact(out, "int8", {"method": "ai-edge-quantizer static_wi8_ai8",
                                      "calibration_samples": len(x), "int8_ops": int8_op_share(out / "model.tflite")})
        return [goal.evaluate(art, "ai_edge_quantizer", art.details)]

    def signature(self, artifact: Artifact, sig: Signature) -> Signature:
        io = artifact.details["io"]
        return Signature(sig.input_name, sig.output_name, io["input_shape"], io["output_shape"],
                         input_quantization=io["input"], output_quantization=io["output"])

    def deploy_options(self, runtime: RuntimeSettings, sig: Signature) -> dict[str, Any]:
        return runtime_options(runtime)


def _input_name(path: Path) -> str:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_list()
    return runner["serving_default"]["inputs"][0]


def int8_op_share(path: Path) -> dict[str, int]:
    """How many operators compute in integer vs float (a quantized model should have ~no float ops)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    counts = {"int8": 0, "float": 0, "total": 0}
    for op in it._get_ops_details():  # noqa: SLF001 - the only API listing ops
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "DELEGATE"):
            continue
        counts["total"] += 1
        outs = [tensors.get(i) for i in op["outputs"] if i >= 0]
        counts["int8" if outs and all(d in ("int8", "int16", "int32") for d in outs) else "float"] += 1
    return counts
