"""The typed manifest: what it accepts, what it refuses (with the field's path), its defaults, and its round trip."""

from __future__ import annotations

import copy
import json
import math
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.contract.errors import BundleError, ErrorCode
from edgekit_runtime.contract.manifest import (
    BackendInfo, BackendOptions, BuildMetrics, Fidelity, GateRecord, HealthCheck, InputStats, LatencyFigures,
    LatencyReport, Manifest, ModelInfo, Postprocess, Preprocess, QuantizationDetails, QuantParams, StageRecord,
    TargetInfo, TensorSpec, defaults,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1.0-onnxruntime-matmul.ekb"
SHA = "0" * 64


def golden_json() -> dict:
    with zipfile.ZipFile(GOLDEN) as zf:
        return json.loads(zf.read("manifest.json"))


def valid() -> dict:
    """A complete 1.1 manifest as the host writes one: every section, the new report fields included."""
    return {
        "format": "edgekit-bundle", "format_version": "1.1",
        "created_at": "2026-01-01T00:00:00+00:00", "created_by": "tests",
        "model": {"name": "m", "version": "1.0.0", "release": 3},
        "target": {"name": "onnxruntime-cpu", "device": "generic", "latency_budget_ms": 20.0},
        "backend": {"name": "onnxruntime", "version": "1.20", "precision": "int8", "artifact": "model.onnx",
                    "engines": ["onnxruntime"], "options": {"threads": 2},
                    "quantization": {"format": "QDQ", "per_channel": True, "excluded_nodes": ["conv1"],
                                     "subset_size": 300, "io": {"input": None}}},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 4, 6], "layout": "NCHW",
                    "quantization": None}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 10], "layout": None,
                     "quantization": {"scale": 0.05, "zero_point": -3, "dtype": "int8"}}],
        "preprocess": {"type": "image", "color": "rgb", "size": [4, 6], "mean": [0.5, 0.5, 0.5], "std": [0.25],
                       "layout": "NCHW"},
        "postprocess": {"type": "classification", "softmax": True, "top_k": 3},
        "labels": "labels.txt",
        "metrics": {
            "accuracy": {"metric": "top1_percent", "direction": "higher", "dataset": "val", "count": 100,
                         "checked": True, "budget_pts": 1.0, "fp32": 90.0, "int8": 89.5, "drop_pts": 0.5,
                         "fp32_measured_with": {"engine": "onnxruntime", "threads": 2}},
            "fidelity": {"cosine": 0.995, "cosine_min": 0.98, "top1_agreement": 0.99, "samples": 60,
                         "min_cosine": 0.99, "min_top1_agreement": None, "source": "held-back calibration samples"},
            "latency_ms": {"engine": "onnxruntime", "batch": 1, "threads": "engine default (16 cores)",
                           "interleaved": True, "speedup": 1.8, "gated": True, "not_gated_reason": None,
                           "fp32": {"p50_ms": 1.8, "p90_ms": 2.0, "p99_ms": 2.5, "mean_ms": 1.9, "count": 100},
                           "int8": {"p50_ms": 1.0, "p90_ms": 1.1, "p99_ms": 1.4, "mean_ms": 1.05, "count": 100}},
            "latency_measured_on": "Some CPU",
            "size_bytes": {"fp32": 4000, "int8": 1200},
            "gates": [{"name": "accuracy", "status": "passed", "value": 0.5, "threshold": 1.0, "unit": "pt",
                       "detail": "top1 90.00 → 89.50"},
                      {"name": "latency.int8_speedup", "status": "not_checked", "value": None, "threshold": None,
                       "unit": "x", "detail": ""}],
            "stages": [{"name": "export", "seconds": 1.5}, {"name": "quantize", "seconds": 3}],
        },
        "calibration": {"sha256": SHA, "count": 240, "source": "calib.npz"},
        "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                         "atol": 0.01, "rtol": 0.05},
        "input_stats": {"x": {"count": 240, "mean": 0.1, "std": 1.0, "min": -3.0, "max": 3.0,
                              "percentiles": {"1": -2.0, "99": 2.0},
                              "histogram": {"edges": [-3.0, 0.0, 3.0], "counts": [120, 120]},
                              "sample_mean": {"mean": 0.1, "std": 0.01}}},
        "files": {n: {"sha256": SHA, "size": 1} for n in
                  ("model.onnx", "labels.txt", "health/input.npy", "health/expected_output.npy")},
        "signing": {"algorithm": "ed25519", "key_id": "0123456789abcdef"},
    }


