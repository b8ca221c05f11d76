"""Quantization-aware training: fine-tune the model with fake quantization, export the backend's INT8 artifact.

Post-training INT8 picks one range per activation tensor from calibration data; a tensor with a few
large outlier channels gets a range so wide that every other channel rounds to a handful of levels.
QAT trains the weights *and* the quantizer ranges with the quantization in the loop (straight-through
gradients), so the network learns to live with a clipped range, and every layer stays INT8 — where the
backends' fallbacks (:meth:`edgekit.build.backends.base.BackendCompiler.recover`) give layers back to float.

One recipe per backend family, each ending in the same artifact the backend's PTQ makes:

* OpenVINO, ONNX Runtime, TensorRT — NNCF's torch QAT (``nncf.quantize`` on the torch module gives
  trainable FakeQuantize hooks), fine-tuned with the run's training loop, stripped to torch's own
  fake-quant modules and exported as a Q/DQ ONNX graph: shipped as is for ONNX Runtime, with a
  ``calibration.cache`` (signed symmetric activations) for TensorRT, read into OpenVINO IR for OpenVINO
  (OpenVINO turns each Q/DQ pair into a FakeQuantize, as NNCF's own IR has);
* LiteRT (TFLite) — PT2E QAT (``prepare_qat_pt2e`` with litert-torch's quantizer, ``is_qat=True``),
  fine-tuned, ``convert_pt2e``, converted with the same ``QuantConfig`` the PTQ path uses.

Batch norms are folded into their convolutions before NNCF's QAT, so the exported graph has the
Conv-after-DequantizeLinear pattern the engines fuse into integer kernels (an unfolded BN between a
convolution and its output quantizer would leave the convolution in float). The fine-tuning distils
from the FP32 model (classification): the INT8 model learns the FP32 model's outputs, which is what
the fidelity gate compares with. Nothing here judges the result: the quantize stage measures the
exported artifact through the device engine, like any other attempt.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..build.backends.base import Artifact, Signature
from ..config import QuantizeSettings
from ..errors import ConfigError
from .finetune import FinetuneContext, finetune

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
ONNX_OPSET = 17  # per-axis QuantizeLinear (13+); what ONNX Runtime, OpenVINO and TensorRT 8.6+ all read


@dataclass
class QATJob:
    """What one QAT run needs: the FP32 torch model, the run to train with, calibration data, the deployed signature."""

    model: Any  # torch.nn.Module (FP32, trained); never changed: QAT works on a copy
    ctx: FinetuneContext
    calib: np.ndarray
    settings: QuantizeSettings
    workdir: Path
    sig: Signature  # input/output names and shapes the artifact must keep (the manifest's)

    @property
    def epochs(self) -> int:
        return self.settings.qat_epochs


# ------------------------------------------------------------------------------------------ shared pieces
def _batches(x: np.ndarray, count: int) -> list:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(x[:count]))
    return [x[i : i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)]


def _teacher(job: QATJob):
    """The FP32 model as a frozen teacher (classification only: distillation matches class distributions)."""
    from ..train.distill import KD, freeze

    if not job.ctx.setup.task.classifies:
        return {}
    return {"teacher": freeze(copy.deepcopy(job.model).eval()), "distill": KD(temperature=4.0, alpha=1.0)}


def fold_batchnorm(model) -> list[str]:
    """Fold every BatchNorm that follows a convolution (its only user) into that convolution, in place.

    The pattern is found on a ``torch.fx`` trace; a model fx cannot trace keeps its batch norms (QAT
    still works, the engines then run those convolutions in float). Returns the folded BN names.
    """
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any trace failure only means "no folding"
        log.info("batch norms not folded (torch.fx cannot trace the model: %s)", exc)
        return []
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(modules.get(prev.target), nn.Conv2d)):
            continue
        conv, bn = modules[prev.target], modules[node.target]
        _set_module(model, prev.target, fuse_conv_bn_eval(conv, bn))
        _set_module(model, node.target, nn.Identity())
        folded.append(node.target)
    return folded


def _set_module(root, dotted: str, new) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _nncf_reference_kernels() -> None:
    """Run NNCF's fake quantization with its pure-torch kernels.

    NNCF otherwise compiles a C++ extension on first use (a toolchain, a minute or more, a lock file a
    killed build leaves behind); the models edgekit fine-tunes on a CPU are small enough for the
    reference kernels, which compute the same rounding.
    """
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    if QuantizedFunctionsCPU._loaded_namespace is None:  # noqa: SLF001 - NNCF has no public switch for this
        QuantizedFunctionsCPU._loaded_namespace = ReferenceQuantizedFunctions  # noqa: SLF001


def _export_qdq(model, sig: Signature, path: Path) -> None:
    """Torch fake-quant modules → ONNX QuantizeLinear/DequantizeLinear pairs, with the manifest's names and batch."""
    import torch

    shape = [d if isinstance(d, int) else 1 for d in sig.input_shape]
    dynamic = not isinstance(sig.input_shape[0], int)
    axes = {sig.input_name: {0: "batch"}, sig.output_name: {0: "batch"}} if dynamic else None
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter writes fake_quantize_per_{tensor,channel}_affine as Q/DQ pairs; the dynamo
    # exporter cannot trace torch's FakeQuantize modules (they branch on a buffer's value).
    torch.onnx.export(model.eval(), (torch.zeros(shape),), str(path), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=[sig.input_name], output_names=[sig.output_name], dynamic_axes=axes,
                      do_constant_folding=True)
    _fold_weight_quantizers(path)


