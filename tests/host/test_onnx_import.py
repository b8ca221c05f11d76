"""ONNX files from other exporters: −1/0/symbolic dims, a graph ORT's symbolic shape inference asserts on, opset 11.

The hostile models are built in code with onnx.helper (as paddle2onnx and tf2onnx write
them), compiled for the ONNX targets with ``--input-shape``, gated on labelled data, and the
report must say what the import changed and which tool fell back. Configurations that
cannot work are refused before any compile work, by the CLI with a JSON error and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import ConfigError, ExitCode, ModelImportError
from edgekit.models.onnx_normalize import (check_against_model, normalize_onnx, optimize_with_fallbacks,
                                           resolve_input_shape)

runner = CliRunner()
SHAPE = "1,3,32,32"


def classifier(kind: str, seed: int = 0):
    """A small conv classifier as another tool exports it.

    ``paddle``: input ``[-1, 3, '?', '?']``, a −1 value_info; ``concat``: batch ``unk__612``
    (tf2onnx) and a flatten by Shape → Gather → Unsqueeze → Concat(axis=−1) → Reshape, on which
    ORT's symbolic shape inference asserts; ``opset11``: the paddle model at opset 11;
    ``batch1``: a −1 batch that a Reshape to ``[1, -1]`` inside the graph contradicts.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
              "w2": rng.normal(0, 0.2, (16, 8, 3, 3)), "b2": rng.normal(0, 0.1, 16)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2")]
    ints: dict[str, np.ndarray] = {}
    if kind == "concat":
        nodes += [helper.make_node("AveragePool", ["r2"], ["p"], name="pool", kernel_shape=[4, 4], strides=[4, 4]),
                  helper.make_node("Shape", ["p"], ["s"], name="shape"),
                  helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
                  helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
                  helper.make_node("Concat", ["n1", "minus1"], ["newshape"], name="concat_shape", axis=-1),
                  helper.make_node("Reshape", ["p", "newshape"], ["flat"], name="reshape")]
        ints = {"zero": np.array(0, np.int64), "axes0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
        features, x_dims = 16 * 4 * 4, ["unk__612", 3, 32, 32]
    elif kind == "batch1":  # a −1 batch the graph itself fixes: Reshape to [1, -1]
        nodes += [helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
                  helper.make_node("Reshape", ["p", "one_row"], ["flat"], name="reshape_to_one_row")]
        ints = {"one_row": np.array([1, -1], np.int64)}
        features, x_dims = 16, [-1, 3, "?", "?"]
    else:
        nodes += [helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["flat"], name="flatten", axis=1)]
        features, x_dims = 16, [-1, 3, "?", "?"]
    arrays |= {"w3": rng.normal(0, 1.0, (features, 10)), "b3": np.zeros(10)}
    nodes.append(helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc"))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    inits += [numpy_helper.from_array(a, n) for n, a in ints.items()]
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 10])], inits,
        value_info=[helper.make_tensor_value_info("r1", TensorProto.FLOAT, [-1, 8, -1, -1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11 if kind == "opset11" else 13)],
                              producer_name="paddle2onnx")
    model.ir_version = 7
    return _centre(model)


def inputs(n: int, seed: int) -> np.ndarray:
    """Images with per-sample contrast and per-channel offsets, so the logits vary between samples."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, 32, 32)) * rng.uniform(0.3, 2, (n, 1, 1, 1))
            + rng.normal(0, 1.5, (n, 3, 1, 1))).astype(np.float32)


def run(model_path: Path, x: np.ndarray) -> np.ndarray:
    """The model's outputs, one sample at a time (the ``batch1`` model takes no more)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": s[None]})[0] for s in x])


def _centre(model):
    """The classifier with its last bias set to minus the mean logit on sample inputs: every class occurs."""
    import onnxruntime as ort
    from onnx import numpy_helper

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mean = np.concatenate([sess.run(None, {"x": x[None]})[0] for x in inputs(64, 99)]).mean(0)
    b3 = next(i for i in model.graph.initializer if i.name == "b3")
    b3.CopyFrom(numpy_helper.from_array((-mean).astype(np.float32), "b3"))
    return model


