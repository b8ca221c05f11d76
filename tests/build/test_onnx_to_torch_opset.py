"""ONNX files as torch's own exporter writes them reach the TFLite targets.

``torch.onnx.export(dynamo=True)`` (what ``export_onnx`` uses) writes opset 20: ReduceMean takes its
axes as an input (opset 18) and every Reshape carries ``allowzero=1``. onnx2torch has converters up to
opset 13–17 and does not implement ``allowzero=1``, so every such file was refused for
android-arm64-tflite (the zoo coverage run: squeezenet1_1 "no converter for ReduceMean; Reshape").
edgekit registers converters for the versions torch writes (``onnx2torch_ops``), else converts the graph
down to an opset onnx2torch covers, and clears the flag where it changes nothing; the torch module must
match ONNX Runtime on the original file and pass torch.export(strict=True).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx2torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from edgekit.build.backends.onnx_to_torch import onnx_to_torch, unsupported_ops  # noqa: E402
from edgekit.errors import ModelImportError  # noqa: E402


def opset20_classifier(path: Path, target: list[int] | None = None, side: int = 16) -> Path:
    """Conv → Relu → ReduceMean(axes input, opset 18+) → Reshape(allowzero=1) → Gemm, batch dynamic, at opset 20."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, 8).astype(np.float32),
              "w2": rng.normal(0, 0.5, (10, 8)).astype(np.float32), "b2": np.zeros(10, np.float32),
              "axes": np.array([2, 3], np.int64), "shape": np.array(target or [-1, 8], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="node_mean", keepdims=1),
             helper.make_node("Reshape", ["m", "shape"], ["flat"], name="node_Reshape", allowzero=1),
             helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_opset20_export_converts_and_matches_onnxruntime(tmp_path):
    path = opset20_classifier(tmp_path / "m.onnx")
    # onnx2torch 1.5.15 has neither converter at opset 20; edgekit registers both (ReduceMean-18 with its
    # constant axes input, Reshape-19 where allowzero is cleared)
    assert unsupported_ops(onnx.load(str(path))) == {}
    module = onnx_to_torch(path)
    x = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (3, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_reshape_whose_target_holds_a_zero_keeps_allowzero_and_is_refused_with_the_reason(tmp_path):
    # [0, 8] with allowzero=1 means a 0-sized batch, not "copy the batch": not the same graph without it
    path = opset20_classifier(tmp_path / "zero.onnx", target=[0, 8])
    with pytest.raises(ModelImportError, match="allowzero"):
        onnx_to_torch(path)


def opset20_channel_split(path: Path, channels: int = 10, parts: int = 3) -> Path:
    """Conv → Split(num_outputs, opset 18+: ShuffleNet's channel split) → Relu on one part → Concat → ReduceMean."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    arrays = {"w": rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32), "axes": np.array([2, 3], np.int64)}
    outs = [f"part{i}" for i in range(parts)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["c"], outs, name="node_Split", axis=1, num_outputs=parts),
             helper.make_node("Relu", [outs[0]], ["r"], name="relu"),
             helper.make_node("Concat", [*outs[1:], "r"], ["cat"], name="cat", axis=1),
             helper.make_node("ReduceMean", ["cat", "axes"], ["logits"], name="node_mean", keepdims=0)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("channels,parts", [(8, 2), (10, 3)])  # even, and Split-18's smaller last chunk (4, 4, 2)
def test_split_18_is_written_as_slices_and_matches_onnxruntime(tmp_path, channels, parts):
    # ONNX's version converter has no adapter down from Split-18: without the rewrite the file is refused
    from onnx import version_converter

    path = opset20_channel_split(tmp_path / "split.onnx", channels, parts)
    with pytest.raises(Exception, match="Split"):
        version_converter.convert_version(onnx.load(str(path)), 17)
    module = onnx_to_torch(path)
    assert "Split" not in {type(m).__name__ for m in module.modules()}
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    torch.export.export(module, (torch.from_numpy(x[:1]),), strict=True)  # what the TFLite path does next


def _opset20(path: Path, nodes: list, inputs: list, outputs: list, arrays: dict[str, np.ndarray]) -> Path:
    from onnx import helper, numpy_helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _matches_onnxruntime(path: Path, x: np.ndarray):
    """The converted module against ONNX Runtime on the file, and what the TFLite path does next (strict export)."""
    module = onnx_to_torch(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    torch.export.export(module, (torch.from_numpy(x),), strict=True)
    return module


def transformer_block(path: Path, approximate: str = "none") -> Path:
    """What torch exports for ViT/Swin/ConvNeXt at opset 20: Pad-19 with an axes input (Swin's window padding),
    LayerNormalization, Gelu-20, Gather with a constant scalar index (ViT's class token), ReduceMean-18."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    arrays = {"pads": np.array([0, 1, 0, 2], np.int64), "pad_axes": np.array([1, 2], np.int64),
              "ln_w": rng.normal(1, 0.1, 6).astype(np.float32), "ln_b": rng.normal(0, 0.1, 6).astype(np.float32),
              "w": rng.normal(0, 0.4, (6, 6)).astype(np.float32), "token": np.array(0, np.int64),
              "axes": np.array([1], np.int64), "shape": np.array([-1, 6], np.int64)}
    nodes = [helper.make_node("Pad", ["x", "pads", "", "pad_axes"], ["p"], name="node_pad"),  # [2, 4, 6+1+2, 6]
             helper.make_node("Reshape", ["p", "shape"], ["rows"], name="node_view"),  # keeps allowzero=0
             helper.make_node("LayerNormalization", ["rows", "ln_w", "ln_b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w"], ["mm"], name="fc"),
             helper.make_node("Gelu", ["mm"], ["g"], name="node_gelu", approximate=approximate),
             helper.make_node("Reshape", ["g", "grid"], ["back"], name="node_view_1"),
             helper.make_node("Gather", ["back", "token"], ["cls"], name="node_select", axis=1),
             helper.make_node("ReduceMean", ["cls", "axes"], ["out"], name="node_mean", keepdims=0)]
    arrays["grid"] = np.array([2, 4, 9, 6], np.int64)
    return _opset20(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 6])], arrays)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_transformer_ops_at_opset20_convert_without_a_down_converter(tmp_path, approximate):
    # the premise: ONNX has no adapter down from Gelu-20 or Pad-18, and onnx2torch no converter at opset 20
    from onnx import version_converter

    path = transformer_block(tmp_path / "block.onnx", approximate)
    with pytest.raises(Exception, match="Gelu"):
        version_converter.convert_version(onnx.load(str(path)), 17)
    assert unsupported_ops(onnx.load(str(path))) == {}  # registered by edgekit.build.backends.onnx2torch_ops
    module = _matches_onnxruntime(path, np.random.default_rng(5).normal(size=(2, 4, 6, 6)).astype(np.float32))
    gelus = [m for m in module.modules() if isinstance(m, torch.nn.GELU)]
    assert [g.approximate for g in gelus] == [approximate]  # litert-torch lowers this to TFLite's GELU
    assert "OnnxGather" not in {type(m).__name__ for m in module.modules()}  # written in as a constant index


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_18_axes_input_matches_onnxruntime(tmp_path, mode):
    from onnx import TensorProto, helper

    arrays = {"pads": np.array([1, 2, 2, 1], np.int64), "axes": np.array([-1, 2], np.int64)}
    inputs = ["x", "pads", "value" if mode == "constant" else "", "axes"]
    if mode == "constant":
        arrays["value"] = np.array(0.5, np.float32)
    node = helper.make_node("Pad", inputs, ["y"], name="node_pad", mode=mode)
    path = _opset20(tmp_path / "pad.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], arrays)
    _matches_onnxruntime(path, np.random.default_rng(6).normal(size=(1, 2, 5, 5)).astype(np.float32))


@pytest.mark.parametrize("indices", [[2, -1, 0], [[1, 0], [3, 3]]])
def test_gather_with_constant_index_lists_matches_onnxruntime(tmp_path, indices):
    from onnx import TensorProto, helper

    node = helper.make_node("Gather", ["x", "idx"], ["y"], name="node_index", axis=2)
    path = _opset20(tmp_path / "gather.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      [1, 3, 4, 2])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, *np.shape(indices), 2])],
                    {"idx": np.array(indices, np.int64)})
    _matches_onnxruntime(path, np.random.default_rng(7).normal(size=(1, 3, 4, 2)).astype(np.float32))


@pytest.mark.parametrize("node_kwargs,reason,side", [
    ({"op_type": "AveragePool", "kernel_shape": [2, 2], "dilations": [2, 2]}, "dilations", 4),
    ({"op_type": "Pad", "mode": "wrap"}, "wrap", 8),
])
def test_a_newer_feature_onnx2torch_lacks_is_refused_with_its_name(tmp_path, node_kwargs, reason, side):
    # the converter of the older version would ignore the attribute and compute something else
    from onnx import TensorProto, helper

    kwargs = dict(node_kwargs)
    op = kwargs.pop("op_type")
    inputs = ["x", "pads"] if op == "Pad" else ["x"]
    node = helper.make_node(op, inputs, ["y"], name="node_odd", **kwargs)
    path = _opset20(tmp_path / "odd.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, side, side])],
                    {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)})
    with pytest.raises(ModelImportError, match=f"node_odd.*{reason}"):
        onnx_to_torch(path)