def refused(manifest: dict, *fragments: str) -> BundleError:
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(manifest)
    assert info.value.code == ErrorCode.BUNDLE_BAD_MANIFEST, info.value
    for fragment in fragments:
        assert fragment in info.value.message, (fragment, info.value.message)
    return info.value


# ----------------------------------------------------------------------------- what it accepts
def test_a_complete_1_1_manifest_parses_into_the_types():
    m = Manifest.from_dict(valid())
    assert m.model == ModelInfo(name="m", version="1.0.0", release=3)
    assert m.backend.options == BackendOptions(threads=2) and m.backend.options.performance_hint == "LATENCY"
    assert m.inputs[0].shape == ["batch", 3, 4, 6] and m.outputs[0].quantization == QuantParams(
        scale=0.05, zero_point=-3, dtype="int8")
    assert m.metrics.accuracy.direction == "higher" and m.metrics.accuracy.checked is True
    assert m.metrics.fidelity == Fidelity(cosine=0.995, cosine_min=0.98, top1_agreement=0.99, samples=60,
                                          min_cosine=0.99, source="held-back calibration samples")
    lat = m.metrics.latency_ms
    assert lat.speedup == 1.8 and lat.gated is True and lat.threads == "engine default (16 cores)"
    assert lat.figures["int8"] == LatencyFigures(p50_ms=1.0, p90_ms=1.1, p99_ms=1.4, mean_ms=1.05, count=100)
    assert m.metrics.gates[1] == GateRecord(name="latency.int8_speedup", status="not_checked", unit="x")
    assert m.metrics.stages[1] == StageRecord(name="quantize", seconds=3.0)
    assert isinstance(m.metrics.stages[1].seconds, float)  # a JSON integer is a number
    assert m.input_stats["x"].histogram.counts == [120, 120] and m.input_stats["x"].sample_mean.std == 0.01
    assert bundle_spec.validate_manifest(valid()) == m  # the bundle writer's call, now a thin one


def test_to_dict_gives_back_every_key_and_value():
    d = valid()
    out = Manifest.from_dict(d).to_dict()

    def within(a, b, path="manifest"):
        if isinstance(a, dict):
            for k in a:
                assert k in b, f"{path}.{k} was dropped"
                within(a[k], b[k], f"{path}.{k}")
        else:
            assert a == b, path

    within(d, out)
    assert out["backend"]["quantization"]["subset_size"] == 300  # a backend's own keys are kept as written
    assert Manifest.from_dict(out) == Manifest.from_dict(d)
    json.dumps(out, allow_nan=False)  # plain JSON


def test_the_v1_0_golden_parses_and_its_dict_keeps_every_v1_0_key():
    d = golden_json()
    m = Manifest.from_dict(d)
    assert m.format_version == "1.0" and m.metrics.fidelity is None and m.metrics.gates == []
    assert m.metrics.accuracy.metric == "top1_percent" and m.metrics.accuracy.direction is None
    assert m.input_stats["x"].histogram is None  # 1.0 bundles may lack the drift histogram
    out = m.to_dict()
    for key, value in d.items():
        assert key in out
        if isinstance(value, dict):
            assert set(value) <= set(out[key]), key


def test_unknown_fields_are_ignored_at_every_level():
    d = valid()
    d["added_later"] = {"x": 1}
    d["model"]["nickname"] = "m"
    d["inputs"][0]["color_space"] = "srgb"
    d["metrics"]["latency_ms"]["jitter_ms"] = 0.1
    d["metrics"]["gates"][0]["owner"] = "qa"
    assert Manifest.from_dict(d) == Manifest.from_dict(valid())


