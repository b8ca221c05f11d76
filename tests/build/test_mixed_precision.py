"""Mixed precision by sensitivity: on a digits CNN with two outlier activations, plain INT8 breaks the budget,
the ranking names the layers next to the outliers first, and the fewest of them are kept in float."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
OUTLIER_SCALE = 100.0
# onnxruntime-cpu, the TensorRT Q/DQ graph (measured through ONNX Runtime's CPU EP here), OpenVINO
TARGETS = ("onnxruntime-cpu", "jetson-orin-nano", "x86-openvino-cpu")


def inject_outliers(state: dict, scale: float = OUTLIER_SCALE) -> dict:
    """The digits CNN's state with outlier activations, same function (``digits_cnn.with_outliers``)."""
    from edgekit.models.digits_cnn import with_outliers

    return with_outliers(state, scale)


@pytest.fixture(scope="module")
def outlier_checkpoint(digits_checkpoint, tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("outliers") / "digits_outliers.pt"
    torch.save(inject_outliers(torch.load(digits_checkpoint, weights_only=True)), path)
    return path


def build(checkpoint: Path, target: str, out: Path, **quantize):
    from edgekit.config import load_build

    return load_build(REPO / "examples" / "digits.yaml", {
        "target": target, "model.checkpoint": checkpoint, "model.kwargs": {"width": 16}, "output": out,
        "keep_work": True, "calibration.source": str(REPO / "calibration/digits/calib.npz"),
        **({"quantize": quantize} if quantize else {})})


def culprits(onnx_path: Path, producers: bool = True) -> tuple[set[str], set[str]]:
    """(layers next to an outlier tensor, the other weighted layers), by position in the exported graph.

    ONNX Runtime quantizes a Conv's output as well as its inputs, so both the producer and the consumer
    of an outlier tensor are to blame; NNCF (OpenVINO) quantizes inputs only: the consumers."""
    import onnx

    nodes = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    head = [n.name for n in nodes if n.op_type != "Conv"]
    assert len(convs) == 4 and len(head) == 1, [n.name for n in nodes]
    # block 0 writes the first outlier (conv 0) and conv 1 reads it; block 4 is the fourth conv, the head reads it
    blamed = {convs[0], convs[1], convs[3], head[0]} if producers else {convs[1], head[0]}
    return blamed, set(convs) - blamed


def test_outliers_keep_the_function():
    """The fixture is fair: the outlier model computes what the trained one does (up to float rounding)."""
    import torch

    from edgekit.data import digits
    from edgekit.models.digits_cnn import build as factory

    torch.manual_seed(0)
    model = factory(width=16).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.from_numpy(digits.calibration(16))
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(inject_outliers(model.state_dict()))
        after = model(x)
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-3, atol=1e-4)


def _search_checks(report: dict, work: Path, producers: bool = True) -> dict:
    attempts = report["accuracy"]["attempts"]
    assert attempts[0]["strategy"] == "ptq" and not attempts[0]["passed"], "plain INT8 must break the budget"
    chosen = attempts[-1]
    assert chosen["strategy"] == "mixed_precision" and chosen["passed"], attempts
    assert report["result"] == "ok"
    # every quality gate of the shipped artifact passed, measured through the device engine
    assert {g["name"] for g in chosen["gates"]} >= {"accuracy", "fidelity.cosine"}
    assert all(g["status"] != "failed" for g in chosen["gates"])
    k = chosen["fewest_in_float"]
    assert k == chosen["k"] == len(chosen["excluded_nodes"]) >= 1
    search = {s["k"]: s for s in chosen["search"]}
    # fewest: the candidate with one layer fewer in float was built, judged, and failed
    assert search[k]["passed"]
    if k > 1:
        assert not search[k - 1]["passed"], search
    assert all(not s["passed"] for kk, s in search.items() if kk < k)
    blamed, innocent = culprits(work / "model_fp32.onnx", producers)
    ranking = chosen["ranking"]
    top = {r["layer"] for r in ranking[: len(blamed)]}
    assert top == blamed, ranking
    errors = {r["layer"]: r["error"] for r in ranking}
    assert max(errors[n] for n in innocent) < 0.2 * min(errors[n] for n in blamed), ranking
    assert set(chosen["excluded_nodes"]) <= blamed
    return chosen


@pytest.mark.parametrize("target", TARGETS[:2])
def test_onnx_backends_keep_the_fewest_layers_in_float(target, outlier_checkpoint, signing_key, tmp_path):
    import onnx

    from edgekit.build.pipeline import compile_model

    result = compile_model(build(outlier_checkpoint, target, tmp_path / "m.ekb"), signing_key)
    work = tmp_path / "m.work"
    chosen = _search_checks(result.report, work)
    assert result.bundle.exists()
    # the kept layers really compute in float: no DequantizeLinear feeds their weights
    tag = ("trt-int8" if target == "jetson-orin-nano" else "int8") + f"-x{chosen['k']}"
    graph = onnx.load(str(work / tag / "model.onnx")).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    weighted = {n.name: n for n in graph.node if n.op_type in ("Conv", "Gemm")}
    for name, node in weighted.items():
        assert (node.input[1] in dq_out) == (name not in chosen["excluded_nodes"]), name


