"""Converters onnx2torch lacks for the opsets torch's own exporter writes (18–21), registered into its registry.

onnx2torch 1.5.15 (its last release) has converters up to opset 13–17 for most ops; torch's dynamo
exporter writes opset 20. :func:`..onnx_to_torch.older_opset` converts a graph down with
``onnx.version_converter`` where ONNX has an adapter for every node, but ONNX has none down from
Pad-18 (axes as an input), Split-18, ConstantOfShape-20 or Gelu-20, so every transformer the zoo
exported (ViT, Swin, ConvNeXt: GELU and Pad or ReduceMean) was refused for the TFLite targets.

What is registered here, each checked against the node so that a feature the older converter
does not implement is a refusal naming it, never a silently different graph:

- **type-only version bumps** (the newer version adds element types such as bfloat16, float8 or
  int4, and nothing else for float models): the op's newest onnx2torch converter serves them;
- **Reshape-14/19/21** (``allowzero``): the opset-13 converter where ``allowzero`` is 0 — the
  caller clears it where the constant target holds no 0 (:func:`..onnx_to_torch.drop_allowzero`);
- **AveragePool-19** (``dilations``), **Resize-18/19** (``antialias``, ``axes``, a new
  coordinate mode), **ScatterND-18** (``max``/``min`` reductions): the older converter where the
  node leaves the new attribute at its default;
- **Reduce*-18/20** (axes moved from an attribute to an input): constant axes, made non-negative
  from the input's rank (onnx2torch's own Max/Min/Prod module is wrong for negative axes with
  ``keepdims=0``);
- **Pad-18/19/21** (an ``axes`` input, ``wrap`` mode): constant pads/axes/value, padding
  computed once (a static pad torch.export accepts, where onnx2torch's own reads its pads tensor
  at run time); reflect/edge padding of an axis torch cannot pad in that mode is refused;
- **IsInf-20**: onnx2torch's converter, where ``detect_negative``/``detect_positive`` are 1 (it
  detects both signs whatever they say);
- **Gelu-20**: ``torch.nn.GELU`` with the node's ``approximate``, which litert-torch lowers to
  TFLite's GELU.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

_REGISTERED = False

# op → (versions added after onnx2torch's newest, that newest) where the newer versions only add types
TYPE_ONLY: dict[str, tuple[tuple[int, ...], int]] = {
    "Cast": ((19, 21), 13), "Constant": ((19, 21), 13), "ConstantOfShape": ((20, 21), 9), "Equal": ((19,), 13),
    "Identity": ((19, 21), 16), "Shape": ((19, 21), 15), "Flatten": ((21,), 13), "Transpose": ((21,), 13),
    "Unsqueeze": ((21,), 13), "IsInf": ((20,), 10), "IsNaN": ((20,), 13),
}
# reflect/replicate padding in torch: how many trailing axes of a tensor of each rank it can pad
PAD_TRAILING = {2: 1, 3: 2, 4: 3, 5: 3}
REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSumSquare")


def _unsupported(node: Any, what: str) -> NotImplementedError:
    return NotImplementedError(f"{node.operation_type} node {node.name!r}: {what}")


def _const_ints(node: Any, graph: Any, index: int) -> list[int] | None:
    """The constant integer input ``index`` of the node as a list (None when the input is absent)."""
    from onnx2torch.utils.common import get_const_value

    if len(node.input_values) <= index or not node.input_values[index]:
        return None
    try:
        value = get_const_value(node.input_values[index], graph)
    except KeyError:
        raise _unsupported(node, f"input {index} ({node.input_values[index]!r}) is computed in the graph; only a "
                                 "constant is supported") from None
    return [int(v) for v in (value.flatten().tolist() if hasattr(value, "flatten") else list(value))]


def _alias(registry: dict, description: Any, op: str, old: int, check: Callable[[Any], str | None] | None = None):
    """Register ``op`` at a newer version as its onnx2torch converter at ``old``, after ``check`` (a reason to
    refuse, or None)."""
    converter = registry.get(description(domain="", operation_type=op, version=old))
    if converter is None:  # another onnx2torch release without that version: nothing to alias
        return None

    def convert(node, graph):
        reason = check(node) if check is not None else None
        if reason:
            raise _unsupported(node, reason)
        return converter(node, graph)

    return convert


def _isinf_check(node) -> str | None:
    if node.attributes.get("detect_negative", 1) != 1 or node.attributes.get("detect_positive", 1) != 1:
        return "detect_negative/detect_positive other than 1 are not implemented by onnx2torch (it detects both)"
    return None


def _reshape_check(node) -> str | None:
    if node.attributes.get("allowzero", 0):
        return ("allowzero=1 (a 0 in the target shape means a 0-sized dimension) is not implemented by onnx2torch; "
                "re-export with allowzero=0 or a target shape without 0")
    return None


def _avg_pool_check(node) -> str | None:
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        return f"dilations {node.attributes['dilations']} (AveragePool-19) are not implemented"
    return None


def _resize_check(node) -> str | None:
    a = node.attributes
    if a.get("antialias", 0):
        return "antialias=1 (Resize-18) is not implemented"
    if a.get("axes"):
        return "axes (Resize-18) is not implemented"
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={a['keep_aspect_ratio_policy']!r} (Resize-18) is not implemented"
    if a.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        return "coordinate_transformation_mode='half_pixel_symmetric' (Resize-19) is not implemented"
    return None


def _scatter_check(node) -> str | None:
    reduction = node.attributes.get("reduction", "none")
    return None if reduction in ("none", "add", "mul") else f"reduction={reduction!r} (ScatterND-18) is not implemented"


@functools.cache
def _reduce_module():
    import torch
    from onnx2torch.node_converters.reduce import _TORCH_FUNCTION_FROM_ONNX_TYPE
    from onnx2torch.utils.common import OnnxToTorchModule

    class OnnxReduceAxes(torch.nn.Module, OnnxToTorchModule):
        """ONNX Reduce* with constant axes, made non-negative from the input's rank (a Python int at trace time).
        onnx2torch's own module reduces Max/Min/Prod one axis at a time, shifting each axis by the ones already
        removed, which is wrong for negative axes with keepdims=0."""

        def __init__(self, operation_type: str, axes: list[int] | None, keepdims: bool):
            super().__init__()
            self.operation_type, self.axes, self.keepdims = operation_type, axes, keepdims

        def forward(self, x):
            axes = sorted({a % x.dim() for a in self.axes}) if self.axes else list(range(x.dim()))
            if self.operation_type == "ReduceMax":
                return torch.amax(x, dim=axes, keepdim=self.keepdims)
            if self.operation_type == "ReduceMin":
                return torch.amin(x, dim=axes, keepdim=self.keepdims)
            if self.operation_type == "ReduceProd":
                for axis in reversed(axes):  # the highest first: the lower axes keep their index
                    x = torch.prod(x, dim=axis, keepdim=self.keepdims)
                return x
            return _TORCH_FUNCTION_FROM_ONNX_TYPE[self.operation_type](x, dim=axes, keepdim=self.keepdims)

    return OnnxReduceAxes


def _reduce(node, graph):
    """Reduce*-18/20: the axes input (constant) written into the module."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    axes = _const_ints(node, graph, 1)
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        raise _unsupported(node, "noop_with_empty_axes=1 with no axes is not implemented")
    module = _reduce_module()(node.operation_type, axes or None, bool(node.attributes.get("keepdims", 1)))
    mapping = onnx_mapping_from_node(node)
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping._replace(inputs=mapping.inputs[:1]))


