"""Transformer-safe INT8: attention is found in the graph, and where plain PTQ misses the fidelity gate the
backend's transformer recipe is tried and ships (NNCF model_type=TRANSFORMER on OpenVINO; weight layers only,
attention MatMuls/Softmax/LayerNorm in float on the Q/DQ backends; int16 activations with int8 weights on LiteRT),
judged through the device engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# onnxruntime-cpu, the TensorRT Q/DQ graph (measured through ONNX Runtime's CPU EP here), OpenVINO
TARGETS = ("x86-openvino-cpu", "onnxruntime-cpu", "jetson-orin-nano")


def tiny_vit():
    """A 2-block ViT (32×32 input, 16 tokens, width 64) with random weights and a timm-style head init.

    Measured: plain PTQ keeps 0.93 (ONNX Runtime) / 0.955 (OpenVINO) cosine to FP32 on normal-noise inputs,
    the transformer recipe 0.999 / 0.998; the profiles' gate is 0.99."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    torch.nn.init.trunc_normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits it: constant output
    return model.eval()


def export(model, path: Path, dynamo: bool = False, side: int = 32, channels: int = 3) -> Path:
    import torch

    torch.onnx.export(model, torch.zeros(1, channels, side, side), path, input_names=["input"],
                      output_names=["logits"], dynamic_axes=None if dynamo else {"input": {0: "b"}, "logits": {0: "b"}},
                      opset_version=17, dynamo=dynamo)
    return path


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory) -> Path:
    return export(tiny_vit(), tmp_path_factory.mktemp("vit") / "vit.onnx")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_attention_is_found_in_both_exporters_graphs(tmp_path, dynamo):
    from edgekit.build.backends.attention import find_attention

    att = find_attention(export(tiny_vit(), tmp_path / "vit.onnx", dynamo=dynamo))
    assert att and len(att.softmax) == 2  # one per block
    assert len(att.dynamic_matmuls) + att.unnamed_matmuls >= 4  # scores and context, per block
    assert att.normalizations >= 2


def test_a_cnn_has_no_attention_and_no_transformer_recipe(tmp_path):
    import torch

    from edgekit.build.backends.attention import find_attention
    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.quantize_onnxruntime import OnnxRuntimeCompiler
    from edgekit.build.backends.quantize_openvino import OpenVINOCompiler
    from edgekit.build.backends.quantize_tflite import TFLiteCompiler
    from edgekit.models.digits_cnn import build

    # a Softmax at the end of a CNN is not attention: its input is a Gemm with weights
    path = export(torch.nn.Sequential(build(width=8), torch.nn.Softmax(-1)).eval(), tmp_path / "cnn.onnx",
                  side=8, channels=1)
    assert not find_attention(path)
    src = SourceModel(path)
    assert OnnxRuntimeCompiler().recipes(src) == [] and OpenVINOCompiler().recipes(src) == []
    assert TFLiteCompiler().recipes(src) == []


def test_the_qdq_transformer_recipe_keeps_attention_in_float(vit_onnx, tmp_path):
    """What the Q/DQ recipe writes: weight layers quantized, attention's MatMuls, Softmax, LayerNorm not."""
    import onnx

    from edgekit.build.backends.attention import find_attention
    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.quantize_onnxruntime import OnnxRuntimeCompiler
    from edgekit.config import QuantizeSettings

    x = np.random.default_rng(0).normal(size=(32, 3, 32, 32)).astype(np.float32)
    comp = OnnxRuntimeCompiler(choose_by_speed=False)
    assert comp.recipes(SourceModel(vit_onnx)) == ["transformer"]
    art = comp.quantize(SourceModel(vit_onnx), x, QuantizeSettings(calibration_count=32), tmp_path,
                        recipe="transformer")
    graph = onnx.load(str(art.directory / art.main)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def dequantized(node) -> list[bool]:
        return [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input[:2]]

    float_mm = set(art.details["recipe_float_nodes"])
    assert float_mm and float_mm <= set(find_attention(vit_onnx).dynamic_matmuls) | float_mm
    weights = [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in float_mm]
    assert weights and all(any(dequantized(n)) for n in weights)  # every weight layer reads INT8
    for n in graph.node:
        if n.name in float_mm or n.op_type in ("Softmax", "LayerNormalization"):
            assert not any(dequantized(n)), n.name
    assert art.details["recipe_name"].endswith("_transformer")


@pytest.mark.parametrize("target", TARGETS)
def test_ptq_misses_the_gate_and_the_transformer_recipe_ships(vit_onnx, tmp_path, signing_key, target):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).normal(size=(96, 3, 32, 32)).astype(np.float32))
    cfg = load_build(None, {"model.source": str(vit_onnx), "model.name": "vit", "target": target, "output": tmp_path / "vit.ekb",
                            "calibration.source": str(calib),
                            # the subject is the INT8 artifact: at 32×32 INT8 and FP32 run at parity on x86
                            "latency.on_slower": "keep_int8"})
    report = compile_model(cfg, signing_key).report
    attempts = report["accuracy"]["attempts"]
    by = {a["strategy"]: a for a in attempts}
    assert [a["strategy"] for a in attempts][:2] == ["ptq", "ptq_transformer"]
    assert not by["ptq"]["passed"] and by["ptq"]["fidelity"]["cosine"] < 0.99
    assert by["ptq_transformer"]["passed"] and by["ptq_transformer"]["fidelity"]["cosine"] >= 0.99
    assert by["ptq_transformer"]["post_training_recipe"] == "transformer"
    assert report["precision"] == "int8" and report["fidelity"]["cosine"] >= 0.99
    if target == "x86-openvino-cpu":
        assert by["ptq_transformer"]["model_type"] == "TRANSFORMER"
    else:
        assert by["ptq_transformer"]["quantized_op_types"] == ["Conv", "Gemm", "MatMul"]
    # neither QAT (an ONNX file has no training run) nor the mixed-precision fallback was needed
    assert "mixed_precision" not in by and "qat" not in by
    saved = json.loads(Path(tmp_path / "vit.report.json").read_text())
    assert saved["accuracy"]["attempts"][1]["strategy"] == "ptq_transformer"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_litert_transformer_recipe_is_int16_activations_and_beats_int8(vit_onnx, tmp_path):
    """LiteRT's transformer recipe: ai-edge-quantizer with int16 activations and int8 weights, every op integer.
    On the torch module (measured: int8 0.971, int16 activations 0.993 cosine to the FP32 .tflite)."""
    from edgekit.build.backends import quantize_tflite as qt
    from edgekit.build.backends.base import SourceModel
    from edgekit.config import QuantizeSettings

    src = SourceModel(vit_onnx, torch=tiny_vit(), input_shape=[1, 3, 32, 32])
    comp = qt.TFLiteCompiler()
    assert comp.recipes(src) == ["transformer"]
    calib = np.random.default_rng(1).normal(size=(64, 3, 32, 32)).astype(np.float32)
    test = np.random.default_rng(2).normal(size=(16, 3, 32, 32)).astype(np.float32)
    settings = QuantizeSettings(calibration_count=64)
    a16 = comp.quantize(src, calib, settings, tmp_path, recipe="transformer")
    assert a16.details["activations"] == "int16" and a16.details["method"] == "ai-edge-quantizer static_wi8_ai16"
    assert a16.details["io"]["input"]["dtype"] == "int16" and a16.precision == "int8"
    share = a16.details["int8_ops"]
    assert share["float"] <= 0.1 * share["total"]
    fp32 = comp.fp32(src, tmp_path)
    ref = qt._run(fp32.directory / fp32.main, test)
    int8 = comp._aeq(src, calib, settings, tmp_path)[1]  # the same quantizer at 8-bit activations
    c16, c8 = (cosine(ref, qt._run(a.directory / a.main, test)) for a in (a16, int8))
    assert c16 > 0.985 and (1 - c16) < 0.5 * (1 - c8), (c16, c8)