def _fold_weight_quantizers(path: Path) -> None:
    """Store each quantized weight as an int8 initializer: ``Q(w) → DQ`` becomes ``w_int8 → DQ``.

    The exported graph quantizes float weights at run time; the engines fold that anyway, but the file
    would carry float weights (4× the size of the PTQ artifact). Same numbers either way.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    # the exporter shares equal scales/zero points through Identity nodes
    alias = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Identity"}

    def value(name: str):
        while name in alias:
            name = alias[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    users: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    keep, new_inits = [], []
    for n in m.graph.node:
        w = value(n.input[0]) if n.op_type == "QuantizeLinear" and n.input[0] in inits else None
        if w is None or users.get(n.input[0], 0) != 1:
            keep.append(n)
            continue
        scale, zp = value(n.input[1]), value(n.input[2])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.size > 1:
            shape[axis] = -1
        q = np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.int32)
        info = np.iinfo(zp.dtype)
        new_inits.append(numpy_helper.from_array(np.clip(q, info.min, info.max).astype(zp.dtype), n.output[0]))
        m.graph.initializer.remove(inits[n.input[0]])
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.initializer.extend(new_inits)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


# ------------------------------------------------------------------------------------------ NNCF (OV, ORT, TRT)
def _nncf_qat(job: QATJob, signed_activations: bool) -> tuple[Any, dict[str, Any]]:
    """NNCF QAT on a BN-folded copy of the model, fine-tuned; returns the stripped torch fake-quant model."""
    import nncf
    import torch
    from nncf.parameters import StripFormat

    _nncf_reference_kernels()
    model = copy.deepcopy(job.model).eval()
    folded = fold_batchnorm(model)
    s = job.settings
    batches = _batches(job.calib, s.calibration_count)
    preset = nncf.QuantizationPreset.MIXED if s.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    q = nncf.quantize(model, nncf.Dataset(batches), preset=preset, subset_size=len(batches))
    if signed_activations:
        _force_signed(q)
    ran = finetune(job.ctx, q, job.epochs, name="qat", **_teacher(job))
    example = torch.zeros([d if isinstance(d, int) else 1 for d in job.sig.input_shape])
    stripped = nncf.strip(q, do_copy=True, strip_format=StripFormat.NATIVE, example_input=example)
    details = {"method": "nncf QAT (torch)", "preset": s.preset, "folded_batchnorms": len(folded),
               "signed_activations": signed_activations, "finetune": ran}
    return stripped.eval(), details


def _force_signed(model) -> int:
    """Make every unsigned (post-ReLU) symmetric quantizer signed int8, zero point 0, same range.

    NNCF's ``signedness_to_force`` conflicts with its own hardware config on the first convolution, so
    the quantizers are switched after insertion, before fine-tuning: QAT then trains with the one bit
    fewer that TensorRT's symmetric int8 activations give non-negative tensors (as its PTQ path does).
    """
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import SymmetricQuantizer

    switched = 0
    for _, hook in get_hook_storage(model).named_hooks():
        if isinstance(hook, SymmetricQuantizer) and not hook.signed:
            hook.signed = True
            switched += 1
    return switched


def _onnxruntime(job: QATJob) -> Artifact:
    model, details = _nncf_qat(job, signed_activations=job.settings.activation_type == "int8")
    out = job.workdir / "qat-int8"
    _export_qdq(model, job.sig, out / "model.onnx")
    return Artifact(out, "model.onnx", ["model.onnx"], "int8", {**details, "format": "QDQ"})


def _tensorrt(job: QATJob) -> Artifact:
    from ..build.backends.quantize_tensorrt import activation_amax
    from ..build.backends.tensorrt_calibration import write_cache

    # TensorRT's explicit quantization takes symmetric int8 activations (zero point 0), never uint8
    model, details = _nncf_qat(job, signed_activations=True)
    out = job.workdir / "trt-qat-int8"
    _export_qdq(model, job.sig, out / "model.onnx")
    amax = activation_amax(out / "model.onnx")
    (out / "calibration.cache").write_text(write_cache(amax))
    return Artifact(out, "model.onnx", ["model.onnx", "calibration.cache"], "int8",
                    {**details, "format": "QDQ (explicit quantization)", "calibration_cache": "calibration.cache",
                     "activation_tensors": len(amax)})


def _openvino(job: QATJob) -> Artifact:
    import openvino as ov
    from openvino._offline_transformations import apply_moc_transformations

    from ..build.backends.quantize_openvino import _save

    model, details = _nncf_qat(job, signed_activations=False)
    onnx_path = job.workdir / "qat-onnx" / "model.onnx"
    _export_qdq(model, job.sig, onnx_path)
    # read_model + MOC, as the OpenVINO compiler reads its ONNX (no converter telemetry process)
    ov_model = ov.Core().read_model(str(onnx_path))
    apply_moc_transformations(ov_model, cf=False)
    art = _save(ov_model, job.workdir / "qat-int8")
    art.precision = "int8"
    art.details = {**details, "format": "OpenVINO IR (FakeQuantize from Q/DQ)"}
    return art


# ------------------------------------------------------------------------------------------ PT2E (LiteRT)
def _tflite(job: QATJob) -> Artifact:
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from ..build.backends.quantize_tflite import _artifact, int8_op_share

    s = job.settings
    batches = _batches(job.calib, s.calibration_count)
    model = copy.deepcopy(job.model).eval()
    # litert-torch's QAT conv-BN annotation cannot build its pattern under this torch (it exports a plain
    # function); with the batch norms folded first there is no conv-BN pattern to annotate, and the
    # quantizer below skips those annotators
    folded = fold_batchnorm(model)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    # strict export keeps source_fn_stack, without which litert-torch's quantizer leaves adds in float
    graph = torch.export.export(model, (batches[0],), strict=True, dynamic_shapes=dynamic).module()
    class FoldedQATQuantizer(pt2e_quantizer.PT2EQuantizer):
        STATIC_QAT_ONLY_OPS: list[str] = []  # conv-BN patterns: none left after folding (and they fail to build)

    quantizer = FoldedQATQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=s.per_channel, is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    allow_exported_model_train_eval(prepared)  # the Trainer switches train/eval (BN, dropout) on it
    with torch.no_grad():  # the observers' first ranges: the calibration set, as PTQ sees it
        for xb in batches:
            prepared(xb)
    ran = finetune(job.ctx, prepared, job.epochs, name="qat", **_teacher(job))
    prepared.eval()
    converted = convert_pt2e(prepared, fold_quantize=False)
    converted.training = False
    out = job.workdir / "tflite-qat-int8"
    out.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros([1, *[int(d) for d in job.sig.input_shape[1:]]])
    litert_torch.convert(converted, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
        str(out / "model.tflite"))
    return _artifact(out, "int8", {"method": "litert-torch PT2E QAT (prepare_qat_pt2e)", "per_channel": s.per_channel,
                                   "folded_batchnorms": len(folded), "finetune": ran,
                                   "int8_ops": int8_op_share(out / "model.tflite")})


# ------------------------------------------------------------------------------------------ entry point
RECIPES: dict[str, Callable[[QATJob], Artifact]] = {
    "openvino": _openvino,
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
    "tflite": _tflite,
}


def quantization_aware_training(backend: str, job: QATJob) -> Artifact:
    """The INT8 artifact of ``backend`` after QAT; ``artifact.details`` says how it was made and what it took."""
    recipe = RECIPES.get(backend)
    if recipe is None:
        raise ConfigError(f"quantization-aware training has no recipe for the {backend!r} backend "
                          f"(known: {', '.join(RECIPES)}); set quantize.qat: off")
    t0 = time.perf_counter()
    art = recipe(job)
    art.details["seconds"] = round(time.perf_counter() - t0, 3)
    art.details["epochs"] = job.epochs
    return art