@functools.cache
def _pad_module():
    import torch
    from onnx2torch.utils.common import OnnxToTorchModule

    class OnnxPadAxes(torch.nn.Module, OnnxToTorchModule):
        """ONNX Pad (opset 18+) with constant pads, axes and value: the torch padding is computed from the input's
        rank, a Python int at trace time, so torch.export sees a static pad."""

        def __init__(self, axes: list[int] | None, begins: list[int], ends: list[int], mode: str, value: float,
                     node: str = ""):
            super().__init__()
            self.axes, self.begins, self.ends, self.mode, self.value = axes, begins, ends, mode, value
            self.node = node

        def forward(self, x):
            rank = x.dim()
            axes = [a % rank for a in self.axes] if self.axes is not None else list(range(rank))
            per_axis = dict(zip(axes, zip(self.begins, self.ends)))
            padded = [a for a in axes if per_axis[a] != (0, 0)]
            if not padded:
                return x
            first = min(padded)
            if self.mode != "constant":  # torch pads the last 2–3 dims of a 4-D/5-D tensor in these modes
                if first < rank - PAD_TRAILING.get(rank, 0):
                    raise NotImplementedError(f"Pad node {self.node!r}: {self.mode} padding of axis {first} of a "
                                              f"{rank}-D tensor (torch pads only its last {PAD_TRAILING.get(rank, 0)})")
                first = min(first, rank - {4: 2, 5: 3}.get(rank, 1))
            pads: list[int] = []
            for a in range(rank - 1, first - 1, -1):  # torch: last dim first, (begin, end) each
                pads.extend(per_axis.get(a, (0, 0)))
            if self.mode == "constant":
                return torch.nn.functional.pad(x, pads, mode="constant", value=self.value)
            return torch.nn.functional.pad(x, pads, mode=self.mode)

    return OnnxPadAxes


