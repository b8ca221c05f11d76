"""Mobile / ARM: PyTorch → ``.tflite`` with litert-torch, full-integer INT8 through PT2E.

* float: ``litert_torch.convert(model, (sample,))``;
* INT8: the model is exported with ``torch.export(strict=True)`` — non-strict
  export drops ``source_fn_stack`` and litert-torch's PT2E quantizer then leaves
  residual ADDs in float — calibrated in batches, converted with int8 input and
  output tensors (scale/zero-point recorded in the manifest; the runtime
  quantizes and dequantizes, so users still pass float images);
* ``recipe="transformer"`` (graphs with attention, tried when PTQ misses a gate):
  ai-edge-quantizer's int16-activation / int8-weight recipe (TFLite's "16x8"
  mode). On a ViT no single op type carries the INT8 loss — keeping every
  Softmax, GELU, LayerNorm piece, residual ADD or matmul in float moved the
  cosine to FP32 by under 0.005 each — it accumulates over every int8 activation
  on the residual stream; int16 activations remove it (4-block ViT: 0.963 →
  0.999). The weights stay int8 (a quarter of the float size), but most CPU
  kernels for int16 activations are reference code (on an x86 host 20× slower
  than float XNNPACK): the latency gate decides whether it ships;
* fallback when over budget: ai-edge-quantizer's static int8 recipe on the
  float model (a different calibration and rounding path); if that misses the
  gates too, mixed precision by sensitivity (:mod:`.sensitivity`) on the same
  recipe: the float ``.tflite`` ops are ranked by the error each adds when it
  alone is INT8, and the fewest are kept in float by a per-op ``no_quantize``
  override (ai-edge-quantizer matches an op by its scope, the names of its output
  tensors). The ranking is the TFLite graph's own: litert-torch converts from the
  torch module, so its ops carry no ONNX node names.

The converted model has a fixed batch of 1 and keeps the NCHW input layout
(litert-torch inserts the transposes). Figures measured on an x86 host run the
same XNNPACK kernels the ARM build uses, but an x86 CPU without VNNI gains
nothing from INT8: latency on the device is what counts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ...config import QuantizeSettings, RuntimeSettings
from ...errors import ConfigError, EdgekitError, ModelImportError
from ..gates import Attempt, RecoveryGoal
from .attention import find_attention
from .base import Artifact, BackendCompiler, Signature, SourceModel, runtime_options
from .onnx_to_torch import converter_version, onnx_to_torch
from .sensitivity import RANKING_SAMPLES, LayerError, relative_error, search_fewest

log = logging.getLogger(__name__)
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")

CALIBRATION_BATCH = 16
CONVERSION_TRIES = 2  # litert-torch conversions of one module, until the float .tflite matches it (see fp32())
CONVERSION_TOLERANCE = 1e-3  # largest output difference allowed, relative to the output's largest magnitude
# TFLite ops worth keeping in float (they compute); data movement follows its input's precision
RANKED_TFL_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "FULLY_CONNECTED", "BATCH_MATMUL",
                            "ADD", "SUB", "MUL", "MEAN", "SUM", "AVERAGE_POOL_2D", "CONCATENATION", "SOFTMAX",
                            "LOGISTIC", "TANH", "GELU", "RESIZE_BILINEAR"})


_CONVERTED: dict[tuple[str, int], Any] = {}  # ONNX file (path, mtime) → its torch module, converted once


def _module(src: SourceModel):
    import torch

    if src.torch is None:
        key = (str(src.onnx), src.onnx.stat().st_mtime_ns)
        if key not in _CONVERTED:
            _CONVERTED.clear()  # one build's model at a time
            _CONVERTED[key] = onnx_to_torch(src.onnx)
            contiguous_constants(_CONVERTED[key])
        return _CONVERTED[key]
    model = src.torch
    if not isinstance(model, torch.nn.Module):  # a torch.export program
        model = model.module()
    contiguous_constants(model)
    return model.eval()


def readable_scope(scope: str) -> str:
    """An op's scope as a module path a user can find in the model: ``features.0.0 (Conv2d)``.

    litert-torch names an op's output after the module path it came from, each level written
    ``<module>.<Class>_<attribute>`` under the root's qualified name (under non-strict export, a
    ``torch.export…<locals>.Wrapper``; for an onnx2torch module the ONNX node's path follows in plain
    levels), with ``;;`` between the locations of fused ops (a Conv with its BatchNorm and ReLU lists the
    ReLU first and the Conv last). The last location is the op the others were fused into; a scope in
    another form is returned as it is."""
    levels = _last_location(scope).split(";")[0].split("/")
    if len(levels) < 2 or "." not in levels[0]:  # not a qualified root: a name of another form
        return scope
    attrs, kind = [], None
    for level in levels[1:]:  # onnx2torch's modules are named by ONNX node paths: their levels go on unqualified
        if "." in level:
            kind, _, attr = level.rsplit(".", 1)[-1].partition("_")  # Conv2d_0: the class and the attribute
            attrs.append(attr or kind)
        else:
            attrs.append(level)
    return ".".join(attrs) + (f" ({kind})" if kind else "")


def readable_scopes(scopes: list[str]) -> list[str]:
    """:func:`readable_scope` of each, told apart where several ops came from one module (a LayerNorm lowers to
    a mean, a subtraction, a rsqrt …): those carry the number litert-torch gave the op, ``… (LayerNorm) #11``."""
    names = [readable_scope(s) for s in scopes]
    seen = Counter(names)
    out = []
    for scope, name in zip(scopes, names):
        if seen[name] > 1 and name != scope:
            location = _last_location(scope)
            number = location.split(";")[1] if ";" in location else ""
            name = f"{name} #{number or '?'}"
        out.append(name)
    return out


