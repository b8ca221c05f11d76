"""ONNX → PyTorch, so that an ONNX model reaches the mobile targets through litert-torch's PT2E path.

Why onnx2torch (ONNX → ``torch.fx.GraphModule``) and not onnx2tf (ONNX → TF SavedModel →
TFLite converter): measured on resnet18, mobilenet_v2, efficientnet_b0 and a paddle2onnx-style
classifier (benchmarks/results/onnx_to_tflite.md), onnx2torch converts each in well under a
second, ``torch.export(strict=True)`` accepts its graph modules, and the INT8 model then goes
through the very quantizer, converter and recovery (ai-edge-quantizer, per-op sensitivity) that
torch sources use — full-integer ops, int8 input and output, the same gates. onnx2tf needs
TensorFlow (~600 MB installed, its own protobuf/numpy pins next to torch) and its own
calibration path, which would be a second TFLite quantization pipeline to keep honest.
onnx2torch's last release is 2024; its registry is checked node by node before converting, so an
op it lacks is a clear error naming the node rather than a failure inside the conversion.

Measured (112×112, random weights, 64 calibration images, plain PTQ): the FP32 ``.tflite`` matches
ONNX Runtime to cosine 1.0 on all four, strict export accepts all four, 100 % of ops are INT8;
INT8 cosine to ONNX FP32 0.9999 (paddle-style), 0.9985 (resnet18), 0.96 (efficientnet_b0),
0.94 (mobilenet_v2) — quantization's loss, which the build's gates and recovery then judge.

onnx2torch reads Reshape targets and Slice/Squeeze/Unsqueeze axes from buffers and branches on
their values, which torch.export rejects; :func:`static_reshapes` writes constant ones in. Resize
with constant scales is not rewritten yet: such a model fails export and is refused with the reason.
Shapes computed from a symbolic batch (``Shape → Gather → Concat → Expand``, a torchscript export's ViT
class token) are folded to constants by converting the graph at batch 1 (:func:`fold_at_batch_1`).

onnx2torch's converters stop at opset 13–17 for most ops, while torch's exporter writes opset 18+
(``torch.onnx.export(dynamo=True)``: opset 20), where ReduceMean takes its axes as an input and
Reshape has a new version: every such file was refused. :mod:`.onnx2torch_ops` registers converters for
the versions torch writes (type-only bumps, Reduce*-18 and Pad-18 with constant axes, Gelu-20), each checked
against the node; for anything else :func:`older_opset` converts the graph
down (``onnx.version_converter``) to the newest opset in :data:`FALLBACK_OPSETS` at which
onnx2torch has a converter for every node, before refusing; and the same exporter marks every
Reshape ``allowzero=1``, which onnx2torch does not implement: :func:`drop_allowzero` clears it
where the target is a constant without a 0 (where the flag changes nothing). ONNX has no
down-converter for Split-18 (``num_outputs``), which ShuffleNet's channel split exports as:
:func:`splits_as_slices` writes each Split with known sizes as Slices (the same in every opset ≥ 10).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...errors import ModelImportError
from .onnx2torch_ops import register

log = logging.getLogger(__name__)

CONVERTER = "onnx2torch"
# opsets tried, newest first, when onnx2torch lacks a converter at the file's opset
FALLBACK_OPSETS = (17, 13)


def converter_version() -> str:
    import importlib.metadata as md

    return f"{CONVERTER} {md.version(CONVERTER)}"


def unsupported_ops(model: Any) -> dict[str, list[str]]:
    """Op type → names of the nodes onnx2torch has no converter for (empty when it can take the whole graph)."""
    from onnx2torch.node_converters.registry import get_converter

    register()
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(model.graph.node):
        domain = node.domain or ""
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, opsets.get("", 13)), domain=domain)
        except NotImplementedError:
            missing[node.op_type if not domain else f"{domain}.{node.op_type}"].append(node.name or f"#{i}")
    return dict(missing)


def default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def older_opset(model: Any) -> tuple[Any, int] | None:
    """``(model, opset)``: the graph converted down to the newest of :data:`FALLBACK_OPSETS` at which onnx2torch
    has a converter for every node; None where no older opset helps (or ONNX has no down-converter for an op)."""
    from onnx import version_converter

    current = default_opset(model)
    for opset in FALLBACK_OPSETS:
        if opset >= current:
            continue
        try:
            older = version_converter.convert_version(model, opset)
        except Exception as exc:  # noqa: BLE001  (onnx raises RuntimeError/ValueError/IndexError per adapter)
            log.info("opset %d → %d for onnx2torch: %s", current, opset, str(exc).splitlines()[0] if str(exc) else exc)
            continue
        if not unsupported_ops(older):
            return older, opset
    return None


def initializer_identities(model: Any) -> int:
    """Remove every ``Identity`` of an initializer, its consumers reading the initializer itself; returns how many.

    torch's exporter stores equal initializers once and hands each further use an ``Identity`` of it (the
    zero biases BatchNorm folding leaves in a freshly initialized CNN, tied weights). onnx2torch takes a Conv's
    or Gemm's weight and bias only from initializers, and failed on such a bias with a bare ``KeyError``."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]

    def rewire(nodes) -> None:
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
            for attr in node.attribute:  # an If's or Loop's body may read the outer name too
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    rewire(sub.node)

    rewire(kept)
    del graph.node[:]
    graph.node.extend(kept)
    return len(alias)