def test_an_onnx_vit_converts_to_the_float_tflite_it_is_on_the_first_try_every_time(vit_onnx, tmp_path):
    """onnx2torch writes a torchscript-exported ViT's ``Gemm(transB=1)`` weights as transposed views, and
    litert-torch 0.10 caches inlined constants by the storage address of their contiguous copies: temporaries,
    so a later block could get an earlier one's same-shaped weights (wrong logits in most conversions, which
    ones depending on the allocator). ``_module`` makes every constant contiguous first; then each conversion
    computes what ONNX Runtime computes, with no second try."""
    import onnxruntime as ort
    import torch

    from edgekit.build.backends import quantize_tflite as qt
    from edgekit.build.backends.base import SourceModel
    from edgekit.build.backends.onnx_to_torch import onnx_to_torch

    raw = onnx_to_torch(vit_onnx)
    views = [n for n, p in raw.named_parameters() if not p.is_contiguous()]
    assert len(views) >= 4  # the attention and MLP projections of both blocks: what the cache mixed up
    before = {n: p.detach().clone() for n, p in raw.named_parameters()}
    assert qt.contiguous_constants(raw) == len(views)
    assert all(p.is_contiguous() and torch.equal(p, before[n]) for n, p in raw.named_parameters())

    src = SourceModel(vit_onnx, input_shape=[1, 3, 32, 32])
    x = np.random.default_rng(3).normal(size=(1, 3, 32, 32)).astype(np.float32)
    want = ort.InferenceSession(str(vit_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    for i in range(3):
        art = qt.TFLiteCompiler().fp32(src, tmp_path / str(i))
        assert "conversion_tries" not in art.details
        np.testing.assert_allclose(qt._run(art.directory / art.main, x), want, atol=1e-4)


def test_int8_far_slower_than_fp32_on_a_host_that_is_not_the_device_is_warned_about():
    """The latency gate cannot judge a phone's INT8 on an x86 host, but an int16-activation .tflite running 18x
    slower than FP32 there (ViT-B/32 in the zoo: 618 ms vs 34 ms) is a difference of kernels the user must hear of."""
    from edgekit.build.stages.evaluate import UNGATED_SLOWDOWN_WARNING, slow_ungated_warning

    ungated = {"gated": False, "not_gated_reason": "measured on this x86_64 host; the device is arm64",
               "int8": {"p50_ms": 617.8}, "fp32": {"p50_ms": 33.5}, "speedup": 33.5 / 617.8}
    warning = slow_ungated_warning(ungated, {"activations": "int16"})
    assert warning.startswith("INT8 ran 18.4x slower than FP32 on this host (its activations are int16")
    assert "edgekit bench" in warning and "quantize.enabled: false" in warning
    assert "activations" not in slow_ungated_warning(ungated, {"method": "litert-torch PT2E static"})
    assert slow_ungated_warning({**ungated, "gated": True, "not_gated_reason": None}, {}) is None  # the gate judges
    near = 1 / (UNGATED_SLOWDOWN_WARNING * 0.9)
    assert slow_ungated_warning({**ungated, "speedup": near}, {"activations": "int16"}) is None
    assert slow_ungated_warning({k: v for k, v in ungated.items() if k != "int8"} | {"speedup": None}, {}) is None
