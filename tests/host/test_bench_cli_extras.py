"""`edgekit bench` beyond latency, driven as a user would: peak memory per bundle, the latency CDF PNG, --profile."""

from __future__ import annotations

import json
import zipfile

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.cli.bench import latency_figure
from edgekit.errors import ConfigError

runner = CliRunner()
FAST = ("--queries", "30", "--seconds", "0.1", "--batch", "2")


def invoke(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def graph_nodes(bundle) -> set[str]:
    """The node names of the ONNX model inside an ONNX Runtime bundle."""
    import onnx

    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        model = onnx.load_from_string(zf.read(manifest["backend"]["artifact"]))
    return {n.name for n in model.graph.node}


def test_compare_reports_memory_per_bundle_and_plots_one_cdf_per_model(int8_bundles, fp32_bundles, keys, tmp_path):
    fp32, int8 = fp32_bundles["onnxruntime-cpu"].bundle, int8_bundles["onnxruntime-cpu"].bundle
    png, out = tmp_path / "cdf.png", tmp_path / "bench.json"
    res = invoke("bench", fp32, "--compare", int8, "--keyring", keys["public"], *FAST, "--plot", png,
                 "--json-out", out)
    assert "RSS peak" in res.stdout and f"latency CDF: {png}" in res.stdout
    result = json.loads(out.read_text())
    assert result["schema_version"] == 2
    for r in result["models"].values():
        mem = r["memory"]
        assert 0 < mem["baseline_mib"] <= mem["after_load_mib"] <= mem["peak_mib"]
        assert mem["load_mib"] > 1  # ONNX Runtime and the model are in it: not an empty probe
        assert len(r["single_stream"]["inference_quantiles_ms"]) == 101
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    fig = latency_figure(result)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    assert {ln.get_label().split(" (")[0] for ln in lines} == set(result["models"])
    q = result["models"][fp32.name]["single_stream"]["inference_quantiles_ms"]
    assert list(lines[0].get_xdata()) == q and lines[0].get_ydata()[-1] == 1.0


def test_plot_works_without_compare_and_refuses_a_result_without_quantiles(int8_bundles, keys, tmp_path):
    png = tmp_path / "one.png"
    res = invoke("bench", int8_bundles["onnxruntime-cpu"].bundle, "--keyring", keys["public"], *FAST,
                 "--no-memory", "--plot", png, "--json")
    r = json.loads(res.stdout)
    assert "memory" not in r and png.read_bytes()[:4] == b"\x89PNG"
    assert len(latency_figure(r).axes[0].get_lines()) == 1
    old = json.loads(res.stdout)
    old["schema_version"] = 1
    del old["single_stream"]["inference_quantiles_ms"]
    with pytest.raises(ConfigError, match="predates"):
        latency_figure(old)
    bad = invoke("bench", int8_bundles["onnxruntime-cpu"].bundle, "--keyring", keys["public"], "--plot",
                 tmp_path / "x.jpg", ok=False)
    assert bad.exit_code == 2 and ".png" in bad.output


def test_openvino_int8_profile_shows_layers_that_ran_in_int8(int8_bundles, keys):
    res = invoke("bench", int8_bundles["x86-openvino-cpu"].bundle, "--keyring", keys["public"], *FAST,
                 "--profile", "--profile-queries", "20", "--profile-top", "50", "--json")
    r = json.loads(res.stdout)
    prof = r["profile"]
    assert prof["available"] and prof["engine"] == "openvino" and prof["queries"] == 20
    int8_compute = [row for row in prof["layers"] if row["op_type"] in ("Convolution", "MatMul", "FullyConnected",
                                                                        "FullyConnectedQuantizedLegacy")
                    and "i8" in row["kernel"].lower()]
    assert int8_compute and all(row["precision"] == "int8" for row in int8_compute)
    assert len(prof["layers"]) == prof["layers_seen"]  # top 50 of a small CNN: every executed layer
    assert sum(row["share"] for row in prof["layers"]) == pytest.approx(1.0)
    # the executed layers account for a real part of a query, and cannot exceed it by much (timer granularity)
    assert 0.02 <= prof["coverage"] <= 1.5
    assert sum(row["mean_us"] for row in prof["layers"]) / 1e3 == pytest.approx(prof["layer_sum_ms_per_query"])
    mem = r["memory"]
    assert 0 < mem["baseline_mib"] <= mem["after_load_mib"] <= mem["peak_mib"]


def test_onnxruntime_profile_names_nodes_of_the_bundled_graph(int8_bundles, keys):
    bundle = int8_bundles["onnxruntime-cpu"].bundle
    res = invoke("bench", bundle, "--keyring", keys["public"], *FAST, "--no-memory", "--profile",
                 "--profile-queries", "20", "--profile-top", "50")
    assert "slowest layers (onnxruntime, 20 profiled queries)" in res.stdout
    res = invoke("bench", bundle, "--keyring", keys["public"], *FAST, "--no-memory", "--profile",
                 "--profile-queries", "20", "--profile-top", "50", "--json")
    prof = json.loads(res.stdout)["profile"]
    nodes = graph_nodes(bundle)
    # the quantized convolutions and the classifier ran as integer kernels, under their graph names
    integer = [row for row in prof["layers"] if row["op_type"] in ("QLinearConv", "QGemm", "QLinearMatMul",
                                                                   "ConvInteger", "MatMulInteger")]
    assert integer and all(row["node"] in nodes and row["precision"] == "int8" for row in integer)
    assert sum(row["node"] in nodes for row in prof["layers"]) >= len(integer) + 2  # Q/DQ nodes too
    assert prof["engine_run_ms_per_query"] > 0 and 0 < prof["coverage"] <= 1.5


@pytest.fixture(scope="module")
def tflite_bundle(tmp_path_factory, signing_key):
    """A signed LiteRT bundle with the digits bundles' signature (input[1, 1, 8, 8] → logits[1, 10]), one layer."""
    import litert_torch
    import torch

    from edgekit.build.bundle_writer import write_bundle
    from edgekit_runtime.contract import bundle_spec

    root = tmp_path_factory.mktemp("tflite_bench")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    litert_torch.convert(model, (torch.zeros(1, 1, 8, 8),)).export(str(root / "model.tflite"))
    manifest = {
        "format": bundle_spec.FORMAT_NAME, "format_version": bundle_spec.FORMAT_VERSION,
        "created_at": "2020-01-01T00:00:00+00:00", "created_by": "edgekit tests",
        "model": {"name": "linear", "version": "1.0.0", "release": 1},
        "target": {"name": "android-arm64-tflite", "device": "generic"},
        "backend": {"name": "tflite", "version": "test", "precision": "fp32", "artifact": "model.tflite",
                    "engines": ["tflite"], "options": {"threads": 1}},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 1, 8, 8], "layout": "NCHW",
                    "quantization": None}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 10], "layout": None, "quantization": None}],
        "preprocess": None, "postprocess": None, "labels": None, "metrics": {}, "calibration": None,
        "health_check": None, "files": {}, "signing": {},
    }
    return write_bundle(root / "linear.ekb", manifest, {"model.tflite": (root / "model.tflite").read_bytes()},
                        signing_key)