def drop_allowzero(model: Any) -> int:
    """Clear ``allowzero=1`` on Reshapes whose target shape is a constant without a 0 entry; how many were cleared.

    ``allowzero`` only says what a 0 in the target means (a 0-sized dim rather than the input's dim);
    with no 0 in a constant target the attribute changes nothing, and onnx2torch refuses it."""
    from onnx import numpy_helper

    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    cleared = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        flags = [a for a in node.attribute if a.name == "allowzero" and a.i == 1]
        if flags and 0 not in numpy_helper.to_array(consts[node.input[1]]).tolist():
            node.attribute.remove(flags[0])
            cleared += 1
    return cleared


def _constants(model: Any) -> dict[str, Any]:
    """Initializers and Constant-node values by name, as numpy arrays."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out.update({n.output[0]: numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"})
    return out


def _split_sizes(node: Any, dims: list | None, consts: dict[str, Any]) -> list[int] | None:
    """The sizes a Split node cuts its input into, where the graph fixes them (else None)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k = len(node.output)
    if len(node.input) > 1 and node.input[1]:
        sizes = consts.get(node.input[1])
        return [int(v) for v in sizes.flatten()] if sizes is not None else None
    if "split" in attrs:
        return [int(v) for v in attrs["split"]]
    axis = int(attrs.get("axis", 0))
    if not dims or not -len(dims) <= axis < len(dims) or not dims[axis]:
        return None
    dim = int(dims[axis])
    chunk = -(-dim // k)  # Split-18: ceil(dim / num_outputs), the last chunk smaller
    sizes = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
    return sizes if all(s > 0 for s in sizes) else None


def splits_as_slices(model: Any) -> int:
    """Every Split whose sizes the graph fixes, as one constant Slice per output; how many were rewritten.

    ONNX's version converter has no adapter down from Split-18, so a graph holding one cannot be
    brought to an opset onnx2torch covers; Slices with constant bounds can (and :func:`static_reshapes`
    then writes them in as plain indexing)."""
    import numpy as np
    from onnx import helper, numpy_helper, shape_inference

    if default_opset(model) < 10 or not any(n.op_type == "Split" and not n.domain for n in model.graph.node):
        return 0
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (sizes from inputs/attributes still work without it)
        inferred = model
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    consts = _constants(model)
    nodes, rewritten = [], 0
    for j, node in enumerate(model.graph.node):
        sizes = (_split_sizes(node, dims.get(node.input[0]), consts)
                 if node.op_type == "Split" and not node.domain and all(node.output) else None)
        if sizes is None or len(sizes) != len(node.output):
            nodes.append(node)
            continue
        axis = int(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0))
        base, start = f"{node.name or f'split{j}'}_as_slice", 0
        for i, (out, size) in enumerate(zip(node.output, sizes)):
            names = [f"{base}{i}_{part}" for part in ("starts", "ends", "axes")]
            for name, value in zip(names, (start, start + size, axis)):
                model.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
            nodes.append(helper.make_node("Slice", [node.input[0], *names], [out], name=f"{base}{i}"))
            start += size
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def onnx_to_torch(onnx_path: Path):
    """The ONNX file as an evaluated ``torch.fx.GraphModule``; an op or attribute onnx2torch cannot take is a
    :class:`ModelImportError` that names it."""
    import onnx

    model = onnx.load(str(onnx_path))
    initializer_identities(model)
    missing = unsupported_ops(model)  # registers edgekit's converters first
    if "Split" in missing and splits_as_slices(model):
        missing = unsupported_ops(model)
    if missing and (older := older_opset(model)) is not None:
        log.info("%s: opset %d converted to %d, where %s has a converter for every node", onnx_path.name,
                 default_opset(model), older[1], converter_version())
        model, missing = older[0], {}
    drop_allowzero(model)
    if missing:
        listed = "; ".join(f"{op} (node {', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
                           for op, names in sorted(missing.items()))
        raise ModelImportError(
            f"{onnx_path.name}: the TFLite targets convert ONNX through {converter_version()}, which has no "
            f"converter for {listed}",
            hint="re-export the model without that op (or give the torch module: module:factory or .pt2), "
                 "or compile it for an ONNX target (onnxruntime, openvino, tensorrt)")
    module = static_reshapes(_convert(model, onnx_path))
    if (computed := dynamic_shape_nodes(module)) and (folded := fold_at_batch_1(model)) is not None:
        # shapes computed from the input's symbolic batch (a torchscript export's Shape→Gather→Concat→Expand for
        # ViT's class token): export cannot trace them; at batch 1 ONNX Runtime folds them to constants
        log.info("%s: %d reshape/expand/slice node(s) with computed shapes; converting the graph at batch 1 with "
                 "its shape arithmetic folded", onnx_path.name, len(computed))
        module = static_reshapes(_convert(folded, onnx_path))
    return module.eval()