def _last_location(scope: str) -> str:
    """The last of a scope's ``;;``-separated locations: the op the others were fused into."""
    return ([part for part in scope.split(";;") if part] or [scope])[-1]


def contiguous_constants(module) -> int:
    """Give every parameter, buffer and tensor attribute of ``module`` its own contiguous storage; returns how
    many were copied.

    litert-torch 0.10 inlines each constant under a cache key made from the storage address of
    ``tensor.contiguous()`` (``backend/inline_consts.py``). For a transposed weight that is a temporary, freed
    before the next constant is lowered, so two same-shaped transposed weights can get the same address and the
    second layer silently gets the first one's weights. onnx2torch writes every ``Gemm(transB=1)`` weight as such
    a view (a ViT's attention and MLP projections): a 2-block ViT converted wrong in most runs, right in some,
    which of them depending on the allocator. Contiguous, every constant is inlined from its own storage."""
    import torch

    copied = 0
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for t in table.values():
                if t is not None and not t.is_contiguous():
                    t.data = t.data.contiguous()
                    copied += 1
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                    and not value.is_contiguous():
                setattr(sub, name, value.contiguous())
                copied += 1
    return copied


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text, cut to ``limit`` (what a warning and an attempt record)."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


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
    needs_torch = True  # converts from a torch module; an ONNX source is converted to one first (onnx2torch)

    def __init__(self) -> None:
        self.from_onnx = False  # set once a source without a torch module is seen: the manifest names onnx2torch
        # (workdir, source) → its checked float .tflite: the export stage's, reused by ai-edge-quantizer's recipes
        self._fp32: dict[tuple[str, str, int], Artifact] = {}

    def library_version(self) -> str:
        import importlib.metadata as md

        version = f"litert-torch {md.version('litert-torch')}, ai-edge-litert {md.version('ai-edge-litert')}"
        return f"{version}, {converter_version()}" if self.from_onnx else version

    def _source(self, src: SourceModel) -> dict[str, str]:
        """What the artifact details record about the conversion from the source."""
        if src.torch is not None:
            return {}
        self.from_onnx = True
        return {"source_converter": converter_version()}

    def check_signature(self, sig: Signature) -> None:
        """One input and one output: the conversion traces the model with one sample tensor, and the bundle's
        tensors are mapped to the interpreter's by position, which a renamed multi-tensor graph does not keep."""
        if sig.more_inputs or sig.more_outputs:
            raise ConfigError(f"the TFLite targets compile models with one input and one output; this one has "
                              f"inputs {sig.input_names} and outputs {sig.output_names}",
                              hint="compile it for x86-openvino-cpu, onnxruntime-cpu or a Jetson target, or "
                                   "export a single-input, single-output model for the phone")

    def fp32(self, src: SourceModel, workdir: Path) -> Artifact:
        """The float ``.tflite``, checked against the torch module it was converted from.

        litert-torch 0.10 did not always convert the same module the same way: an onnx2torch module of a
        torchscript-exported ViT converted correctly in 1 of 5 runs, its later blocks given an earlier block's
        weights by the converter's address-keyed constant cache (:func:`contiguous_constants`, applied by
        ``_module``, removes that cause). The check stays for what else a converter may get wrong: a conversion
        that does not match the module on a probe input is converted again (:data:`CONVERSION_TRIES` in all),
        then refused."""
        import litert_torch
        import torch

        key = (str(workdir), str(src.onnx), id(src.torch))
        if key in self._fp32 and (self._fp32[key].directory / self._fp32[key].main).is_file():
            return self._fp32[key]  # converted and checked once: a second conversion could differ (see above)
        out = workdir / "tflite-fp32"
        out.mkdir(parents=True, exist_ok=True)
        model, sample = _module(src), _sample(src)
        probe = torch.from_numpy(np.random.default_rng(0).normal(size=tuple(sample.shape)).astype(np.float32))
        with torch.no_grad():
            y = model(probe)
        expected = y.numpy() if isinstance(y, torch.Tensor) else None  # several outputs: the export stage checks
        differences = []
        for _ in range(CONVERSION_TRIES):
            try:
                litert_torch.convert(model, (sample,)).export(str(out / "model.tflite"))
            except Exception as exc:  # the converter's own lowering (JAX, MLIR passes) refuses some graphs outright
                via = "the torch module onnx2torch made from the ONNX file" if src.torch is None else "the torch module"
                raise ModelImportError(
                    f"litert-torch could not convert {via} to TFLite: {type(exc).__name__}: {str(exc)[:300]}",
                    hint="compile it for x86-openvino-cpu or onnxruntime-cpu, or give the TFLite target the original "
                         "torch model (a .pt module) rather than an ONNX file") from exc
            if expected is None:
                break
            got = _run(out / "model.tflite", probe.numpy())
            differences.append(float(np.abs(got.reshape(expected.shape) - expected).max()))
            if differences[-1] <= CONVERSION_TOLERANCE * max(1.0, float(np.abs(expected).max())):
                break
            log.warning("litert-torch's float .tflite differs from the torch module by %.3g; converting again",
                        differences[-1])
        else:
            raise ModelImportError(
                f"litert-torch's float .tflite does not compute what the torch module computes: largest difference "
                f"{min(differences):.3g} in {CONVERSION_TRIES} conversions",
                hint="compile it for x86-openvino-cpu or onnxruntime-cpu, or give the TFLite target the original "
                     "torch model rather than an ONNX file")
        details = {"converter": "litert_torch.convert", **self._source(src)}
        if len(differences) > 1:
            details["conversion_tries"] = len(differences)
        self._fp32[key] = _artifact(out, "fp32", details)
        return self._fp32[key]

    def quantize(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                 exclude: list[str] | None = None, recipe: str | None = None) -> Artifact:
        import litert_torch
        import torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e

        if exclude:
            raise NotImplementedError("the TFLite compiler has no per-layer exclusion; recover() uses another recipe")
        if recipe == "transformer":
            return self._aeq(src, calib, settings, workdir, activation_bits=16)[1]
        if recipe is not None:
            raise ValueError(f"the TFLite compiler has no INT8 recipe {recipe!r} (recipes(): transformer)")
        x = torch.from_numpy(calib[: settings.calibration_count])
        batches = [x[i : i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)]
        model = _module(src)
        graph, strict, batches = _export(model, batches, x)
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=settings.per_channel, is_dynamic=False))
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for xb in batches:
                prepared(xb)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        converted.training = False
        contiguous_constants(converted)
        out = workdir / "tflite-int8"
        out.mkdir(parents=True, exist_ok=True)
        try:
            litert_torch.convert(converted, (_sample(src),), quant_config=QuantConfig(pt2e_quantizer=quantizer)
                                 ).export(str(out / "model.tflite"))
        except Exception as exc:  # the converter's passes refuse some PT2E graphs (a DenseNet's concatenations:
            # "quantization parameters violate the same scale constraint"); the float model still converts
            return self._quantize_fp32_tflite(src, calib, settings, workdir, exc)
        return _artifact(out, "int8", {"method": "litert-torch PT2E static", "per_channel": settings.per_channel,
                                       "strict_export": strict, "calibration_samples": len(x),
                                       "int8_ops": int8_op_share(out / "model.tflite"), **self._source(src)})

    def recipes(self, src: SourceModel) -> list[str]:
        """``transformer`` (int16 activations) where the graph has attention (:func:`.attention.find_attention`)."""
        return ["transformer"] if find_attention(src.onnx) else []

    def _aeq(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
             activation_bits: int = 8) -> tuple["_AeqRecipes", Artifact]:
        """ai-edge-quantizer's static quantization of the FP32 ``.tflite`` (int8 weights, ``activation_bits``
        activations), and the recipes object that made it."""
        fp32 = self.fp32(src, workdir)
        aeq = _AeqRecipes(fp32.directory / fp32.main, calib[: settings.calibration_count], self._source(src),
                          activation_bits)
        return aeq, aeq.artifact(workdir / ("tflite-int8-aeq" if activation_bits == 8 else "tflite-a16w8-aeq"))

    def _quantize_fp32_tflite(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings,
                              workdir: Path, pt2e_error: Exception) -> Artifact:
        """INT8 by ai-edge-quantizer on the FP32 ``.tflite`` where litert-torch cannot convert the PT2E graph."""
        first_line = _first_line(pt2e_error, 300)
        log.warning("litert-torch could not convert the PT2E INT8 graph (%s: %s); quantizing the FP32 .tflite "
                    "with ai-edge-quantizer instead", type(pt2e_error).__name__, first_line)
        try:
            art = self._aeq(src, calib, settings, workdir)[1]
        except EdgekitError:
            raise
        except Exception as exc:
            raise ModelImportError(
                f"no INT8 .tflite for this model: litert-torch's PT2E conversion failed ({type(pt2e_error).__name__}: "
                f"{first_line}) and so did ai-edge-quantizer ({type(exc).__name__}: {exc})",
                hint="ship FP32 for this target (--no-quantize), or compile for an ONNX-based target "
                     "(onnxruntime-cpu, x86-openvino-cpu)") from exc
        art.details["pt2e_failed"] = f"{type(pt2e_error).__name__}: {first_line}"
        return art

    def recover(self, src: SourceModel, calib: np.ndarray, settings: QuantizeSettings, workdir: Path,
                goal: RecoveryGoal, first: Artifact) -> list[Attempt]:
        """ai-edge-quantizer's static int8 (all-int8 residual adds, other rounding); if that fails a gate too,
        the fewest ranked ops kept in float on the same recipe."""
        try:
            aeq, art = self._aeq(src, calib, settings, workdir)
        except EdgekitError:
            raise
        except Exception as exc:  # its whole-model recipe fails on some graphs too (wide_resnet50_2 from ONNX:
            # "axis remapping" on a convolution): nothing else to try; the gate judges PTQ, the reason is recorded
            first_line = _first_line(exc)
            log.warning("ai-edge-quantizer cannot quantize this model (%s: %s); the gate judges the PTQ artifact",
                        type(exc).__name__, first_line)
            first.details["ai_edge_quantizer_failed"] = f"{type(exc).__name__}: {first_line}"
            return []
        attempts = [goal.evaluate(art, "ai_edge_quantizer", art.details)]
        if attempts[0].passed or settings.max_excluded_nodes == 0:
            return attempts
        try:
            ranking = aeq.rank(workdir / "sensitivity", aeq.x[:RANKING_SAMPLES])
            return attempts + search_fewest(
                ranking, settings.max_excluded_nodes,
                lambda names: aeq.artifact(workdir / f"tflite-int8-aeq-x{len(names)}", exclude=names), goal,
                details=lambda art: {k: art.details[k] for k in ("int8_ops", "excluded_layers") if k in art.details})
        except EdgekitError:
            raise
        except Exception as exc:  # ai-edge-quantizer refuses some ops alone or in float ("more dimensions than
            # allowed by the axis remapping", a wide ResNet's convolution): the search ends, the gate judges what was
            # tried and says so
            first_line = _first_line(exc)
            log.warning("ai-edge-quantizer cannot keep this model's ops in float one by one (%s: %s); the mixed "
                        "precision search stops", type(exc).__name__, first_line)
            attempts[0].details["mixed_precision_failed"] = f"{type(exc).__name__}: {first_line}"
            return attempts

    def signature(self, artifact: Artifact, sig: Signature) -> Signature:
        io = artifact.details["io"]
        return Signature(sig.input_name, sig.output_name, io["input_shape"], io["output_shape"],
                         input_quantization=io["input"], output_quantization=io["output"])

    def deploy_options(self, runtime: RuntimeSettings, sig: Signature) -> dict[str, Any]:
        return runtime_options(runtime)