def test_tflite_profile_is_refused_before_the_benchmark_with_the_reason(tflite_bundle, keys):
    res = invoke("bench", tflite_bundle, "--keyring", keys["public"], "--queries", "100000", "--seconds", "60",
                 "--profile", "--json", ok=False)
    err = json.loads(res.stdout)["error"]
    assert res.exit_code == 2 and err["type"] == "ConfigError"
    assert "not available" in err["message"] and "benchmark_model" in err["message"]
    # without --profile the same bundle benchmarks, memory included
    r = json.loads(invoke("bench", tflite_bundle, "--keyring", keys["public"], *FAST, "--batch", "0",
                          "--json").stdout)
    assert r["system"]["model"]["engine"] == "tflite" and r["memory"]["peak_mib"] > 0


def test_compare_profiles_what_it_can_and_says_what_it_cannot(tflite_bundle, int8_bundles, keys, tmp_path):
    """An OpenVINO bundle against a LiteRT one: the first gets its table, the second a 'not available' line."""
    res = invoke("bench", int8_bundles["x86-openvino-cpu"].bundle, "--compare", tflite_bundle, "--keyring",
                 keys["public"], "--queries", "20", "--seconds", "0", "--batch", "0", "--no-memory", "--profile",
                 "--profile-queries", "10", "--json-out", tmp_path / "r.json")
    assert "linear.ekb: per-layer profile not available for this engine" in res.stdout
    models = json.loads((tmp_path / "r.json").read_text())["models"]
    assert models["linear.ekb"]["profile"]["available"] is False
    assert models["x86-openvino-cpu-int8.ekb"]["profile"]["available"] is True


def test_device_cli_refuses_tflite_profile_with_its_stable_code(tflite_bundle, keys):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "bench", str(tflite_bundle), "--keyring",
                           str(keys["public"]), "--seconds", "60", "--profile", "--json"],
                          capture_output=True, text=True, timeout=120)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3 and doc["ok"] is False
    assert doc["error"]["name"] == "CONFIG_INVALID" and "benchmark_model" in doc["error"]["message"]