def test_defaults_live_in_the_contract_and_fill_what_a_bundle_leaves_out():
    pre = Preprocess.from_dict({"size": [8, 8]})
    assert (pre.type, pre.color, pre.resize, pre.interpolation, pre.layout, pre.dtype) == (
        "image", "rgb", "stretch", "area", "NCHW", "float32")
    assert pre.scale == 1 / 255 and pre.mean is None and pre.std is None
    assert Postprocess.from_dict({}) == Postprocess(type="classification", softmax=True, top_k=5)
    assert defaults(Preprocess) == {"type": "image", "color": "rgb", "size": None, "resize": "stretch",
                                    "interpolation": "area",
                                    "scale": 1 / 255, "mean": None, "std": None, "layout": "NCHW",
                                    "dtype": "float32"}
    # size has no default to take: required for images (1.2: absent for tensors)
    with pytest.raises(BundleError, match="size is missing"):
        Preprocess.from_dict({})
    assert defaults(BackendOptions)["performance_hint"] == "LATENCY"
    assert BuildMetrics.from_dict({}) == BuildMetrics()  # 1.0 test bundles wrote "metrics": {}


def test_a_host_built_manifest_round_trips():
    m = Manifest(created_at="2026-01-01T00:00:00+00:00", created_by="tests",
                 model=ModelInfo(name="m", version="1", release=1), target=TargetInfo(name="t"),
                 backend=BackendInfo(name="onnxruntime", version="1", precision="fp32", artifact="model.onnx",
                                     engines=["onnxruntime"]),
                 inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
                 outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 3])],
                 health_check=HealthCheck(input="in.npy", expected_output="out.npy", atol=1e-5, rtol=1e-5),
                 metrics=BuildMetrics(latency_ms=LatencyReport(figures={"fp32": LatencyFigures(
                     p50_ms=1.0, p90_ms=1.0, p99_ms=1.0, mean_ms=1.0, count=10)})))
    d = m.to_dict()
    assert d["format_version"] == bundle_spec.FORMAT_VERSION == "1.4"
    assert d["metrics"]["latency_ms"]["fp32"]["count"] == 10  # figures sit under the precision's name
    d["files"] = {n: {"sha256": SHA, "size": 0} for n in ("model.onnx", "in.npy", "out.npy")}
    d["signing"] = {"algorithm": "ed25519", "key_id": "k"}
    back = Manifest.from_dict(json.loads(json.dumps(d)))
    assert replace(back, files={}, signing=None) == m


def test_backend_quantization_keeps_the_keys_of_one_backend():
    q = QuantizationDetails.from_dict({"method": "nncf.quantize", "ignored": ["a"], "subset_size": 3})
    assert q.method == "nncf.quantize" and q.extra == {"ignored": ["a"], "subset_size": 3}
    assert q.to_dict()["ignored"] == ["a"]


def test_input_stats_entries_for_unknown_inputs_are_not_refused():
    # 1.0 TFLite builds keyed input_stats by the source model's input name; drift reports it unavailable
    d = valid()
    d["input_stats"] = {"serving_default_x:0": d["input_stats"]["x"]}
    assert "serving_default_x:0" in Manifest.from_dict(d).input_stats