def save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def data(folder: Path, model_path: Path) -> tuple[Path, Path]:
    """20 calibration samples and 60 validation samples labelled by the FP32 model itself (so FP32 is
    100 % and the INT8 accuracy gate measures what quantization changed)."""
    x = inputs(80, 1)
    y = run(model_path, x).argmax(1)
    assert len(set(y[20:].tolist())) >= 3, "labels should not be one class"
    np.savez(folder / "calib.npz", x=x[:20])
    np.savez(folder / "val.npz", x=x[20:], y=y[20:])
    return folder / "calib.npz", folder / "val.npz"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_import")
    return {kind: save(classifier(kind), root / f"{kind}.onnx") for kind in ("paddle", "concat", "opset11", "batch1")}


# ----------------------------------------------------------------------------- the normalisation itself
def test_ort_symbolic_shape_inference_really_asserts_on_the_concat_model(models, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with pytest.raises(AssertionError):
        quant_pre_process(str(models["concat"]), str(tmp_path / "pre.onnx"))
    fallbacks = optimize_with_fallbacks(models["concat"], tmp_path / "pre.onnx")
    assert [f["step"] for f in fallbacks] == ["ort_quant_pre_process"]
    assert "AssertionError" in fallbacks[0]["error"] and "_infer_Concat" in fallbacks[0]["error"]


@pytest.mark.parametrize("kind, before, opset", [("paddle", [-1, 3, "?", "?"], 13),
                                                 ("concat", ["unk__612", 3, 32, 32], 13),
                                                 ("opset11", [-1, 3, "?", "?"], 11)])
def test_normalised_model_has_settled_dims_opset_13_and_runs(models, tmp_path, kind, before, opset):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "n.onnx"
    rep = normalize_onnx(models[kind], out, [1, 3, 32, 32])
    assert rep.input_shape_before == before and rep.input_shape_after == ["batch", 3, 32, 32]
    assert (rep.opset_before, rep.opset_after) == (opset, 13)
    assert any("opset 11 → 13" in s for s in rep.steps) == (opset == 11)
    m = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(models[kind]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)  # same function, any batch


def test_batch_the_graph_fixes_is_fixed_with_the_reason_recorded(models, tmp_path, signing_key):
    rep = normalize_onnx(models["batch1"], tmp_path / "n.onnx", [1, 3, 32, 32])
    assert rep.input_shape_after == [1, 3, 32, 32]
    assert rep.fallbacks[0]["step"] == "dynamic_batch" and "node 'fc' (Gemm)" in rep.fallbacks[0]["error"]
    result = compile_onnx(models["batch1"], "onnxruntime-cpu", tmp_path, signing_key)
    assert result.report["result"] == "ok" and result.report["accuracy"]["fp32"] == pytest.approx(100.0)
    assert result.report["steps"]["export"]["normalize"]["fallbacks"][0]["step"] == "dynamic_batch"


def test_weights_listed_as_inputs_are_not_inputs(tmp_path):
    """Old exporters (IR < 4, the ONNX Model Zoo's opset-9 files) list every weight as a graph input."""
    import onnx
    from onnx import helper

    model = classifier("opset11")
    model.graph.input.extend([helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                              for i in model.graph.initializer])
    rep = normalize_onnx(save(model, tmp_path / "m.onnx"), tmp_path / "n.onnx", [1, 3, 32, 32])
    assert any("weights no longer listed as inputs" in s for s in rep.steps)
    assert [i.name for i in onnx.load(str(tmp_path / "n.onnx")).graph.input] == ["x"]


def test_fixed_batch_when_the_build_asks_for_one(models, tmp_path):
    rep = normalize_onnx(models["paddle"], tmp_path / "n.onnx", [4, 3, 32, 32], dynamic_batch=False)
    assert rep.input_shape_after == [4, 3, 32, 32]


@pytest.mark.parametrize("dims, requested, message", [
    ([1, 3, 224, 224], [1, 3, 32, 32], r"contradicts .*\[1, 3, 224, 224\].*fixed at 224"),
    ([-1, 3, "?", "?"], [1, 3, 32], "has 3 dimensions"),
    ([-1, 3, "?", "?"], None, r"non-fixed dimension\(s\) \[2, 3\]"),
    (["N", 3, 0, 0], None, r"non-fixed dimension\(s\) \[2, 3\]"),
])
def test_shapes_that_cannot_work_are_refused(dims, requested, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_input_shape(dims, requested, True, "m.onnx")
    if requested is not None and len(requested) == len(dims):
        assert "[1, 3, 32, 32]" in str(info.value)  # both shapes named
    if requested is None:
        assert "--input-shape" in info.value.hint


def test_contradicting_input_shape_names_both_shapes(tmp_path):
    model = classifier("paddle")
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, [1, 3, 64, 64]):
        d.Clear()
        d.dim_value = v
    with pytest.raises(ConfigError, match=r"--input-shape \[1, 3, 32, 32\] contradicts m.onnx input \[1, 3, 64, 64\]"):
        normalize_onnx(save(model, tmp_path / "m.onnx"), tmp_path / "n.onnx", [1, 3, 32, 32])


def test_broken_node_is_named(tmp_path):
    from onnx import helper

    model = classifier("paddle")
    model.graph.node.append(helper.make_node("NoSuchOp", ["logits"], ["z"], name="mystery"))
    model.graph.output[0].name = "z"
    with pytest.raises(ModelImportError, match="NoSuchOp") as info:
        normalize_onnx(save(model, tmp_path / "m.onnx"), tmp_path / "n.onnx", [1, 3, 32, 32])
    assert "mystery" in str(info.value) and info.value.hint


def test_preprocess_size_that_does_not_fit_the_model_is_refused():
    from edgekit.config.build import PreprocessSpec

    class Cfg:
        preprocess = PreprocessSpec(size=[224, 224], color="rgb")

    with pytest.raises(ConfigError, match=r"preprocess.size \[224, 224\].*\['batch', 3, 32, 32\]") as info:
        check_against_model(Cfg, ["batch", 3, 32, 32])
    assert "[32, 32]" in info.value.hint
    Cfg.preprocess = PreprocessSpec(size=[32, 32], color="gray")
    with pytest.raises(ConfigError, match="takes 3"):
        check_against_model(Cfg, ["batch", 3, 32, 32])
    Cfg.preprocess = PreprocessSpec(size=[32, 32], color="rgb")
    check_against_model(Cfg, ["batch", 3, 32, 32])


# ----------------------------------------------------------------------------- whole builds
def compile_onnx(model: Path, target: str, tmp_path: Path, signing_key, **extra):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build

    calib, val = data(tmp_path, model)
    overrides = {"model.source": str(model), "model.name": model.stem, "model.input_shape": [1, 3, 32, 32],
                 "target": target, "calibration.source": str(calib), "validation.source": str(val),
                 "accuracy.max_accuracy_drop": 10.0, "output": tmp_path / f"{model.stem}-{target}.ekb",
                 "quantize.calibration_count": 20,
                 # a 32×32 model runs in tens of µs, where INT8 vs FP32 is overhead, not what this test is about
                 "latency": {"on_slower": "keep_int8"}}
    overrides.update(extra)
    return compile_model(load_build(None, overrides), signing_key)


@pytest.mark.parametrize("kind, target", [
    ("paddle", "onnxruntime-cpu"), ("paddle", "x86-openvino-cpu"), ("paddle", "jetson-orin-nano"),
    ("concat", "onnxruntime-cpu"), ("concat", "x86-openvino-cpu"), ("concat", "jetson-orin-nano"),
    ("opset11", "onnxruntime-cpu"), ("opset11", "x86-openvino-cpu"), ("opset11", "jetson-orin-nano"),
])
def test_hostile_onnx_compiles_gated_and_reports_the_normalisation(models, tmp_path, signing_key, keys, kind,
                                                                    target):
    import edgekit_runtime

    result = compile_onnx(models[kind], target, tmp_path, signing_key)
    rep = result.report
    assert rep["result"] == "ok" and rep["precision"] == "int8"
    assert rep["accuracy"]["checked"] and rep["accuracy"]["fp32"] == pytest.approx(100.0)
    assert {g["name"]: g["status"] for g in rep["gates"]}["accuracy"] == "passed"
    norm = rep["steps"]["export"]["normalize"]
    assert norm["input_shape_after"] == ["batch", 3, 32, 32]
    assert (norm["opset_before"] == 11) == (kind == "opset11") and norm["opset_after"] == 13
    assert [f["step"] for f in norm["fallbacks"]] == (["ort_quant_pre_process"] if kind == "concat" else [])
    assert json.loads(result.report_path.read_text())["steps"]["export"]["normalize"] == norm
    # the bundle runs on the device runtime (ORT in place of TensorRT on this host), several samples at once
    x = inputs(16, 7)
    ref = run(models[kind], x)
    with edgekit_runtime.load(result.bundle, keyring=keys["public"]) as model:
        assert model.manifest.inputs[0].shape == ["batch", 3, 32, 32]
        out = model.run(x)[model.outputs[0].name]
    assert out.shape == (16, 10) and (out.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_opset11_int8_graph_uses_per_channel_dq_at_opset_13(models, tmp_path, signing_key):
    import onnx

    import edgekit_runtime
    from edgekit_runtime.keyring import Keyring, key_id_of

    result = compile_onnx(models["opset11"], "onnxruntime-cpu", tmp_path, signing_key)
    ring = Keyring({key_id_of(signing_key.public_key()): signing_key.public_key()})
    bundle = edgekit_runtime.open_bundle(result.bundle, ring)
    assert bundle.manifest.backend.precision == "int8"
    m = onnx.load_from_string(bundle.members[bundle.manifest.backend.artifact])  # the graph the device runs
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert any(a.name == "axis" for n in m.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)


# ----------------------------------------------------------------------------- the CLI
def cli(*args) -> tuple[int, dict, str]:
    result = runner.invoke(app, [*map(str, args), "--json"])
    return result.exit_code, json.loads(result.stdout), result.stderr


def test_cli_refuses_what_cannot_work_with_a_json_error_and_no_traceback(models, tmp_path, keys):
    calib, val = data(tmp_path, models["paddle"])
    common = ["--target", "onnxruntime-cpu", "--calibration", calib, "--validation", val, "--key", keys["private"],
              "-o", tmp_path / "m.ekb"]
    code, doc, err = cli("compile", models["paddle"], *common)  # symbolic height/width and no --input-shape
    assert code == ExitCode.USAGE and "Traceback" not in err
    assert "--input-shape" in (doc["error"]["hint"] or ""), doc  # the import asks for the flag, naming the dims
    fixed = classifier("paddle")
    for d, v in zip(fixed.graph.input[0].type.tensor_type.shape.dim, [1, 3, 64, 64]):
        d.Clear()
        d.dim_value = v
    code, doc, err = cli("compile", save(fixed, tmp_path / "fixed.onnx"), "--input-shape", SHAPE, *common)
    assert code == ExitCode.USAGE and "Traceback" not in err
    assert doc["error"]["type"] == "ConfigError"
    assert "[1, 3, 32, 32]" in doc["error"]["message"] and "[1, 3, 64, 64]" in doc["error"]["message"]
    assert "1,3,64,64" in doc["error"]["hint"]
    assert not (tmp_path / "m.ekb").exists()


def test_an_onnx_file_with_every_dim_fixed_needs_no_input_shape(models, tmp_path, keys):
    fixed = classifier("paddle")
    for d, v in zip(fixed.graph.input[0].type.tensor_type.shape.dim, [1, 3, 32, 32]):
        d.Clear()
        d.dim_value = v
    path = save(fixed, tmp_path / "fixed.onnx")
    calib, val = data(tmp_path, path)
    code, doc, err = cli("compile", path, "--target", "onnxruntime-cpu", "--calibration", calib, "--validation", val,
                         "--max-accuracy-drop", "10", "--key", keys["private"], "-o", tmp_path / "m.ekb")
    assert code == ExitCode.OK, (doc, err)
    assert doc["steps"]["export"]["normalize"]["input_shape_after"] == [1, 3, 32, 32]
    assert (tmp_path / "m.ekb").is_file()


def test_a_torch_source_still_needs_its_input_shape():
    from edgekit.config import load_build

    with pytest.raises(ConfigError, match="model.input_shape is required for the torch source"):
        load_build(None, {"model.source": "edgekit.train.models:from_checkpoint", "model.name": "m",
                          "target": "onnxruntime-cpu"})


# ----------------------------------------------------------------------------- checks the data stage can run first
def build_cfg(model: Path, **overrides):
    from edgekit.config import load_build

    base = {"model.source": str(model), "model.name": "m", "model.input_shape": [1, 3, 32, 32],
            "target": "onnxruntime-cpu", "calibration.source": "calib.npz", "quantize.enabled": False,
            "accuracy": {"max_accuracy_drop": None}}
    base.update(overrides)
    return load_build(None, base)


def test_model_input_is_known_before_any_work(models, tmp_path):
    from edgekit.models.onnx_normalize import expected_input_shape

    assert expected_input_shape(build_cfg(models["paddle"])) == ["batch", 3, 32, 32]
    with pytest.raises(ConfigError, match=r"\[2, 4, 32, 32\] contradicts .*\[-1, 3, '\?', '\?'\]"):
        expected_input_shape(build_cfg(models["paddle"], **{"model.input_shape": [2, 4, 32, 32]},
                                       **{"model.dynamic_batch": False}))
    cfg = build_cfg(models["paddle"], preprocess={"size": [224, 224], "color": "rgb"})
    with pytest.raises(ConfigError, match=r"preprocess.size \[224, 224\]"):
        check_against_model(cfg, expected_input_shape(cfg))


def test_missing_data_path_is_named(models, tmp_path):
    from edgekit.errors import CalibrationError
    from edgekit.models.onnx_normalize import check_data_sources

    cfg = build_cfg(models["paddle"], **{"calibration.source": str(tmp_path / "images"),
                                         "validation.source": "edgekit.data.digits:validation"})
    with pytest.raises(CalibrationError, match=r"calibration source .*images does not exist"):
        check_data_sources(cfg)
    (tmp_path / "images").mkdir()
    check_data_sources(cfg)  # a folder that exists, and a module:factory, pass


def test_one_corrupt_image_in_a_folder_is_named(tmp_path):
    import cv2

    from edgekit.config.build import DataSource
    from edgekit.data.sources import load_data
    from edgekit_runtime.contract.errors import InputError

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"ok{i}.png"), np.full((40, 40, 3), 60 * i, np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        load_data(DataSource(source=str(folder)), {"type": "image", "size": [32, 32], "color": "rgb"})


def test_what_ort_symbolic_inference_dumps_into_the_working_directory_is_removed(tmp_path, monkeypatch):
    """ORT saves sym_shape_infer_temp.onnx (+ an external-data file) into the cwd when it cannot infer every
    shape; a user's project folder must not collect them."""
    import onnx

    from edgekit.models.onnx_normalize import _no_ort_dump

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.onnx").write_bytes(b"the user's own file")
    with _no_ort_dump():
        model = onnx.load(str(save(classifier("paddle"), tmp_path / "m.onnx")))
        onnx.save_model(model, "sym_shape_infer_temp.onnx", save_as_external_data=True, size_threshold=0)
        assert len(list(tmp_path.iterdir())) == 4  # mine, m.onnx, the dump and its data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "mine.onnx"]
