"""ONNX → LiteRT: an ONNX file compiles for the mobile targets to a full-INT8 ``.tflite``.

The paddle2onnx-style classifier of tests/host/test_onnx_import.py (a −1 batch, symbolic
height and width, fixed at 32×32 by ``--input-shape``) and a torchvision mobilenet_v2 exported
to ONNX go through onnx2torch → torch.export(strict) → litert-torch PT2E; the fidelity gate
runs through the tflite engine, the artifact's ops are integer, and the manifest names the
converter. An op onnx2torch cannot take is a ModelImportError naming it, from the CLI a JSON
error with no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ModelImportError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from test_onnx_import import classifier, data, inputs, run, save  # noqa: E402

runner = CliRunner()


def compile_tflite(model: Path, target: str, tmp_path: Path, signing_key, shape=(1, 3, 32, 32), **extra):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build

    overrides = {"model.source": str(model), "model.name": model.stem, "model.input_shape": list(shape),
                 "target": target, "quantize.calibration_count": 20, "fidelity.min_cosine": 0.95,
                 "output": tmp_path / f"{model.stem}-{target}.ekb", "latency": {"on_slower": "keep_int8"}}
    overrides.update(extra)
    return compile_model(load_build(None, overrides), signing_key)


def check_int8_bundle(result, keys, reference: np.ndarray, x: np.ndarray, min_agreement: float = 0.75) -> dict:
    """The bundle is full INT8 with the converter recorded, and it runs on the device runtime."""
    import edgekit_runtime

    rep = result.report
    assert rep["result"] == "ok" and rep["precision"] == "int8", rep.get("gates")
    gates = {g["name"]: g["status"] for g in rep["gates"]}
    assert gates.get("fidelity.cosine") == "passed", rep["gates"]
    with edgekit_runtime.load(result.bundle, keyring=keys["public"]) as model:
        backend = model.manifest.backend
        assert backend.name == "tflite" and "onnx2torch" in backend.version
        q = backend.quantization
        details = {**q.extra, "method": q.method}
        assert details["source_converter"].startswith("onnx2torch ")
        ops = details["int8_ops"]
        assert ops["total"] > 0 and ops["int8"] / ops["total"] >= 0.9, ops
        assert model.manifest.inputs[0].quantization is not None  # int8 input tensor: full integer
        out = model.run(x)[model.outputs[0].name]
    assert out.shape == reference.shape
    assert (out.argmax(1) == reference.argmax(1)).mean() >= min_agreement
    return details


@pytest.fixture(scope="module")
def paddle(tmp_path_factory) -> Path:
    return save(classifier("paddle"), tmp_path_factory.mktemp("onnx_tflite") / "paddle.onnx")


@pytest.mark.parametrize("target", ["android-arm64-tflite", "rpi5-tflite"])
def test_paddle_style_onnx_compiles_to_full_int8_tflite(paddle, tmp_path, signing_key, keys, target):
    calib, val = data(tmp_path, paddle)
    result = compile_tflite(paddle, target, tmp_path, signing_key, **{
        "calibration.source": str(calib), "validation.source": str(val), "accuracy.max_accuracy_drop": 10.0})
    assert {g["name"]: g["status"] for g in result.report["gates"]}["accuracy"] == "passed"
    x = inputs(8, 7)
    details = check_int8_bundle(result, keys, run(paddle, x), x)
    assert details["strict_export"] is True  # onnx2torch's graph module passes strict export


@pytest.mark.slow
def test_torchvision_mobilenet_v2_onnx_compiles_to_full_int8_tflite(tmp_path, signing_key, keys):
    import onnxruntime as ort
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    x = np.random.default_rng(0).normal(size=(48, 3, 64, 64)).astype(np.float32)
    for m in net.modules():  # random weights: BatchNorm statistics re-estimated on the inputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(x[:32]))
    net.eval()
    path = tmp_path / "mobilenet_v2.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=x[:32])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x[32:]})[0]
    result = compile_tflite(path, "android-arm64-tflite", tmp_path, signing_key, shape=(1, 3, 64, 64), **{
        "calibration.source": str(tmp_path / "calib.npz"), "fidelity.min_cosine": 0.8,
        "accuracy": {"max_accuracy_drop": None}})
    # random weights: logits close together, so top-1 flips easily; cosine ≥ 0.8 is the gate
    check_int8_bundle(result, keys, ref, x[32:], min_agreement=0.5)


def unsupported_model():
    """The paddle classifier ending in a standard ONNX op onnx2torch has no converter for (``Hardmax``)."""
    import onnx
    from onnx import helper

    m = classifier("paddle")
    out = m.graph.node[-1].output[0]
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("Hardmax", ["pre"], [out], name="odd_hardmax", axis=1))
    onnx.checker.check_model(m)
    return m


def test_an_op_the_converter_cannot_take_is_named(tmp_path):
    from edgekit.build.backends.onnx_to_torch import onnx_to_torch, unsupported_ops

    model = unsupported_model()
    assert unsupported_ops(model) == {"Hardmax": ["odd_hardmax"]}
    with pytest.raises(ModelImportError, match=r"no converter for Hardmax \(node odd_hardmax\)") as info:
        onnx_to_torch(save(model, tmp_path / "odd.onnx"))
    assert "ONNX target" in info.value.hint


def test_cli_names_the_op_with_a_json_error_and_no_traceback(tmp_path, keys):
    path = save(unsupported_model(), tmp_path / "odd.onnx")
    calib, val = data(tmp_path, save(classifier("paddle"), tmp_path / "paddle.onnx"))
    result = runner.invoke(app, ["compile", str(path), "--target", "rpi5-tflite", "--input-shape", "1,3,32,32",
                                 "--calibration", str(calib), "--validation", str(val), "--key", keys["private"],
                                 "-o", str(tmp_path / "odd.ekb"), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code != 0 and "Hardmax" in doc["error"]["message"] and "odd_hardmax" in doc["error"]["message"]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_graph_that_fixes_its_batch_is_exported_at_batch_1(tmp_path):
    """``Reshape`` to ``[1, -1]`` in the ONNX graph: no dynamic batch, so export and calibration go one by one."""
    import torch

    from edgekit.build.backends.onnx_to_torch import onnx_to_torch
    from edgekit.build.backends.quantize_tflite import _export

    m = classifier("batch1")
    for i, v in enumerate([1, 3, 32, 32]):
        m.graph.input[0].type.tensor_type.shape.dim[i].dim_value = v
    module = onnx_to_torch(save(m, tmp_path / "batch1.onnx"))
    x = torch.from_numpy(inputs(8, 3))
    graph, strict, batches = _export(module, [x[:4], x[4:]], x)
    assert strict is True and len(batches) == 8 and all(len(b) == 1 for b in batches)
    ref = run(tmp_path / "batch1.onnx", x.numpy()[:1])
    np.testing.assert_allclose(graph(x[:1]).detach().numpy(), ref, rtol=1e-4, atol=1e-4)


class _Head(__import__("torch").nn.Module):
    """A conv followed by the shape op an exporter writes with constant shapes or axes."""

    def __init__(self, kind: str):
        import torch

        super().__init__()
        self.kind, self.conv = kind, torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "reshape":
            return y.reshape(1, -1)
        if self.kind == "slice":
            return y[:, 1:3, 2:-2, ::2]
        return y.mean((2, 3), keepdim=True).squeeze(-1).unsqueeze(1)  # Squeeze/Unsqueeze with axes inputs


@pytest.mark.parametrize("kind", ["reshape", "slice", "squeeze"])
def test_constant_shape_ops_pass_strict_export_and_match_onnx(tmp_path, kind):
    """onnx2torch branches on shape/axes buffers (torch.export rejects that); they are written in as constants."""
    import onnxruntime as ort
    import torch

    from edgekit.build.backends.onnx_to_torch import onnx_to_torch

    x = torch.from_numpy(inputs(1, 5)[:, :, :16, :16].copy())
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(_Head(kind).eval(), (x,), str(path), input_names=["x"], opset_version=17, dynamo=False)
    module = onnx_to_torch(path)
    graph = torch.export.export(module, (x,), strict=True).module()
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(graph(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_a_pt2e_graph_the_converter_refuses_is_quantized_by_ai_edge_quantizer_instead(tmp_path, monkeypatch):
    """litert-torch refuses some PT2E INT8 graphs in its passes (on densenet121: "'tfl.concatenation' op
    quantization parameters violate the same scale constraint"); the float model still converts, and
    ai-edge-quantizer makes the INT8 .tflite from it, with the reason recorded, instead of a traceback."""
    import litert_torch
    import torch

    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.quantize_tflite import TFLiteCompiler
    from edgekit.config import QuantizeSettings
    from edgekit.data import digits
    from edgekit.models.digits_cnn import build

    torch.manual_seed(0)
    model = build(width=8).eval()
    real = litert_torch.convert

    def convert(module, args, *rest, quant_config=None, **kwargs):
        if quant_config is not None:  # the PT2E INT8 conversion, as litert-torch fails it on a DenseNet
            raise ValueError("Failed to run converter passes: 'tfl.concatenation' op quantization parameters "
                             "violate the same scale constraint")
        return real(module, args, *rest, **kwargs)

    monkeypatch.setattr(litert_torch, "convert", convert)
    src = SourceModel(tmp_path / "unused.onnx", torch=model, input_shape=[1, 1, 8, 8])
    art = TFLiteCompiler().quantize(src, digits.calibration(32), QuantizeSettings(calibration_count=32), tmp_path)
    assert art.details["pt2e_failed"].startswith("ValueError: Failed to run converter passes")
    assert art.precision == "int8" and (art.directory / art.main).stat().st_size > 0
    ops = art.details["int8_ops"]
    assert ops["int8"] > 0 and ops["int8"] >= ops["float"], ops


def test_a_model_the_converter_cannot_lower_is_an_import_error_with_a_way_out(tmp_path, monkeypatch):
    """litert-torch's JAX lowering refuses some converted graphs (a VGG's pooling from onnx2torch) with a
    ConcretizationTypeError; the user gets what failed and which targets take the model instead."""
    import litert_torch

    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.quantize_tflite import TFLiteCompiler
    from edgekit.models.digits_cnn import build

    class ConcretizationTypeError(Exception):
        pass

    def convert(*args, **kwargs):
        raise ConcretizationTypeError("Abstract tracer value encountered where concrete value is expected")

    monkeypatch.setattr(litert_torch, "convert", convert)
    src = SourceModel(tmp_path / "model.onnx", torch=build(width=8).eval(), input_shape=[1, 1, 8, 8])
    with pytest.raises(ModelImportError, match="could not convert the torch module to TFLite: "
                                               "ConcretizationTypeError: Abstract tracer") as err:
        TFLiteCompiler().fp32(src, tmp_path)
    assert "x86-openvino-cpu" in err.value.hint
    assert isinstance(err.value.__cause__, ConcretizationTypeError)


def test_ai_edge_quantizer_refusing_to_keep_ops_in_float_ends_the_search_not_the_build(tmp_path, monkeypatch):
    """The zoo found it (wide_resnet50_2): ai-edge-quantizer raises ValueError for some ops kept in float. The
    recovery keeps what it tried and lets the gate judge, with the reason in the attempt; no bare traceback."""
    from types import SimpleNamespace

    from edgekit.build.backends import quantize_tflite as qt
    from edgekit.build.gates import Attempt, GateResult

    class Aeq:
        x = np.zeros((4, 3, 8, 8), np.float32)

        def rank(self, scratch, samples):
            raise ValueError("Failed to get quantization parameters for tensor: conv. Error: input operand has more "
                             "dimensions than allowed by the axis remapping")

    art = SimpleNamespace(details={"int8_ops": {"int8": 1, "float": 0}})
    monkeypatch.setattr(qt.TFLiteCompiler, "_aeq", lambda self, src, calib, settings, workdir: (Aeq(), art))
    failed = [GateResult("fidelity.cosine", "failed", 0.93, 0.99)]  # the full-INT8 recipe misses the gate
    goal = SimpleNamespace(evaluate=lambda a, strategy, details: Attempt(strategy, a, failed, details=dict(details)))
    settings = SimpleNamespace(max_excluded_nodes=8, calibration_count=4)
    attempts = qt.TFLiteCompiler().recover(None, Aeq.x, settings, tmp_path, goal, None)
    assert [a.strategy for a in attempts] == ["ai_edge_quantizer"] and not attempts[0].passed
    assert "axis remapping" in attempts[0].details["mixed_precision_failed"]


def test_ai_edge_quantizer_failing_on_the_whole_model_leaves_ptq_to_the_gate(tmp_path, monkeypatch):
    """The zoo again (wide_resnet50_2 after the opset-20 converters): the whole-model recipe itself raised the
    'axis remapping' ValueError. Nothing else to try: no attempt is added, the reason is on the PTQ artifact."""
    from types import SimpleNamespace

    from edgekit.build.backends import quantize_tflite as qt

    def aeq(self, src, calib, settings, workdir):
        raise ValueError("Failed to get quantization parameters for tensor: conv. Error: input operand has more "
                         "dimensions than allowed by the axis remapping")

    monkeypatch.setattr(qt.TFLiteCompiler, "_aeq", aeq)
    ptq = SimpleNamespace(details={"int8_ops": {"int8": 1, "float": 0}})
    settings = SimpleNamespace(max_excluded_nodes=8, calibration_count=4)
    attempts = qt.TFLiteCompiler().recover(None, np.zeros((4, 3, 8, 8), np.float32), settings, tmp_path,
                                           SimpleNamespace(evaluate=None), ptq)
    assert attempts == []
    assert ptq.details["ai_edge_quantizer_failed"].startswith("ValueError: ") and \
        "axis remapping" in ptq.details["ai_edge_quantizer_failed"]


def test_a_float_tflite_that_differs_from_its_module_is_converted_again_then_refused(tmp_path, monkeypatch):
    """litert-torch 0.10 converts some onnx2torch modules differently from run to run (a torchscript-exported
    ViT: right in 1 of 5). fp32() checks the .tflite against the module on a probe input: a wrong conversion is
    redone, and refused when every try is wrong; a right one on the second try ships, counted."""
    import litert_torch
    import torch

    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.quantize_tflite import CONVERSION_TRIES, TFLiteCompiler, _run
    from edgekit.models.digits_cnn import build

    torch.manual_seed(0)
    model, other = build(width=8).eval(), build(width=8).eval()  # other: the same graph, other weights
    real_convert, calls = litert_torch.convert, []

    def flaky(wrong_tries: int):
        def convert(module, args, **kwargs):
            calls.append(module)
            return real_convert(other if len(calls) <= wrong_tries else module, args, **kwargs)
        return convert

    src = SourceModel(tmp_path / "model.onnx", torch=model, input_shape=[1, 1, 8, 8])
    monkeypatch.setattr(litert_torch, "convert", flaky(CONVERSION_TRIES))
    with pytest.raises(ModelImportError, match=f"does not compute what the torch module computes: largest "
                                               f"difference .* in {CONVERSION_TRIES} conversions"):
        TFLiteCompiler().fp32(src, tmp_path / "a")
    assert len(calls) == CONVERSION_TRIES

    calls.clear()
    monkeypatch.setattr(litert_torch, "convert", flaky(1))
    comp = TFLiteCompiler()
    art = comp.fp32(src, tmp_path / "b")
    assert len(calls) == 2 and art.details["conversion_tries"] == 2
    assert comp.fp32(src, tmp_path / "b") is art and len(calls) == 2  # ai-edge-quantizer's recipes reuse it
    x = np.random.default_rng(1).normal(size=(4, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_run(art.directory / art.main, x), model(torch.from_numpy(x)).numpy(), atol=1e-4)

    calls.clear()
    monkeypatch.setattr(litert_torch, "convert", real_convert)
    assert "conversion_tries" not in TFLiteCompiler().fp32(src, tmp_path / "c").details  # one right conversion


def test_export_checks_a_converted_fp32_artifact_against_onnx_runtime(tmp_path):
    """The INT8 gates compare with the FP32 artifact; a converter that changed the model would pass them. The
    export stage runs the source ONNX through ONNX Runtime on the probe inputs and refuses a non-ONNX artifact
    whose outputs disagree; an ONNX artifact is the source itself and is not re-checked."""
    from types import SimpleNamespace

    import onnxruntime as ort
    import torch

    from edgekit.build.stages.export import MIN_CONVERSION_COSINE, check_conversion
    from edgekit.models.digits_cnn import build

    torch.manual_seed(0)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(build(width=8).eval(), torch.zeros(1, 1, 8, 8), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    probe = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": probe})[0]
    tflite, onnx_art = SimpleNamespace(main="model.tflite"), SimpleNamespace(main="model.onnx")

    ok = check_conversion(path, tflite, probe, ref + 1e-6)
    assert ok["cosine_min"] > MIN_CONVERSION_COSINE and ok["samples"] == 6 and ok["max_abs_diff"] < 1e-5
    wrong = ref + np.random.default_rng(1).normal(size=ref.shape).astype(np.float32) * np.abs(ref).max()
    with pytest.raises(ModelImportError, match="does not compute what cnn.onnx computes") as err:
        check_conversion(path, tflite, probe, wrong)
    assert "onnxruntime-cpu" in err.value.hint
    assert check_conversion(path, onnx_art, probe, wrong) is None
    assert check_conversion(path, tflite, None, ref) is None


@pytest.mark.parametrize("scope, readable", [
    # a torch module: each level <module>.<Class>_<attribute>; a fused Conv+BN+ReLU lists the Conv last
    ("edgekit.models.digits_cnn.DigitsCNN/torch.nn.modules.container.Sequential_features/"
     "torch.nn.modules.container.Sequential_1/torch.nn.modules.activation.ReLU_2;;edgekit.models.digits_cnn."
     "DigitsCNN/torch.nn.modules.container.Sequential_features/torch.nn.modules.container.Sequential_1/"
     "torch.nn.modules.conv.Conv2d_0;1;", "features.1.0 (Conv2d)"),
    ("edgekit.models.digits_cnn.DigitsCNN/torch.nn.modules.linear.Linear_classifier;", "classifier (Linear)"),
    # an onnx2torch module under non-strict export: the ONNX node's path follows the qualified level
    ("torch.export._trace._non_strict_export.<locals>._tuplify_outputs.<locals>._aot_export_non_strict.<locals>."
     "Wrapper/torch.nn.modules.activation.ReLU_features/features/0/features/0/2/Relu;;torch.export._trace."
     "_non_strict_export.<locals>._tuplify_outputs.<locals>._aot_export_non_strict.<locals>.Wrapper/"
     "torch.nn.modules.conv.Conv2d_features/features/0/features/0/0/Conv;;",
     "features.features.0.features.0.0.Conv (Conv2d)"),
    ("serving_default_output_0", "serving_default_output_0"),  # another form: as it is
])
def test_an_op_kept_in_float_is_named_by_its_module_path(scope, readable):
    """The gate's message lists what mixed precision kept in float; litert-torch's scopes run to 500 characters of
    qualified names (the zoo's messages were cut off before the first layer's name)."""
    from edgekit.build.backends.quantize_tflite import readable_scope, readable_scopes
    from edgekit.build.gates import Attempt
    from edgekit.build.stages.quantize import describe_attempts

    assert readable_scope(scope) == readable
    assert readable_scopes([scope]) == [readable]
    attempt = Attempt("mixed_precision", None, [], details={"excluded_nodes": [scope], "excluded_layers": [readable]})
    assert describe_attempts([attempt]) == f"mixed_precision (kept in float: {readable})"


def test_ops_lowered_from_one_module_keep_the_number_that_tells_them_apart():
    from edgekit.build.backends.quantize_tflite import readable_scopes

    wrapper = ("torch.export._trace._non_strict_export.<locals>._tuplify_outputs.<locals>._aot_export_non_strict."
               "<locals>.Wrapper/torch.nn.modules.normalization.LayerNorm_encoder/layers/encoder_layer_0/ln_1/"
               "LayerNormalization")
    ln = "encoder.layers.encoder_layer_0.ln_1.LayerNormalization (LayerNorm)"
    assert readable_scopes([f"{wrapper};11", f"{wrapper};12", "m.M/torch.nn.modules.linear.Linear_head;"]) == [
        f"{ln} #11", f"{ln} #12", "head (Linear)"]


def test_ranking_ops_for_mixed_precision_leaves_no_candidate_models_on_disk(tmp_path):
    """Each op INT8 alone is a whole model; kept, a ViT-B/16's candidates filled the disk (ENOSPC mid-search)."""
    import torch

    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.quantize_tflite import TFLiteCompiler, _AeqRecipes
    from edgekit.models.digits_cnn import build

    torch.manual_seed(0)
    src = SourceModel(tmp_path / "model.onnx", torch=build(width=8).eval(), input_shape=[1, 1, 8, 8])
    fp32 = TFLiteCompiler().fp32(src, tmp_path / "work")
    x = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    aeq = _AeqRecipes(fp32.directory / fp32.main, x)
    ranking = aeq.rank(tmp_path / "scratch", x[:4])
    assert len(ranking) == len(aeq.layers()) >= 4
    assert [e.error for e in ranking] == sorted((e.error for e in ranking), reverse=True)
    assert not list((tmp_path / "scratch").rglob("*.tflite"))
