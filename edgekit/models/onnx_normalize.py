"""Normalise an ONNX file exported by someone else's tool before any backend sees it.

paddle2onnx, tf2onnx and older torch exporters leave inputs such as ``[-1, 3, '?', '?']``:
a literal −1 (or 0) where a dimension is unknown, symbolic spatial dimensions, opsets
older than per-channel Q/DQ needs (13), and graphs that ONNX Runtime's symbolic shape
inference asserts on. Each backend would fail on these in its own way, late and with a
library traceback, so the import fixes them once and records what it did:

1. input dimensions: an unknown batch becomes the symbolic ``batch`` (or the
   ``--input-shape`` batch when the build asks for a fixed one); every other unknown
   dimension comes from ``--input-shape``, which must agree with every fixed one;
2. opset: upgraded to 13 with ``onnx.version_converter`` when it is older;
3. shape inference and constant folding with fallbacks (:func:`optimize_with_fallbacks`):
   ORT's ``quant_pre_process`` → the same without symbolic shape inference →
   ``onnx.shape_inference`` alone → the model as it is; each fallback kept with its error.

Only single-input models are handled here (the build compiles single-input models).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelImportError

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) needs opset 13
BATCH = "batch"

Dim = int | str  # a fixed size, or the name of a symbolic one


@dataclass
class NormalizeReport:
    """What the normalisation changed, and which tool failed on the way (with its error)."""

    input_shape_before: list[Any] = field(default_factory=list)
    input_shape_after: list[Dim] = field(default_factory=list)
    opset_before: int = 0
    opset_after: int = 0
    steps: list[str] = field(default_factory=list)
    fallbacks: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"input_shape_before": self.input_shape_before, "input_shape_after": self.input_shape_after,
                "opset_before": self.opset_before, "opset_after": self.opset_after, "steps": list(self.steps),
                "fallbacks": list(self.fallbacks)}


# ----------------------------------------------------------------------------- error text
_NODE_PATTERNS = (
    re.compile(r"Node \(([^)]*)\)(?: Op \(([^)]*)\))?"),  # ONNX Runtime session creation
    re.compile(r"running (\w+) node\. Name:'([^']*)'"),  # ONNX Runtime at run time (op first, then name)
    re.compile(r"Name: ?(\S*) OpType: ?(\S+)"),  # onnx.checker / onnx.shape_inference
    re.compile(r"[Nn]ode[ :]+'?([\w./:-]+)'? \(op[_ ]type:? ?([\w]+)\)"),
)


def node_in(text: str) -> str | None:
    """'node NAME (OP)' when a library's error names the node it failed on, else None."""
    for pat in _NODE_PATTERNS:
        m = pat.search(text)
        if m:
            name, op = m.group(1), (m.group(2) if m.lastindex and m.lastindex >= 2 else None)
            if pat.pattern.startswith("running"):
                name, op = op, name
            return f"node {name or '(unnamed)'!r}" + (f" ({op})" if op else "")
    return None


def describe(exc: BaseException) -> str:
    """One line for a report: the exception type and its text (an empty AssertionError says where it was raised)."""
    text = str(exc).strip().splitlines()
    if text:
        return f"{type(exc).__name__}: {' '.join(t.strip() for t in text)[:500]}"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" in {tb.tb_frame.f_code.co_name} ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})" if tb else ""
    return f"{type(exc).__name__} (no message){where}"


def import_error(what: str, exc: BaseException, hint: str) -> ModelImportError:
    """A ModelImportError for ``what`` failing with ``exc``, naming the node where the library did."""
    text = describe(exc)
    node = node_in(str(exc))
    where = f" at {node}" if node else ""
    return ModelImportError(f"{what} failed{where}: {text}", hint=hint)