# ----------------------------------------------------------------------------- what it refuses
def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path, value, fragments", [
    ("model.release", _DELETE, ["manifest.model.release is missing"]),
    ("model.release", "3", ["manifest.model.release must be an integer, not a string"]),
    ("model.release", True, ["manifest.model.release must be an integer, not a boolean"]),
    ("model.release", -1, ["manifest.model.release must be >= 0"]),
    ("model.name", "", ["manifest.model.name is empty"]),
    ("metrics", _DELETE, ["manifest.metrics is missing"]),
    ("preprocess", _DELETE, ["manifest.preprocess is missing"]),
    ("signing", None, ["manifest.signing must be an object"]),
    ("inputs", [], ["manifest.inputs is empty"]),
    ("inputs.0.dtype", "float128", ["manifest.inputs[0].dtype 'float128' is not one of"]),
    ("inputs.0.shape", "batch,3,4,6", ["manifest.inputs[0].shape must be a list"]),
    ("inputs.0.shape.1", 3.0, ["manifest.inputs[0].shape[1] must be an integer or a string, not a number"]),
    ("inputs.0.shape.1", -3, ["manifest.inputs[0].shape[1] is -3"]),
    ("inputs.0.layout", "NCH", ["manifest.inputs[0].layout 'NCH' does not fit the 4-D shape"]),
    ("outputs.0.quantization.scale", 0, ["manifest.outputs[0].quantization.scale must be positive"]),
    ("outputs.0.quantization.dtype", "float32", ["manifest.outputs[0].quantization.dtype 'float32'"]),
    ("outputs.0.quantization.zero_point", _DELETE, ["manifest.outputs[0].quantization.zero_point is missing"]),
    ("backend.precision", "int4", ["manifest.backend.precision 'int4'"]),
    ("backend.engines", [], ["manifest.backend.engines is empty"]),
    ("backend.options.threads", 0, ["manifest.backend.options.threads must be >= 1"]),
    ("backend.options.performance_hint", "FAST", ["manifest.backend.options.performance_hint is 'FAST'"]),
    ("backend.options.tensorrt", {"precision": ["int4"]}, ["manifest.backend.options.tensorrt.precision[0]"]),
    ("preprocess.size", [4], ["manifest.preprocess.size must be [height, width]"]),
    ("preprocess.color", "hsv", ["manifest.preprocess.color is 'hsv'; it must be one of 'gray', 'rgb', 'bgr'"]),
    ("preprocess.mean", [0.5, 0.5], ["manifest.preprocess.mean has 2 values; rgb images have 3"]),
    ("preprocess.std", [0.0], ["manifest.preprocess.std has a zero"]),
    ("postprocess.top_k", 0, ["manifest.postprocess.top_k must be >= 1"]),
    ("health_check.atol", -1e-5, ["manifest.health_check.atol must be at least 0"]),
    ("health_check.rtol", math.nan, ["manifest.health_check.rtol must be a finite number"]),
    ("health_check.expected_output", "nope.npy", ["manifest.health_check.expected_output refers to 'nope.npy'"]),
    ("labels", "classes.txt", ["manifest.labels refers to 'classes.txt', which is not in manifest.files"]),
    ("backend.artifact", "model.xml", ["manifest.backend.artifact refers to 'model.xml'"]),
    ("backend.quantization.calibration_cache", "calibration.cache",
     ["manifest.backend.quantization.calibration_cache refers to 'calibration.cache'"]),
    ("files.model.onnx", {"sha256": "ABC", "size": 1}, []),  # (path helper splits on dots: see below)
    ("metrics.gates.0.status", "ok", ["manifest.metrics.gates[0].status is 'ok'"]),
    ("metrics.fidelity.samples", 1.5, ["manifest.metrics.fidelity.samples must be an integer, not a number"]),
    ("metrics.latency_ms.int8.count", _DELETE, ["manifest.metrics.latency_ms.int8.count is missing"]),
    ("metrics.accuracy.direction", "up", ["manifest.metrics.accuracy.direction is 'up'"]),
    ("input_stats.x.histogram.counts", [1.5, 2], ["manifest.input_stats['x'].histogram.counts[0]"]),
    ("calibration.sha256", None, ["manifest.calibration.sha256 must be a string, not null"]),
])
def test_what_does_not_fit_is_refused_naming_the_field(path, value, fragments):
    if path.startswith("files."):
        d = valid()
        d["files"]["model.onnx"] = value
        fragments = ["manifest.files['model.onnx'].sha256 is not 64 lowercase hex digits"]
    else:
        d = _set(valid(), path, value)
    refused(d, *fragments)


def test_files_must_not_list_the_manifest_or_signature():
    d = valid()
    d["files"]["signature.json"] = {"sha256": SHA, "size": 1}
    refused(d, "manifest.files lists the reserved name 'signature.json'")