def test_expand_with_a_constant_shape_broadcasts_both_ways_and_exports(tmp_path):
    # onnx2torch builds torch.Size(shape_tensor), which torch.export cannot (Swin-V2's cosine attention)
    from onnx import TensorProto, helper

    node = helper.make_node("Expand", ["x", "shape"], ["y"], name="node_expand")
    path = _opset20(tmp_path / "expand.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      [1, 3, 1, 2])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 2])],
                    {"shape": np.array([2, 1, 4, 1], np.int64)})
    module = _matches_onnxruntime(path, np.random.default_rng(8).normal(size=(1, 3, 1, 2)).astype(np.float32))
    assert "OnnxExpand" not in {type(m).__name__ for m in module.modules()}


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "ReduceProd", "ReduceMean"])
@pytest.mark.parametrize("axes", [[-2, -1], [1, -1]])
def test_reduce_18_with_negative_axes_and_no_keepdims_matches_onnxruntime(tmp_path, op, axes):
    # onnx2torch's module removes Max/Min/Prod axes one at a time, shifting each by those already gone: wrong
    # for negative axes (found in review: [-2, -1] gave shape (2, 5) for ONNX Runtime's (2, 3))
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x", "axes"], ["y"], name="node_reduce", keepdims=0)
    kept = [d for i, d in enumerate([2, 3, 4, 5]) if i not in {a % 4 for a in axes}]
    path = _opset20(tmp_path / "reduce.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      [2, 3, 4, 5])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, kept)], {"axes": np.array(axes, np.int64)})
    _matches_onnxruntime(path, np.random.default_rng(9).uniform(0.5, 1.5, (2, 3, 4, 5)).astype(np.float32))


def test_isinf_20_detecting_one_sign_is_refused(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("IsInf", ["x"], ["y"], name="node_isinf", detect_negative=0)
    path = _opset20(tmp_path / "isinf.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                    [helper.make_tensor_value_info("y", TensorProto.BOOL, [4])], {})
    with pytest.raises(ModelImportError, match="node_isinf.*detect_negative"):
        onnx_to_torch(path)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_pad_of_an_axis_torch_cannot_pad_in_that_mode_is_refused_at_conversion(tmp_path, mode):
    # torch pads only the last 3 axes of a 4-D tensor in reflect/replicate mode: the batch axis is refused by name
    # at conversion, not left to fail when the model first runs
    from onnx import TensorProto, helper

    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="node_pad", mode=mode)
    path = _opset20(tmp_path / "pad.onnx", [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [2, 2, 4, 4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2, 4, 4])],
                    {"pads": np.array([1, 1], np.int64), "axes": np.array([0], np.int64)})
    with pytest.raises(ModelImportError, match=f"node_pad.*{mode} padding of axis 0 of a 4-D"):
        onnx_to_torch(path)


def test_shapes_computed_from_a_symbolic_batch_are_folded_at_batch_1(tmp_path):
    """The torchscript exporter writes ViT's class-token expand as Shape → Gather → Unsqueeze → Concat → Where →
    Expand of the dynamic batch, which torch.export cannot trace; the graph is converted at batch 1 with ONNX
    Runtime's basic (standard-op) folding instead, and still matches ONNX Runtime on the original file."""
    from torchvision.models.vision_transformer import VisionTransformer

    from edgekit.build.backends.onnx_to_torch import dynamic_shape_nodes, fold_at_batch_1

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10).eval()
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(vit, torch.zeros(1, 3, 32, 32), path, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    assert any(n.op_type == "Expand" for n in onnx.load(str(path)).graph.node)
    module = onnx_to_torch(path)
    assert dynamic_shape_nodes(module) == []
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    with torch.no_grad():
        got = np.concatenate([module(torch.from_numpy(x[i : i + 1])).numpy() for i in range(3)])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    torch.export.export(module, (torch.from_numpy(x[:1]),), strict=True)
    # another symbolic dimension than the batch: not folded (the converted graph would fix a size it was not given)
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    assert fold_at_batch_1(model) is None


def test_equal_initializers_the_exporter_shares_through_identity_convert(tmp_path):
    """torch's exporter stores equal initializers once and gives each further use an Identity of it: a freshly
    initialized CNN's BatchNorm-folded biases are all zero. onnx2torch reads a Conv's bias only from initializers
    and failed with a bare KeyError; the Identities are removed first and the module matches ONNX Runtime."""
    from edgekit.build.backends.onnx_to_torch import initializer_identities
    from edgekit.models.digits_cnn import build

    torch.manual_seed(0)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(build(width=8).eval(), torch.zeros(1, 1, 8, 8), str(path), dynamo=False, input_names=["x"])
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    shared = [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]
    assert shared  # what the exporter wrote: the case under test
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = onnx_to_torch(path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    # an Identity that is itself a graph output stays (removing it would drop the output's name)
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_out"]), helper.make_node("Identity", ["w"], ["w2"]),
         helper.make_node("Add", ["x", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    m = helper.make_model(g)
    assert initializer_identities(m) == 1
    assert [(n.op_type, list(n.input)) for n in m.graph.node] == [("Identity", ["w"]), ("Add", ["x", "w"])]