def _pad(node, graph):
    """Pad-18/19/21: constant pads (and axes, constant value) as a static pad."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
    mode = node.attributes.get("mode", "constant")
    if mode not in modes:
        raise _unsupported(node, f"mode {mode!r} is not implemented")
    pads = _const_ints(node, graph, 1)
    axes = _const_ints(node, graph, 3)
    value = 0.0
    if len(node.input_values) > 2 and node.input_values[2]:
        from onnx2torch.utils.common import get_const_value

        try:
            raw = get_const_value(node.input_values[2], graph)
        except KeyError:
            raise _unsupported(node, "the constant_value input is computed in the graph") from None
        value = float(raw.flatten()[0]) if hasattr(raw, "flatten") and raw.numel() else float(raw or 0.0)
    if pads is None or len(pads) % 2 or (axes is not None and len(pads) != 2 * len(axes)):
        raise _unsupported(node, f"pads {pads} do not fit axes {axes}")
    half = len(pads) // 2
    rank = _rank(graph, node.input_values[0])
    if mode != "constant" and rank is not None:
        axes_n = [a % rank for a in axes] if axes is not None else list(range(rank))
        outer = [a for a, b, e in zip(axes_n, pads[:half], pads[half:]) if (b, e) != (0, 0)
                 and a < rank - PAD_TRAILING.get(rank, 0)]
        if outer:
            raise _unsupported(node, f"{mode} padding of axis {outer[0]} of a {rank}-D tensor: torch pads only the "
                                     f"last {PAD_TRAILING.get(rank, 0)} axes in this mode")
    module = _pad_module()(axes, pads[:half], pads[half:], modes[mode], value, node.name)
    mapping = onnx_mapping_from_node(node)
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping._replace(inputs=mapping.inputs[:1]))


def _rank(graph, name: str) -> int | None:
    """The rank of a graph value where shape inference recorded it."""
    for vi in (graph.value_info.get(name), *(i for i in graph.proto.input if i.name == name)):
        if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _gelu(node, graph):
    import torch
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _unsupported(node, f"approximate={approximate!r}")
    return OperationConverterResult(torch_module=torch.nn.GELU(approximate=approximate),
                                    onnx_mapping=onnx_mapping_from_node(node))


def register() -> None:
    """Add the converters above to onnx2torch's registry, once; a version onnx2torch already has is left to it."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY as registry
    from onnx2torch.node_converters.registry import OperationDescription as description

    def add(op: str, version: int, converter) -> None:
        key = description(domain="", operation_type=op, version=version)
        if converter is not None and key not in registry:
            registry[key] = converter

    for op, (versions, old) in TYPE_ONLY.items():
        for v in versions:
            add(op, v, _alias(registry, description, op, old, _isinf_check if op == "IsInf" else None))
    for v in (14, 19, 21):
        add("Reshape", v, _alias(registry, description, "Reshape", 13, _reshape_check))
    add("AveragePool", 19, _alias(registry, description, "AveragePool", 11, _avg_pool_check))
    for v in (18, 19):
        add("Resize", v, _alias(registry, description, "Resize", 13, _resize_check))
    add("ScatterND", 18, _alias(registry, description, "ScatterND", 16, _scatter_check))
    for op in REDUCE_OPS:
        add(op, 18, _reduce)
        if op in ("ReduceMax", "ReduceMin"):
            add(op, 20, _reduce)
    for v in (18, 19, 21):
        add("Pad", v, _pad)
    add("Gelu", 20, _gelu)
    _REGISTERED = True
