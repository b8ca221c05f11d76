"""ONNX models with several inputs and outputs: calibration given per input name, every output in the bundle.

The model is what a user brings from another tool: an image input with a −1 batch and symbolic spatial dims
(paddle2onnx's convention) plus a vector of side data, and two outputs (class scores and the fused
features). Its calibration and validation data are ``.npz`` files with one array per input name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import CalibrationError

INPUTS = ("image", "meta")


def two_input_model(path: Path, seed: int = 0) -> Path:
    """image [-1, 3, h, w] → conv → relu → GAP (8); meta [-1, 4] → Gemm (8); sum → relu → Gemm → logits
    (5); outputs: ``logits`` and ``features`` (the fused 8 values)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
              "wm": rng.normal(0, 0.5, (4, 8)), "bm": rng.normal(0, 0.1, 8),
              "wo": rng.normal(0, 0.5, (8, 5)), "bo": rng.normal(0, 0.1, 5), "flat": np.array([0, -1])}
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="gap"),
             helper.make_node("Reshape", ["p", "flat"], ["f_img"], name="flatten"),
             helper.make_node("Gemm", ["meta", "wm", "bm"], ["f_meta"], name="meta_fc"),
             helper.make_node("Add", ["f_img", "f_meta"], ["fused"], name="fuse"),
             helper.make_node("Relu", ["fused"], ["features"], name="relu2"),
             helper.make_node("Gemm", ["features", "wo", "bo"], ["logits"], name="head")]
    inits = [numpy_helper.from_array(a.astype(np.int64 if k == "flat" else np.float32), k) for k, a in arrays.items()]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [-1, 3, "h", "w"]),
         helper.make_tensor_value_info("meta", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 5]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, [-1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def samples(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(0, 1, (n, 3, 16, 16)).astype(np.float32),
            "meta": rng.normal(0, 1, (n, 4)).astype(np.float32)}


def reference(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip(["logits", "features"], sess.run(["logits", "features"], feeds)))


def npz(path: Path, model: Path, n: int, seed: int, labels: bool = True, **drop) -> Path:
    feeds = samples(n, seed)
    arrays = {k: v for k, v in feeds.items() if k not in drop}
    if labels:  # the FP32 model's own classes: FP32 scores 100 %, INT8 is held to the budget
        arrays["y"] = reference(model, feeds)["logits"].argmax(1)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return two_input_model(tmp_path_factory.mktemp("multi") / "two_inputs.onnx")


def compile_two_inputs(model: Path, target: str, tmp_path: Path, signing_key, calib: Path | None = None,
                       **extra):
    from edgekit.build.pipeline import compile_model
    from edgekit.config import load_build

    overrides = {"model.source": str(model), "model.name": "two_inputs", "model.input_shape": [1, 3, 16, 16],
                 "target": target, "preprocess": None,
                 "calibration.source": str(calib or npz(tmp_path / "calib.npz", model, 96, 1)),
                 "validation.source": str(npz(tmp_path / "val.npz", model, 64, 2)),
                 "accuracy.max_accuracy_drop": 10.0, "output": tmp_path / f"two_inputs-{target}.ekb",
                 "quantize.calibration_count": 64, "latency": {"on_slower": "keep_int8"}}
    overrides.update(extra)
    return compile_model(load_build(None, overrides), signing_key)


@pytest.mark.parametrize("target", ["onnxruntime-cpu", "x86-openvino-cpu", "jetson-orin-nano"])
def test_two_inputs_two_outputs_compile_int8_and_run_on_the_device_runtime(model, tmp_path, signing_key, keys,
                                                                            target):
    import edgekit_runtime

    result = compile_two_inputs(model, target, tmp_path, signing_key)
    rep = result.report
    assert rep["result"] == "ok" and rep["precision"] == "int8"
    assert {g["name"]: g["status"] for g in rep["gates"]}["accuracy"] == "passed"
    fid = rep["fidelity"]  # held to every output: the gated cosine is the worst one's
    assert set(fid["outputs"]) == {"logits", "features"} and fid["cosine"] == min(fid["outputs"].values())
    feeds = samples(24, 7)
    ref = reference(model, feeds)
    with edgekit_runtime.load(result.bundle, keyring=keys["public"]) as m:
        assert [(t.name, t.shape) for t in m.manifest.inputs] == [("image", ["batch", 3, 16, 16]),
                                                                  ("meta", ["batch", 4])]
        assert [t.name for t in m.manifest.outputs] == ["logits", "features"]
        assert set(m.manifest.input_stats) == set(INPUTS)  # drift references for both inputs
        assert m.health_check()["ok"]  # the stored sample holds both inputs
        out = m.run(feeds)
    assert out["logits"].shape == (24, 5) and out["features"].shape == (24, 8)
    assert (out["logits"].argmax(1) == ref["logits"].argmax(1)).mean() >= 0.8
    cos = (out["features"] * ref["features"]).sum(1) / (
        np.linalg.norm(out["features"], axis=1) * np.linalg.norm(ref["features"], axis=1) + 1e-9)
    assert cos.mean() > 0.95


def test_calibration_must_name_every_input(model, tmp_path, signing_key):
    with pytest.raises(CalibrationError, match=r"missing: \['meta'\]") as err:
        compile_two_inputs(model, "onnxruntime-cpu", tmp_path, signing_key,
                           calib=npz(tmp_path / "partial.npz", model, 32, 1, labels=False, meta=True))
    assert "after the model's inputs" in err.value.hint
    one = tmp_path / "one.npy"
    np.save(one, samples(32, 1)["image"])
    with pytest.raises(CalibrationError, match=r"2 inputs \['image', 'meta'\] but the calibration data is one array"):
        compile_two_inputs(model, "onnxruntime-cpu", tmp_path, signing_key, calib=one)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=samples(32, 1)["image"], meta=np.zeros((32, 6), np.float32))
    with pytest.raises(CalibrationError, match=r"'meta' samples have shape \[6\]; the model input 'meta' takes"):
        compile_two_inputs(model, "onnxruntime-cpu", tmp_path, signing_key, calib=wrong)