def test_openvino_ignores_the_ranked_onnx_layers(outlier_checkpoint, signing_key, tmp_path):
    """The ONNX names reach NNCF's ignored scope as the IR's op names; NNCF's accuracy control is not needed."""
    from edgekit.build.pipeline import compile_model

    result = compile_model(build(outlier_checkpoint, "x86-openvino-cpu", tmp_path / "m.ekb"), signing_key)
    chosen = _search_checks(result.report, tmp_path / "m.work", producers=False)
    assert "unmapped" not in chosen and len(chosen["ignored"]) >= len(chosen["excluded_nodes"])
    for name in chosen["excluded_nodes"]:
        assert any(op == name or op.startswith(name + "/") for op in chosen["ignored"]), chosen["ignored"]
    assert all(a["strategy"] != "nncf_accuracy_control" for a in result.report["accuracy"]["attempts"])
    # the ignored layers read float weights straight from a constant; the others int8 weights scaled back
    import openvino as ov

    model = ov.Core().read_model(str(tmp_path / "m.work" / f"int8-x{chosen['k']}" / "model.xml"))
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            w = op.input_value(1).get_node()
            float_weights = w.get_type_name() == "Constant" and w.get_element_type() == ov.Type.f32
            assert float_weights == (op.get_friendly_name() in chosen["ignored"]), (op.get_friendly_name(), w)


def test_a_budget_nothing_meets_lists_every_candidate(outlier_checkpoint, signing_key, tmp_path):
    """max_excluded_nodes 1 cannot fix two outliers: the one candidate fails and the build is refused with it."""
    from edgekit.build.pipeline import compile_model
    from edgekit.errors import AccuracyBudgetError, GateError

    out = tmp_path / "m.ekb"
    with pytest.raises((AccuracyBudgetError, GateError), match="kept in float"):
        compile_model(build(outlier_checkpoint, "onnxruntime-cpu", out, max_excluded_nodes=1), signing_key)
    attempts = json.loads(out.with_suffix(".report.json").read_text())["accuracy"]["attempts"]
    assert [a["strategy"] for a in attempts] == ["ptq", "mixed_precision"]
    assert attempts[1]["k"] == 1 and not attempts[1]["passed"]
    assert len(attempts[1]["search"]) == 1
    assert attempts[1]["fewest_in_float"] is None and len(attempts[1]["ranking"]) >= 5
    assert not out.exists()


@pytest.mark.slow
def test_tflite_keeps_ranked_ops_float_through_the_recipe(outlier_checkpoint, signing_key, tmp_path):
    """TFLite ranks its own ops (by recipe scope: litert-torch ops carry no ONNX names) and keeps the fewest
    in float with ai-edge-quantizer's per-op no_quantize, after its full-INT8 recipe also misses the budget."""
    from edgekit.build.pipeline import compile_model

    result = compile_model(build(outlier_checkpoint, "rpi5-tflite", tmp_path / "m.ekb", max_excluded_nodes=8),
                           signing_key)
    attempts = result.report["accuracy"]["attempts"]
    assert [a["strategy"] for a in attempts[:2]] == ["ptq", "ai_edge_quantizer"]
    assert not attempts[0]["passed"] and not attempts[1]["passed"]
    chosen = attempts[-1]
    assert chosen["strategy"] == "mixed_precision" and chosen["passed"] and result.report["result"] == "ok"
    k = chosen["fewest_in_float"]
    search = {s["k"]: s for s in chosen["search"]}
    assert search[k]["passed"] and all(not s["passed"] for kk, s in search.items() if kk < k)
    # the scopes name the torch modules: the ops next to an outlier are the blocks 0, 1, 4 and the head/pool
    innocent = "Sequential_3/torch.nn.modules.conv"
    ranking = chosen["ranking"]
    assert innocent in ranking[-1]["layer"], [r["layer"][-60:] for r in ranking]
    assert all(innocent not in name for name in chosen["excluded_nodes"])
    # and the report and the gate's message name them by module path (features.1.0 (Conv2d)), not by scope
    from edgekit.build.backends.quantize_tflite import readable_scopes

    assert chosen["excluded_layers"] == readable_scopes(chosen["excluded_nodes"])
    assert all(len(n) < 60 and n.endswith(")") for n in chosen["excluded_layers"]), chosen["excluded_layers"]
    # the kept ops compute in float in the shipped model
    assert chosen["int8_ops"]["float"] >= k