def _export(model, batches: list, x) -> tuple[Any, bool, list]:
    """``model`` as a torch.export graph for PT2E, with a dynamic batch where the graph allows one.

    Strict export first (non-strict drops ``source_fn_stack`` and leaves residual adds in float);
    a graph that fixes its batch at 1 (ONNX constants) is exported at batch 1 and calibrated one
    sample at a time. Returns the graph, whether it was strict, and the calibration batches to use.
    """
    import torch

    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    try:
        return torch.export.export(model, (batches[0],), strict=True, dynamic_shapes=dynamic).module(), True, batches
    except Exception as exc:  # strict tracing rejects some Python constructs; ONNX graphs may fix the batch
        first = exc
    try:
        graph = torch.export.export(model, (batches[0],), dynamic_shapes=dynamic).module()
        log.warning("strict torch.export failed (%s); non-strict export may leave residual adds in float", first)
        return graph, False, batches
    except Exception:  # a batch fixed at 1 by the graph itself
        singles = [x[i : i + 1] for i in range(len(x))]
        log.warning("the model takes no batch > 1 (%s); exporting at batch 1", str(first).splitlines()[0][:200])
        try:
            return torch.export.export(model, (singles[0],), strict=True).module(), True, singles
        except Exception:
            pass
        try:
            return torch.export.export(model, (singles[0],)).module(), False, singles
        except Exception as exc:  # nothing the PT2E quantizer can take
            raise ModelImportError(
                f"torch.export could not capture the model for INT8 TFLite: {str(first).splitlines()[0][:300]}",
                hint="give a torch model that torch.export accepts, or compile for an ONNX target") from exc