def test_a_tensor_name_twice_is_refused():
    d = valid()
    d["outputs"].append(dict(d["outputs"][0]))
    refused(d, "manifest.outputs names a tensor twice")


def test_a_newer_major_is_unsupported_not_bad():
    d = valid()
    d["format_version"] = "2.0"
    d["model"] = "anything: a 2.x manifest may look different"
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(d)
    assert info.value.code == ErrorCode.BUNDLE_UNSUPPORTED_VERSION


# ----------------------------------------------------------------------------- layout means something
def test_the_first_input_layout_must_agree_with_the_preprocessing():
    d = _set(valid(), "inputs.0.layout", "NHWC")
    refused(d, "manifest.inputs[0].layout is 'NHWC' but manifest.preprocess.layout is 'NCHW'")
    # the same manifest written consistently for NHWC is fine
    d = _set(_set(d, "preprocess.layout", "NHWC"), "inputs.0.shape", ["batch", 4, 6, 3])
    assert Manifest.from_dict(d).inputs[0].layout == "NHWC"
    # an input without a layout is not held to one
    assert Manifest.from_dict(_set(valid(), "inputs.0.layout", None)).inputs[0].layout is None


@pytest.mark.parametrize("shape, what", [
    (["batch", 1, 4, 6], "channels 3"), (["batch", 3, 5, 6], "height 4"), (["batch", 3, 4, 5], "width 6"),
])
def test_the_first_input_shape_must_fit_what_the_preprocessing_makes(shape, what):
    refused(_set(valid(), "inputs.0.shape", shape), f"manifest.preprocess makes NCHW images with {what}")
    # symbolic dimensions are not judged
    assert Manifest.from_dict(_set(valid(), "inputs.0.shape", ["b", "c", "h", "w"]))


def test_a_1_0_bundle_is_not_held_to_the_layout_it_guessed():
    # 1.0 writers set inputs[].layout from the rank ("NCHW" for any 4-D input), read by nothing
    d = _set(_set(valid(), "format_version", "1.0"), "preprocess.layout", "NHWC")
    assert Manifest.from_dict(d).preprocess.layout == "NHWC"


# ----------------------------------------------------------------------------- the device uses the defaults
def test_preprocessing_without_a_scale_uses_the_contract_default():
    from edgekit_runtime.processing import preprocess_batch

    image = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    x = preprocess_batch([image], {"color": "gray", "size": [2, 2], "interpolation": "nearest"})
    np.testing.assert_allclose(x, (image / 255.0)[None, None], rtol=1e-6)  # 1/255, not the device's old 1.0
    typed = preprocess_batch([image], Preprocess(color="gray", size=[2, 2], interpolation="nearest", scale=1.0))
    np.testing.assert_array_equal(typed, image[None, None].astype(np.float32))


def test_a_tensor_spec_without_a_scale_is_not_divided_by_255():
    from edgekit_runtime.processing import preprocess_batch

    assert Preprocess.from_dict({"type": "tensor", "mean": [0.0], "std": [1.0]}).scale == 1.0
    assert Preprocess.from_dict({"type": "tensor", "scale": 0.5}).scale == 0.5
    assert Preprocess.from_dict({"type": "image", "size": [2, 2]}).scale == 1 / 255
    x = np.array([[3.0, -7.5]], dtype=np.float32)
    np.testing.assert_array_equal(preprocess_batch(x, {"type": "tensor"}), x)


def test_a_preprocess_object_that_does_not_fit_is_refused_before_any_image_is_read():
    from edgekit_runtime.processing import preprocess_batch

    with pytest.raises(BundleError, match="manifest.preprocess.resize is 'fit'"):
        preprocess_batch([np.zeros((2, 2), np.uint8)], {"size": [2, 2], "resize": "fit"})


def test_input_stats_parse_on_their_own_for_tools():
    s = InputStats.from_dict({"mean": 1, "histogram": {"edges": [0, 1, 2], "counts": [3, 4]}})
    assert s.mean == 1.0 and s.histogram.edges == [0.0, 1.0, 2.0] and s.count is None