def _convert(model: Any, onnx_path: Path):
    from onnx2torch import convert

    try:
        return convert(model)
    except (NotImplementedError, ValueError, RuntimeError, KeyError) as exc:  # an attribute or form it lacks
        raise ModelImportError(
            f"{onnx_path.name}: {converter_version()} could not convert the model: {exc}",
            hint="give the torch module (module:factory or .pt2), or compile it for an ONNX target") from None


SHAPE_MODULES = ("OnnxReshape", "OnnxExpand", "OnnxSlice", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeDynamicAxes")


def dynamic_shape_nodes(module) -> list[str]:
    """The shape-taking modules :func:`static_reshapes` left (their shapes are computed, not constant)."""
    return [n.name for n in module.graph.nodes
            if n.op == "call_module" and type(module.get_submodule(n.target)).__name__ in SHAPE_MODULES]


def fold_at_batch_1(model: Any) -> Any | None:
    """``model`` with its inputs' batch fixed at 1 and ONNX Runtime's basic graph optimizations applied (constant
    folding, Shape of a static tensor, redundant nodes: standard ONNX ops only), or None where that cannot be
    done: another input dimension is symbolic, or ONNX Runtime refuses the graph (a >2 GB model, say).

    The TFLite model has a fixed batch of 1 anyway (:func:`.quantize_tflite._export` then calibrates one sample
    at a time)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                if axis != 0:
                    return None
                dim.Clear()
                dim.dim_value = 1
    for value in fixed.graph.output:  # re-inferred
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    with tempfile.TemporaryDirectory(prefix="edgekit_fold_") as tmp:
        src, out = Path(tmp) / "batch1.onnx", Path(tmp) / "folded.onnx"
        onnx.save(fixed, str(src))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
            folded = onnx.load(str(out))
        except Exception as exc:  # noqa: BLE001 - folding is an attempt; the unfolded module's export says why
            log.info("ONNX Runtime could not fold the batch-1 graph (%s: %s)", type(exc).__name__, exc)
            return None
    if any(n.domain not in ("", "ai.onnx") for n in folded.graph.node):
        return None  # a contrib op: onnx2torch has no converter for it
    return folded


def _reshape(x, shape: tuple[int, ...]):
    """ONNX Reshape with a constant target (0 copies the input's dim, allowzero=0)."""
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _squeeze(x, axes: tuple[int, ...]):
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(x, axes: tuple[int, ...]):
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _expand(x, shape: tuple[int, ...]):
    """ONNX Expand with a constant shape: bidirectional broadcast of the input against it."""
    import torch

    return x.expand(torch.broadcast_shapes(tuple(x.shape), shape))


def _take(x, axis: int, indices):
    """ONNX Gather (numpy.take) with constant indices: an int selects (the axis goes), a list indexes."""
    if isinstance(indices, int):
        return x.select(axis, indices)
    return x[(slice(None),) * (axis % x.dim()) + (indices,)]


def _plain(value):
    """Slices and lists with Python ints only (numpy or torch scalars do not survive FX code generation)."""
    if isinstance(value, slice):
        return slice(*(None if v is None else int(v) for v in (value.start, value.stop, value.step)))
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value if value is None or isinstance(value, slice) else int(value)


def _static_call(kind: str, consts: list):
    """(function, constant arguments) that replace an onnx2torch module called with constant tensors."""
    from onnx2torch.node_converters.slice import _do_slice, _get_slices

    ints = [tuple(int(v) for v in c.flatten().tolist()) if c is not None else None for c in consts]
    if kind == "OnnxReshape":
        return _reshape, (ints[0],)
    if kind == "OnnxExpand":
        return _expand, (ints[0],)
    if kind == "OnnxSqueezeDynamicAxes":
        return (_squeeze, (ints[0],)) if ints and ints[0] else None
    if kind == "OnnxUnsqueezeDynamicAxes":
        return _unsqueeze, (ints[0],)
    if kind == "OnnxSlice":
        flip, pos, neg = _get_slices(*(consts + [None] * (4 - len(consts))))
        return _do_slice, (_plain(flip), _plain(pos), _plain(neg))
    return None


def _constant(module, arg):
    """The tensor an FX argument always holds (an initializer buffer or an ONNX Constant node), else None."""
    import torch

    if getattr(arg, "op", None) == "get_attr":
        value = module.get_buffer(arg.target) if arg.target in dict(module.named_buffers()) else None
    elif getattr(arg, "op", None) == "call_module" and type(module.get_submodule(arg.target)).__name__ == \
            "OnnxConstant" and not arg.args:
        value = module.get_submodule(arg.target).value
    else:
        return None
    return value if isinstance(value, torch.Tensor) else None


def static_reshapes(module):
    """Reshape, Slice, Squeeze, Unsqueeze, Expand and Gather with constant shapes/axes/indices, as calls with those
    values written in.

    onnx2torch's modules for these read shapes and axes from buffers and branch on their values
    (``if torch.any(shape == 0)``, loops over an axes tensor), which torch.export rejects as
    data-dependent control flow; exporters write most flattens and heads this way
    (``Reshape(x, [1, -1])``, ``Squeeze(x, [2, 3])``). A Gather with a constant scalar index (ViT's class
    token, Swin's q/k/v split) indexes with a tensor, which export turns into an unbacked size; Expand builds a
    ``torch.Size`` from its shape tensor (Swin-V2's cosine attention). Resize with constant scales is not
    rewritten yet: such a model is refused with the export's reason."""
    import torch

    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        kind = type(module.get_submodule(node.target)).__name__
        rest = list(node.args[1:])
        if kind not in ("OnnxReshape", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeDynamicAxes", "OnnxSlice",
                        "OnnxGather", "OnnxExpand") or \
                not rest or node.kwargs or any(a is not None and _constant(module, a) is None for a in rest):
            continue
        consts = [None if a is None else _constant(module, a) for a in rest]
        if any(c is not None and (not isinstance(c, torch.Tensor) or c.is_floating_point()) for c in consts):
            continue
        if kind == "OnnxGather":  # the axis is the module's; indices keep their shape (0-d: the axis goes)
            call = (_take, (int(module.get_submodule(node.target)._axis), consts[0].tolist()))
        else:
            call = _static_call(kind, consts)
        if call is None:
            continue
        with graph.inserting_after(node):
            new = graph.call_function(call[0], (node.args[0], *call[1]))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        module.delete_all_unused_submodules()  # the replaced modules (and the buffers they held) go
        module.recompile()
    return module