class _AeqRecipes:
    """ai-edge-quantizer on one float ``.tflite``: calibrated once, then any op set kept float or quantized alone."""

    def __init__(self, float_path: Path, x: np.ndarray, source: dict[str, str] | None = None,
                 activation_bits: int = 8):
        from ai_edge_quantizer import quantizer as aeq_quantizer

        if activation_bits not in (8, 16):
            raise ValueError(f"ai-edge-quantizer's static recipes have 8 or 16-bit activations, not {activation_bits}")
        self.float_path, self.x, self.source, self.bits = float_path, x, source or {}, activation_bits
        qt = aeq_quantizer.Quantizer(str(float_path))
        qt.load_quantization_recipe(self._recipe())
        name = _input_name(float_path)
        self.stats = qt.calibrate({"serving_default": [{name: x[i : i + 1]} for i in range(len(x))]})

    def _recipe(self):
        from ai_edge_quantizer import recipe as aeq_recipe

        return aeq_recipe.static_wi8_ai8() if self.bits == 8 else aeq_recipe.static_wi8_ai16()

    def layers(self) -> list[tuple[str, str]]:
        """(scope, op name) of every op the ranking considers: the scope is how a recipe names an op."""
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

        model = fu.read_model(str(self.float_path))
        sg = model.subgraphs[0]
        out = []
        for op in sg.operators:
            code = fu.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
            kind = getattr(code, "value", str(code))
            if kind in RANKED_TFL_OPS:
                out.append((fu.get_op_scope(op, sg.tensors), kind))
        return out

    def write(self, out: Path, exclude: list[str] | None = None, only: str | None = None) -> Path:
        from ai_edge_quantizer import quantizer as aeq_quantizer
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
        from ai_edge_quantizer.qtyping import TFLOperationName

        qt = aeq_quantizer.Quantizer(str(self.float_path))
        if only is not None:  # ops matched by no config are not quantized
            qt.add_static_config(_exact(only), TFLOperationName.ALL_SUPPORTED, self.bits, 8)
        else:
            qt.load_quantization_recipe(self._recipe())
            for scope in exclude or []:  # the latest matching config wins
                qt.update_quantization_recipe(_exact(scope), TFLOperationName.ALL_SUPPORTED,
                                              algorithm_key=AlgorithmName.NO_QUANTIZE)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.tflite").write_bytes(qt.quantize(self.stats, enable_progress_report=False).quantized_model)
        return out / "model.tflite"

    def artifact(self, out: Path, exclude: list[str] | None = None) -> Artifact:
        self.write(out, exclude)
        details = {"method": f"ai-edge-quantizer static_wi8_ai{self.bits}", "activations": f"int{self.bits}",
                   "calibration_samples": len(self.x),
                   "int8_ops": int8_op_share(out / "model.tflite"), **self.source}
        if exclude:
            details["excluded_nodes"] = list(exclude)
            details["excluded_layers"] = readable_scopes(list(exclude))
        return _artifact(out, "int8", details)

    def rank(self, scratch: Path, samples: np.ndarray) -> list[LayerError]:
        """Each op INT8 alone (the rest float), ranked by the output error it causes, largest first. Each candidate
        is a whole model: it is deleted once measured (kept, a ViT-B/16's ~100 candidates of ~340 MB each filled
        the disk)."""
        ref = _run(self.float_path, samples)
        ranking = []
        for i, (scope, kind) in enumerate(self.layers()):
            path = self.write(scratch / f"only-{i}", only=scope)
            try:
                ranking.append(LayerError(scope, kind, relative_error(ref, _run(path, samples))))
            finally:
                shutil.rmtree(path.parent, ignore_errors=True)
        return sorted(ranking, key=lambda e: e.error, reverse=True)


def _exact(scope: str) -> str:
    return "^" + re.escape(scope) + "$"


def _run(path: Path, samples: np.ndarray) -> np.ndarray:
    """The model's first output on ``samples``, one at a time, (de)quantizing integer inputs and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    results = []
    for i in range(len(samples)):
        x = samples[i : i + 1]
        if np.dtype(inp["dtype"]) != np.float32:
            scale, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], x.reshape(inp["shape"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        if np.dtype(out["dtype"]) != np.float32:
            scale, zp = out["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        results.append(np.array(y, dtype=np.float32))
    return np.concatenate(results)


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