# ----------------------------------------------------------------------------- dimensions
def _dim(d) -> int | str | None:
    """A dimension proto as a fixed size (> 0), a symbol name, or None when unknown (−1, 0 or empty)."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


def graph_inputs(model) -> list:
    """The data inputs (initializers listed as inputs by old exporters are not inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def raw_input_shape(vi) -> list[Any]:
    """The input's dimensions as the file spells them (−1 and 0 kept, symbols as names, '?' when empty)."""
    out: list[Any] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return out


def resolve_input_shape(onnx_dims: list[Any], requested: list[int] | None, dynamic_batch: bool,
                        model_name: str) -> list[Dim]:
    """The input shape the build uses: the file's fixed dims, ``requested`` (``--input-shape``) for the rest.

    A dimension is fixed when it is a positive integer; −1, 0 and symbols are not. The batch
    (dim 0) stays symbolic when ``dynamic_batch`` and the file does not fix it.
    """
    shown = f"{model_name} input {fmt(onnx_dims)}"
    if requested is not None and len(requested) != len(onnx_dims):
        raise ConfigError(f"--input-shape {fmt(requested)} has {len(requested)} dimensions; {shown} has "
                          f"{len(onnx_dims)}", hint=f"give {len(onnx_dims)} numbers, e.g. --input-shape "
                          f"{','.join(str(d) if isinstance(d, int) and d > 0 else '1' for d in onnx_dims)}")
    if requested is not None and any(r < 1 for r in requested):
        raise ConfigError(f"--input-shape {fmt(requested)} has a dimension below 1",
                          hint="give every dimension as a positive number, e.g. 1,3,224,224")
    out: list[Dim] = []
    missing: list[int] = []
    for i, d in enumerate(onnx_dims):
        fixed = isinstance(d, int) and d > 0
        if fixed:
            if requested is not None and requested[i] != d:
                raise ConfigError(
                    f"--input-shape {fmt(requested)} contradicts {shown}: dimension {i} is fixed at {d} in the "
                    f"model, not {requested[i]}",
                    hint=f"pass --input-shape {fmt_flag(onnx_dims, requested)} (only non-fixed dimensions can be "
                         f"chosen), or re-export the model with the shape you want")
            out.append(d)
        elif i == 0 and (dynamic_batch or requested is None):
            out.append(BATCH)
        elif requested is not None:
            out.append(int(requested[i]))
        else:
            missing.append(i)
            out.append(d if isinstance(d, str) else "?")
    if missing:
        raise ConfigError(
            f"{shown} has non-fixed dimension(s) {missing}; the build needs their size",
            hint=f"pass --input-shape (e.g. --input-shape {fmt_flag(onnx_dims, None)}), or set model.input_shape "
                 f"in the build file")
    return out


def fmt(dims: list[Any]) -> str:
    return "[" + ", ".join(repr(d) if isinstance(d, str) else str(d) for d in dims) + "]"


def fmt_flag(onnx_dims: list[Any], requested: list[int] | None) -> str:
    """An --input-shape value consistent with the file: its fixed dims, the request (or a guess) elsewhere."""
    guess = [1, 3, 224, 224] if len(onnx_dims) == 4 else [1] * len(onnx_dims)
    vals = []
    for i, d in enumerate(onnx_dims):
        if isinstance(d, int) and d > 0:
            vals.append(d)
        elif requested is not None:
            vals.append(requested[i])
        else:
            vals.append(guess[i])
    return ",".join(map(str, vals))


def other_input_dims(onnx_dims: list[Any], batch: Dim, input_name: str) -> list[Dim]:
    """A further input's dims (a model with several inputs): its batch follows the first input's, other −1/0
    dims become symbols named after the input (shapes the calibration data then gives at run time)."""
    out: list[Dim] = []
    for i, d in enumerate(onnx_dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif i == 0:
            out.append(batch)
        else:
            out.append(d if isinstance(d, str) and d != "?" else f"{input_name}_d{i}")
    return out


def set_input_dims(model, dims: list[Dim], index: int = 0) -> None:
    """Write ``dims`` on data input ``index``; clear −1/0 sizes elsewhere so shape inference recomputes them."""
    vi = graph_inputs(model)[index]
    shape = vi.type.tensor_type.shape
    for d, new in zip(shape.dim, dims):
        d.Clear()
        if isinstance(new, int):
            d.dim_value = new
        else:
            d.dim_param = new
    # −1 or 0 in an output or value_info is not a size: make it unknown; 0-sized tensors are not in classifiers
    for v in [*model.graph.output, *model.graph.value_info]:
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
                if i == 0 and BATCH in dims[:1]:
                    d.dim_param = BATCH


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model, name: str):
    """The model at opset :data:`MIN_OPSET` (per-channel Q/DQ); refused with the node when the converter cannot."""
    import onnx
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        raise import_error(f"upgrading {name} from opset {default_opset(model)} to {MIN_OPSET}", exc,
                           hint=f"re-export the model at opset {MIN_OPSET} or newer (per-channel INT8 needs it)") from None
    return upgraded


# ----------------------------------------------------------------------------- shape inference + folding
@contextlib.contextmanager
def _no_ort_dump():
    """ORT's symbolic shape inference, when it cannot infer every shape, saves the model it has into the current
    directory (``sym_shape_infer_temp.onnx`` plus an external-data file) before raising: remove what it left."""
    dump = Path.cwd() / "sym_shape_infer_temp.onnx"
    before = dump.stat().st_mtime_ns if dump.exists() else None
    try:
        yield
    finally:
        if dump.exists() and dump.stat().st_mtime_ns != before:
            import onnx

            try:
                model = onnx.load(str(dump), load_external_data=False)
                data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
            except Exception:  # a half-written dump: remove the model file at least
                data = set()
            for name in data:
                (dump.parent / Path(name).name).unlink(missing_ok=True)
            dump.unlink(missing_ok=True)


def optimize_with_fallbacks(src: Path, dst: Path) -> list[dict[str, str]]:
    """``src`` shape-inferred and constant-folded into ``dst``; returns the fallbacks taken, each with its error.

    ORT's ``quant_pre_process`` (symbolic shape inference, graph optimization, ONNX shape
    inference) is tried first; its symbolic inference asserts on some exporters' graphs
    (a Concat of shape values along axis −1), so the second try skips that part, the
    third keeps only ``onnx.shape_inference``, and the last copies the model unchanged.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fallbacks: list[dict[str, str]] = []
    tries = (("ort_quant_pre_process", {"skip_symbolic_shape": False}),
             ("ort_quant_pre_process_without_symbolic_shape", {"skip_symbolic_shape": True}))
    for step, kwargs in tries:
        try:
            with _no_ort_dump():
                quant_pre_process(str(src), str(dst), **kwargs)
            return fallbacks
        except Exception as exc:  # a failed try is recorded and the next one runs; the last one cannot fail
            fallbacks.append({"step": step, "error": describe(exc)})
            log.warning("%s failed on %s (%s); trying without it", step, src.name, describe(exc))
    try:
        onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(src)), strict_mode=False), str(dst))
        return fallbacks
    except Exception as exc:
        fallbacks.append({"step": "onnx_shape_inference", "error": describe(exc)})
        log.warning("onnx shape inference failed on %s (%s); the model is used as it is", src.name, describe(exc))
    shutil.copy(src, dst)
    return fallbacks


def check_runs(path: Path, name: str) -> None:
    """ONNX Runtime can load the normalised model (the engine every ONNX backend measures with)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise import_error(f"loading {name} in ONNX Runtime", exc,
                           hint="the model uses an operator or attribute ONNX Runtime cannot run; re-export it "
                                "with a newer exporter or opset, or replace the node named") from None


# ----------------------------------------------------------------------------- the step
def normalize_onnx(src: Path, out: Path, requested: list[int] | None, dynamic_batch: bool = True) -> NormalizeReport:
    """``src`` → ``out``: fixed/symbolic input dims, opset ≥ 13, shape-inferred and folded, loadable by ORT."""
    import onnx

    name = src.name
    try:
        model = onnx.load(str(src))  # pulls external data into one file
    except Exception as exc:
        raise ModelImportError(f"cannot read {src}: {describe(exc)}",
                               hint="is it an ONNX file? re-export it, or check that it was copied whole") from None
    inputs = graph_inputs(model)
    if not inputs:
        raise ModelImportError(f"{name} has no inputs (every graph input is a weight)",
                               hint="export the model with its data input(s) as graph inputs")
    for vi in inputs:
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else None
        if elem != onnx.TensorProto.FLOAT:
            kind = onnx.TensorProto.DataType.Name(elem) if elem else "not a tensor"
            raise ModelImportError(f"{name}: input {vi.name!r} is {kind}; edgekit compiles float32-input models",
                                   hint="export the model with float32 inputs (cast inside the model if it needs "
                                        "another type)")
    rep = NormalizeReport(input_shape_before=raw_input_shape(inputs[0]), opset_before=default_opset(model))
    if not inputs[0].type.HasField("tensor_type") or not inputs[0].type.tensor_type.HasField("shape"):
        if requested is None:
            raise ConfigError(f"{name} does not declare its input's shape", hint="pass --input-shape, e.g. 1,3,224,224")
        rep.input_shape_before = ["?"] * len(requested)
        inputs[0].type.tensor_type.shape.dim.extend([onnx.TensorShapeProto.Dimension() for _ in requested])
    dims = resolve_input_shape(rep.input_shape_before, requested, dynamic_batch, name)
    rep.input_shape_after = dims
    if dims != rep.input_shape_before:
        rep.steps.append(f"input {inputs[0].name}: {fmt(rep.input_shape_before)} → {fmt(dims)}")
    set_input_dims(model, dims)
    for index, vi in enumerate(inputs[1:], 1):  # several inputs: --input-shape is the first one's
        before = raw_input_shape(vi) if vi.type.tensor_type.HasField("shape") else None
        if not before:
            raise ConfigError(f"{name} does not declare the shape of its input {vi.name!r}",
                              hint="re-export the model with every input's shape (symbolic dimensions are fine)")
        other = other_input_dims(before, dims[0], vi.name)
        if other != before:
            rep.steps.append(f"input {vi.name}: {fmt(before)} → {fmt(other)}")
        set_input_dims(model, other, index)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise import_error(f"the ONNX checker on {name}", exc,
                           hint="the file is not valid ONNX; re-export it (a newer exporter or opset)") from None
    if 0 < rep.opset_before < MIN_OPSET:
        model = upgrade_opset(model, name)
        rep.steps.append(f"opset {rep.opset_before} → {MIN_OPSET} (onnx.version_converter)")
    rep.opset_after = default_opset(model)
    # IR < 4 lists every weight as a graph input (a caller could override it), so optimizers keep them as
    # inputs; weights are constants here: drop them from the inputs, at an IR version that allows that
    weights = {i.name for i in model.graph.initializer}
    listed = [i for i in model.graph.input if i.name in weights]
    min_ir = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if listed or model.ir_version < min_ir:
        for vi in listed:
            model.graph.input.remove(vi)
        before_ir, model.ir_version = model.ir_version, max(model.ir_version, min_ir, 4)
        rep.steps.append(f"IR version {before_ir} → {model.ir_version}"
                         + (f", {len(listed)} weights no longer listed as inputs" if listed else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(out.stem + ".dims.onnx")
    onnx.save(model, str(staged))
    rep.fallbacks = optimize_with_fallbacks(staged, out)
    staged.unlink()
    done = rep.fallbacks[-1]["step"] if rep.fallbacks else None
    rep.steps.append({None: "shape inference + constant folding (ORT quant_pre_process)",
                      "ort_quant_pre_process": "shape inference + constant folding (ORT quant_pre_process without "
                                               "symbolic shape inference)",
                      "ort_quant_pre_process_without_symbolic_shape": "ONNX shape inference only",
                      "onnx_shape_inference": "none (model used as it is)"}[done])
    check_runs(out, name)
    left = graph_inputs(onnx.load(str(out), load_external_data=False))
    if [i.name for i in left] != [i.name for i in inputs]:
        raise ModelImportError(f"{name}: after shape inference the model's inputs are {[i.name for i in left][:5]}, "
                               f"not {[i.name for i in inputs][:5]}",
                               hint="export the model with its weights as initializers, not as graph inputs")
    if dims[0] == BATCH:
        failure = batch_failure(out, dims)
        if failure is not None:
            # exporters write −1 for a batch the graph itself fixes (a Reshape to [1, -1]): run it at the batch
            # the build gives instead of failing every evaluation later
            log.warning("%s does not run with a batch of 2 (%s); its batch is fixed at %s", name, failure,
                        requested[0] if requested else 1)
            fixed = normalize_onnx(src, out, list(requested) if requested else [1, *dims[1:]], dynamic_batch=False)
            fixed.fallbacks.insert(0, {"step": "dynamic_batch", "error": failure})
            return fixed
    return rep


def batch_failure(path: Path, dims: list[Dim]) -> str | None:
    """Why the model does not run two samples at once (None when it does): a dynamic batch must be real."""
    import numpy as np
    import onnxruntime as ort

    shape = [2, *[d if isinstance(d, int) else 1 for d in dims[1:]]]
    try:
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 4  # the failure is the answer, not an error to print
        sess = ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])
        feed = {i.name: np.zeros([2, *[d if isinstance(d, int) else 1 for d in i.shape[1:]]] if n else shape,
                                 dtype=np.float32) for n, i in enumerate(sess.get_inputs())}
        got = sess.run(None, feed)[0]
    except Exception as exc:  # the answer is the failure itself: the caller fixes the batch
        node = node_in(str(exc))
        return f"at {node}: {describe(exc)}" if node else describe(exc)
    if got.ndim == 0 or got.shape[0] != 2:
        return f"a batch of 2 gave an output of shape {list(got.shape)}"
    return None


# ----------------------------------------------------------------------------- config vs model
def expected_input_shape(cfg) -> list[Dim] | None:
    """The model input the build will have, read cheaply before any work (the data stage's checks).

    An ONNX source: its declared input resolved against ``model.input_shape`` exactly as the
    import will (contradictions refused here already); a torch source: ``model.input_shape``.
    None when the ONNX file cannot be read (the import stage then says why).
    """
    src = cfg.model
    given = list(src.input_shape) if src.input_shape else None
    if not src.source.endswith(".onnx"):
        return given
    return onnx_input_shape(src.source, given, src.dynamic_batch)


def onnx_input_shape(path: str | Path, given: list[int] | None = None, dynamic_batch: bool = True) -> list[Dim] | None:
    """The ONNX file's (first) input resolved against ``given`` (``--input-shape``) as the import will resolve it.

    ``given`` when the file declares no shape; None when it cannot be read (the import
    stage then says why); contradictions and open dims without ``given`` raise ConfigError here.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # the import stage reports an unreadable file with its hint
        return None
    inputs = graph_inputs(model)
    if not inputs or not inputs[0].type.tensor_type.HasField("shape"):
        return given
    return resolve_input_shape(raw_input_shape(inputs[0]), given, dynamic_batch, Path(path).name)


def check_against_model(cfg, input_shape: list[Dim]) -> None:
    """Refuse a build whose preprocessing cannot feed the model, before any data is read or compiled.

    ``cfg``: the BuildConfig; ``input_shape``: the model's input (``Signature.input_shape``,
    symbolic dimensions as names). An image ``preprocess.size`` must equal the model's fixed
    height and width, and its colour the model's fixed channel count.
    """
    pre = getattr(cfg, "preprocess", None)
    if pre is None or pre.type != "image" or len(input_shape) != 4:
        return
    nchw = pre.layout == "NCHW"
    c, h, w = (input_shape[1], input_shape[2], input_shape[3]) if nchw else (input_shape[3], input_shape[1],
                                                                             input_shape[2])
    if pre.size is not None:
        size = list(pre.size)
        want = [h if isinstance(h, int) else size[0], w if isinstance(w, int) else size[1]]
        if size != want:
            raise ConfigError(
                f"preprocess.size {size} (height, width) does not match the model input {fmt(input_shape)} "
                f"({pre.layout}: {h}×{w})",
                hint=f"set preprocess.size: {want} in the build file")
    channels = 1 if pre.color == "gray" else 3
    if isinstance(c, int) and c != channels:
        raise ConfigError(
            f"preprocess.color {pre.color!r} gives {channels} channel(s); the model input {fmt(input_shape)} "
            f"({pre.layout}) takes {c}",
            hint=f"set preprocess.color: {'gray' if c == 1 else 'rgb'} (or bgr) and preprocess.layout to the model's")


def check_data_sources(cfg) -> None:
    """A calibration or validation path that does not exist is named before anything is loaded."""
    from ..errors import CalibrationError

    for section in ("calibration", "validation"):
        src = getattr(cfg, section, None)
        if src is None:
            continue
        s = src.source
        looks_like_factory = ":" in s and not re.match(r"^[A-Za-z]:[\\/]", s) and "/" not in s.split(":")[0]
        if not looks_like_factory and not Path(s).exists():
            raise CalibrationError(f"{section} source {s} does not exist",
                                   hint=f"check the path (relative paths are relative to {Path.cwd()})")