def test_structured_samples_slice_like_a_batch(tmp_path):
    from edgekit.data.sources import named_feeds, per_input, tensor_sha256

    s = samples(10, 0)
    x = per_input(s, "test")
    assert len(x) == 10 and x["meta"].shape == (10, 4)
    part = np.concatenate([x[:3], np.repeat(x[-1:], 2, axis=0)])  # what padding a fixed batch does
    feeds = named_feeds(part, ["image", "meta"])
    assert feeds["image"].flags["C_CONTIGUOUS"] and np.array_equal(feeds["meta"][4], s["meta"][9])
    assert tensor_sha256(x) != tensor_sha256(per_input({**s, "meta": s["meta"] + 1}, "test"))
    with pytest.raises(CalibrationError, match="different numbers of samples"):
        per_input({"image": s["image"], "meta": s["meta"][:5]}, "test")
    with pytest.raises(CalibrationError, match="dtype int64"):
        per_input({"image": s["image"], "meta": np.zeros((10, 4), np.int64)}, "test")


def test_tflite_refuses_several_inputs_before_any_work(model, tmp_path, signing_key):
    from edgekit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"one input and one output; this one has inputs \['image', 'meta'\] and "
                                          r"outputs \['logits', 'features'\]") as err:
        compile_two_inputs(model, "android-arm64-tflite", tmp_path, signing_key)
    assert "x86-openvino-cpu" in err.value.hint
    assert not list(tmp_path.glob("*.ekb"))


def test_fidelity_gates_on_the_worst_output():
    from edgekit.build.gates import FidelityCheck
    from edgekit.config.target import FidelityGate

    rng = np.random.default_rng(0)
    scores, boxes = rng.normal(size=(20, 10)), rng.normal(size=(20, 4)) + 5
    check = FidelityCheck(FidelityGate(min_cosine=0.99))
    fig = check.measure(scores, scores * 1.01, {"boxes": (boxes, boxes + rng.normal(0, 2, boxes.shape))},
                        first="scores")
    assert fig["outputs"]["scores"] > 0.999 and fig["outputs"]["boxes"] < 0.99
    assert fig["cosine"] == fig["outputs"]["boxes"] and fig["top1_agreement"] == 1.0
    gate = next(g for g in check.gates(fig) if g.name == "fidelity.cosine")
    assert gate.status == "failed" and "worst of the outputs: boxes" in gate.detail


def test_init_writes_a_build_file_for_several_inputs_that_compiles_with_npz_data(model, tmp_path, keys,
                                                                                 monkeypatch):
    import json

    import yaml
    from typer.testing import CliRunner

    from edgekit.cli import app
    from edgekit.errors import ExitCode

    monkeypatch.chdir(tmp_path)
    npz(tmp_path / "calib.npz", model, 64, 1, labels=False)

    def cli(*args):
        result = CliRunner().invoke(app, [*map(str, args), "--json"])
        return result.exit_code, json.loads(result.stdout)

    code, doc = cli("init", model, "--target", "onnxruntime-cpu", "--input-shape", "1,3,16,16",
                    "--calibration", "calib.npz", "-o", "two.yaml")
    assert code == ExitCode.OK, doc
    text = Path("two.yaml").read_text()
    assert "array per input name (image, meta)" in text and "2 inputs ['image', 'meta']" in text
    assert yaml.safe_load(text)["preprocess"] is None
    code, doc = cli("compile", "two.yaml", "--key", keys["private"])
    assert code == ExitCode.OK, doc
    assert Path(doc["bundle"]).is_file()
    code, doc = cli("init", model, "--preprocess", "imagenet", "-o", "other.yaml", "--input-shape", "1,3,16,16")
    assert code == ExitCode.USAGE and "leave out --preprocess" in doc["error"]["hint"]


def test_device_cli_runs_and_benchmarks_a_bundle_with_several_inputs(model, tmp_path, signing_key, keys):
    import json
    import subprocess
    import sys

    result = compile_two_inputs(model, "onnxruntime-cpu", tmp_path, signing_key)
    feeds = samples(3, 11)
    np.savez(tmp_path / "feeds.npz", **feeds)
    base = [sys.executable, "-m", "edgekit_runtime.cli"]
    proc = subprocess.run([*base, "run", str(result.bundle), str(tmp_path / "feeds.npz"), "--keyring",
                           str(keys["public"]), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    ref = reference(model, feeds)
    got = {k: np.array(v) for k, v in row["outputs"].items()}
    assert got["features"].shape == (3, 8) and (got["logits"].argmax(1) == ref["logits"].argmax(1)).all()
    np.savez(tmp_path / "partial.npz", image=feeds["image"])  # an input missing: the runtime's error, no traceback
    proc = subprocess.run([*base, "run", str(result.bundle), str(tmp_path / "partial.npz"), "--keyring",
                           str(keys["public"]), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "'meta' is missing" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*base, "bench", str(result.bundle), "--keyring", str(keys["public"]), "--json",
                           "--queries", "20", "--seconds", "0.2", "--warmup", "2", "--no-memory"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bench = json.loads(proc.stdout)
    assert bench["single_stream"]["inference"]["count"] >= 20
