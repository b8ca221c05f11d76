"""Attention in an ONNX graph, found by its structure, for the backends' transformer INT8 recipe.

Plain post-training INT8 that quantizes every op serves convolutional nets and breaks transformers: on a
ViT-Ti/16 (random weights, timm-style head) NNCF's default kept 0.91 mean cosine to FP32 and ONNX
Runtime's default Q/DQ 0.86 (uint8) / 0.76 (int8) — the residual Adds, LayerNorms, GELU and Softmax
carry the outliers. What the backends offer instead (``quantize(recipe="transformer")``):

* OpenVINO: NNCF's ``model_type=TRANSFORMER`` (its ignored patterns for attention and normalization,
  SmoothQuant on the MatMuls): 0.998 on the same model;
* ONNX Runtime / TensorRT Q/DQ: only the weight layers (``Conv``, ``Gemm``, and ``MatMul`` with a constant
  operand) quantized; the activation × activation MatMuls of attention (scores Q·Kᵀ and context P·V),
  Softmax, LayerNorm, GELU and the residual Adds stay float: 0.998.

The quantize stage tries the recipe only where plain PTQ failed a gate and :func:`find_attention` says the
graph has attention; the report names it (``ptq_transformer``).

Detection is structural, not by name: an attention block is a ``Softmax`` whose input comes, through at
most a few scaling/masking ops, from a ``MatMul``/``Einsum`` whose two operands are both computed from the
input (not weights). That holds for torch's exporters (``scaled_dot_product_attention`` decomposed, or
``nn.MultiheadAttention``), tf2onnx and paddle2onnx alike, and for hybrid nets (MobileViT, MaxViT, Swin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# ops allowed between the score MatMul and its Softmax: scaling, masking, bias, reshapes
_BETWEEN = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Expand", "Slice",
                      "Squeeze", "Unsqueeze", "Identity"})
_MAX_HOPS = 4
# what the Q/DQ transformer recipe quantizes (with activation × activation MatMuls excluded by name)
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class AttentionGraph:
    """Where attention is in a graph: its Softmax nodes and the activation × activation matrix products."""

    softmax: list[str] = field(default_factory=list)
    dynamic_matmuls: list[str] = field(default_factory=list)
    normalizations: int = 0
    unnamed_matmuls: int = 0  # activation × activation MatMuls without a node name (cannot be excluded by name)

    def __bool__(self) -> bool:
        return bool(self.softmax)

    def to_dict(self) -> dict[str, int]:
        return {"attention_softmax": len(self.softmax), "activation_matmuls": len(self.dynamic_matmuls),
                "normalizations": self.normalizations}


def constant_tensors(graph) -> set[str]:
    """Names of the tensors computed from weights alone (initializers, Constants, and ops on those only)."""
    const = {i.name for i in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type == "Constant" or (node.input and all(not i or i in const for i in node.input)):
            const.update(o for o in node.output if o)
    return const


def find_attention(onnx_path: Path) -> AttentionGraph:
    """The attention blocks of ``onnx_path`` (empty, and false, when it has none)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    const = constant_tensors(graph)
    producer = {o: n for n in graph.node for o in n.output if o}
    dynamic = [n for n in graph.node if n.op_type in ("MatMul", "Einsum") and len(n.input) >= 2
               and all(i and i not in const for i in n.input[:2])]
    dynamic_outputs = {o for n in dynamic for o in n.output}

    def from_score_matmul(tensor: str, hops: int) -> bool:
        if tensor in dynamic_outputs:
            return True
        node = producer.get(tensor)
        if node is None or hops == 0 or node.op_type not in _BETWEEN:
            return False
        return any(from_score_matmul(i, hops - 1) for i in node.input if i and i not in const)

    softmax = [n.name or n.output[0] for n in graph.node
               if n.op_type == "Softmax" and from_score_matmul(n.input[0], _MAX_HOPS)]
    if not softmax:
        return AttentionGraph()
    norms = sum(1 for n in graph.node if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization",
                                                         "ReduceMean"))
    return AttentionGraph(softmax, [n.name for n in dynamic if n.name], norms, sum(1 for n in dynamic if not n.name))
