"""ONNX files as torch's own exporter writes them reach the TFLite targets.

``torch.onnx.export(dynamo=True)`` (what ``export_onnx`` uses) writes opset 20: ReduceMean takes its
axes as an input (opset 18) and every Reshape carries ``allowzero=1``. onnx2torch has converters up to
opset 13–17 and does not implement ``allowzero=1``, so every such file was refused for
android-arm64-tflite (the zoo coverage run: squeezenet1_1 "no converter for ReduceMean; Reshape").
The graph is converted down to an opset onnx2torch covers and the flag cleared where it changes
nothing; the torch module must match ONNX Runtime on the original file.
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
    # the premise: at the file's own opset onnx2torch lacks both converters
    assert set(unsupported_ops(onnx.load(str(path)))) == {"ReduceMean", "Reshape"}
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
