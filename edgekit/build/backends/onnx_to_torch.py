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
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...errors import ModelImportError

log = logging.getLogger(__name__)

CONVERTER = "onnx2torch"


def converter_version() -> str:
    import importlib.metadata as md

    return f"{CONVERTER} {md.version(CONVERTER)}"


def unsupported_ops(model: Any) -> dict[str, list[str]]:
    """Op type → names of the nodes onnx2torch has no converter for (empty when it can take the whole graph)."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(model.graph.node):
        domain = node.domain or ""
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, opsets.get("", 13)), domain=domain)
        except NotImplementedError:
            missing[node.op_type if not domain else f"{domain}.{node.op_type}"].append(node.name or f"#{i}")
    return dict(missing)


def onnx_to_torch(onnx_path: Path):
    """The ONNX file as an evaluated ``torch.fx.GraphModule``; an op or attribute onnx2torch cannot take is a
    :class:`ModelImportError` that names it."""
    import onnx
    from onnx2torch import convert

    model = onnx.load(str(onnx_path))
    missing = unsupported_ops(model)
    if missing:
        listed = "; ".join(f"{op} (node {', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
                           for op, names in sorted(missing.items()))
        raise ModelImportError(
            f"{onnx_path.name}: the TFLite targets convert ONNX through {converter_version()}, which has no "
            f"converter for {listed}",
            hint="re-export the model without that op (or give the torch module: module:factory or .pt2), "
                 "or compile it for an ONNX target (onnxruntime, openvino, tensorrt)")
    try:
        module = convert(model)
    except (NotImplementedError, ValueError, RuntimeError, KeyError) as exc:  # an attribute or form it lacks
        raise ModelImportError(
            f"{onnx_path.name}: {converter_version()} could not convert the model: {exc}",
            hint="give the torch module (module:factory or .pt2), or compile it for an ONNX target") from None
    return static_reshapes(module).eval()


def _reshape(x, shape: tuple[int, ...]):
    """ONNX Reshape with a constant target (0 copies the input's dim, allowzero=0)."""
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def static_reshapes(module):
    """Reshapes whose target shape is an initializer, as ``reshape`` calls with that shape written in.

    onnx2torch's Reshape reads the target from a buffer and branches on its values
    (``if torch.any(shape == 0)``), which torch.export rejects as data-dependent control flow;
    exporters write most flattens this way (``Reshape(x, [1, -1])``, ``[0, -1]``)."""
    import torch
    from onnx2torch.node_converters.reshape import OnnxReshape

    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), OnnxReshape):
            continue
        src = node.args[1] if len(node.args) > 1 else None
        if getattr(src, "op", None) != "get_attr":
            continue
        shape = module.get_submodule(src.target.rsplit(".", 1)[0]) if "." in src.target else module
        value = getattr(shape, src.target.rsplit(".", 1)[-1])
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int64, torch.int32):
            continue
        with graph.inserting_after(node):
            new = graph.call_function(_reshape, (node.args[0], tuple(int(d) for d in value.tolist())))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        module.recompile()
    return module
