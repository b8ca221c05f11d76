"""Benchmark extras on the device side: latency quantiles, peak memory from a child process, per-layer profiles.

The models are built here in code (a named two-layer MLP, a MatMul with 16 MiB of weights)
so the tests can check figures against what the model is known to hold.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgekit_runtime
from edgekit_runtime.bench import QUANTILES, SCHEMA_VERSION, BenchSettings, run_benchmark
from edgekit_runtime.contract.errors import ErrorCode, RuntimeConfigError, RuntimeErrorBase
from edgekit_runtime.engines import engine_class
from edgekit_runtime.engines.base import Engine, precision_of_kernel
from edgekit_runtime.engines.onnxruntime_engine import parse_ort_trace
from edgekit_runtime.memory import measure

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BUNDLE = GOLDEN / "v1.0-onnxruntime-matmul.ekb"
KEY = GOLDEN / "golden.pub"
MLP_NODES = ("fc1", "act1", "fc2")


def mlp_onnx(width: int = 64) -> bytes:
    """x[batch, 16] → MatMul fc1 → Relu act1 → MatMul fc2 → y[batch, 8], every node named."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, width)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.normal(size=(width, 8)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["a"], name="act1"),
         helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tensor_bundle(kit, name: str, model: bytes, inputs: int, outputs: int) -> Path:
    """A signed ONNX Runtime bundle of ``model`` (x[batch, inputs] → y[batch, outputs]), no health check."""
    manifest, members = kit.parts()
    manifest = copy.deepcopy(manifest)
    manifest["inputs"][0]["shape"] = ["batch", inputs]
    manifest["outputs"][0]["shape"] = ["batch", outputs]
    manifest["health_check"] = None
    return kit.write(name, manifest=manifest, members={"model.onnx": model})


def test_the_result_carries_101_latency_quantiles():
    with edgekit_runtime.load(BUNDLE, keyring=KEY) as m:
        r = run_benchmark(m, settings=BenchSettings(warmup=2, min_queries=60, min_duration_s=0, offline_batch=None))
    q, inf = r["single_stream"]["inference_quantiles_ms"], r["single_stream"]["inference"]
    assert r["schema_version"] == SCHEMA_VERSION == 2 and len(q) == QUANTILES == 101
    assert q == sorted(q)
    assert q[0] == pytest.approx(inf["min_ms"], abs=1e-4) and q[-1] == pytest.approx(inf["max_ms"], abs=1e-4)
    assert q[50] == pytest.approx(inf["p50_ms"], abs=1e-4) and q[99] == pytest.approx(inf["p99_ms"], abs=1e-4)
    assert len(json.dumps(q)) < 1500  # small enough to travel in an MQTT answer


def test_memory_is_measured_in_a_child_and_grows_with_the_model(kit):
    """RSS figures are ordered, and a model holding 16 MiB more weights shows ≥ 12 MiB more after load."""
    from onnx import TensorProto, helper, numpy_helper

    big = np.full((2048, 2048), 0.5, dtype=np.float32)  # 16 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="big")], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2048])],
                              [numpy_helper.from_array(big, "W")])
    big_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    small = measure(tensor_bundle(kit, "small.ekb", mlp_onnx(), 16, 8), kit.ring_of(kit.key), offline_batch=4)
    large = measure(tensor_bundle(kit, "large.ekb", big_model.SerializeToString(), 2048, 2048),
                    kit.ring_of(kit.key), offline_batch=4)
    for mem in (small, large):
        assert 0 < mem["baseline_mib"] <= mem["after_load_mib"] <= mem["peak_mib"]
        assert mem["workload"] == {"warmup": 20, "queries": 50, "offline_batch": 4, "offline_batches": 3,
                                   "inputs": "tensors"}
    assert large["after_load_mib"] - small["after_load_mib"] >= 12
    # the baseline is the interpreter with the runtime imported: the same whichever bundle comes next
    assert abs(large["baseline_mib"] - small["baseline_mib"]) < 8


def test_a_probe_that_fails_raises_the_childs_error_with_its_code(kit, key2):
    with pytest.raises(RuntimeErrorBase) as info:
        measure(BUNDLE, kit.ring_of(key2))
    assert info.value.code == ErrorCode.BUNDLE_UNTRUSTED_KEY


def test_ort_trace_parsing_leaves_out_warm_up_and_maps_renamed_nodes():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(name, ts, dur, op, dtype):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "provider": "CPUExecutionProvider", "input_type_shape": [{dtype: [1, 4]}]}}

    trace = [run(0, 50), node("conv_token_3", 10, 30, "QLinearConv", "uint8"),  # warm-up: left out
             run(100, 50), node("conv_token_3", 110, 20, "QLinearConv", "uint8"), node("fc", 135, 5, "Gemm", "float"),
             run(200, 40), node("conv_token_3", 205, 18, "QLinearConv", "uint8"),
             node("fence", 210, 1, "X", "float") | {"name": "fence_before"}]
    layers, totals = parse_ort_trace(trace, skip_runs=1)
    assert totals == [50.0, 40.0] and [len(q) for q in layers] == [2, 1]
    conv = layers[0][0]
    assert (conv.name, conv.node, conv.op_type, conv.precision, conv.kernel, conv.time_us) == \
        ("conv_token_3", "conv", "QLinearConv", "int8", "CPUExecutionProvider", 20.0)
    assert layers[0][1].precision == "fp32" and layers[0][1].node == "fc"


@pytest.mark.parametrize("kernel, precision", [
    ("brgconv_avx512_amx_I8", "int8"), ("brgconv_avx512_amx_i8", "int8"), ("jit_uni_u8", "int8"),
    ("brgconv_avx512_f32", "fp32"), ("gemm_mlas_f32", "fp32"), ("brgemm_avx512_bf16", "bf16"),
    ("undef", None), ("unknown_f32", "fp32"), (None, None), ("jit_avx512_I8x", None)])
def test_openvino_exec_types_name_their_precision(kernel, precision):
    assert precision_of_kernel(kernel) == precision


def test_ort_profile_lists_the_graphs_nodes(kit):
    bundle = tensor_bundle(kit, "mlp.ekb", mlp_onnx(), 16, 8)
    pub = kit.root / "k.pub"
    pub.write_bytes(kit.public_pem(kit.key))
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "bench", str(bundle), "--keyring", str(pub),
                           "--queries", "20", "--seconds", "0", "--batch", "0", "--warmup", "2", "--no-memory",
                           "--profile", "--profile-queries", "15", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    prof = r["profile"]
    assert prof["engine"] == "onnxruntime" and prof["separate_pass"] and prof["queries"] == 15
    assert {row["node"] for row in prof["layers"]} == set(MLP_NODES)
    assert {row["op_type"] for row in prof["layers"]} == {"MatMul", "Relu"}
    assert all(row["precision"] == "fp32" and row["calls"] == 15 for row in prof["layers"])
    assert sum(row["share"] for row in prof["layers"]) == pytest.approx(1.0)
    # the layers cannot take longer than the queries that ran them (with slack for timer granularity)
    assert 0 < prof["coverage"] <= 1.5 and prof["layer_sum_ms_per_query"] <= prof["engine_run_ms_per_query"] * 1.5
    # the timed figures come from the unprofiled session, before the profiling pass
    assert r["single_stream"]["inference"]["count"] >= 20 and "memory" not in r


def test_runtime_bench_reports_memory_by_default(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "bench", str(BUNDLE), "--keyring", str(KEY),
                           "--queries", "20", "--seconds", "0", "--batch", "2", "--warmup", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "memory (RSS): baseline" in proc.stdout and "peak" in proc.stdout


def test_engines_without_a_readable_profiler_say_why_and_what_to_use():
    assert engine_class("onnxruntime").profiling_unavailable_reason() is None
    assert engine_class("openvino").profiling_unavailable_reason() is None
    assert "benchmark_model" in engine_class("tflite").profiling_unavailable_reason()
    assert "trtexec" in engine_class("tensorrt").profiling_unavailable_reason()

    class NoProfiler(Engine):
        name = "plain"

        @classmethod
        def unavailable_reason(cls):
            return None

        @classmethod
        def library_version(cls):
            return "0"

        def run(self, feeds):
            return feeds

    engine = NoProfiler(Path("."), "m", [], [], None)
    with pytest.raises(RuntimeConfigError) as info:
        engine.profile([{}], warmup=0)
    assert info.value.code == ErrorCode.CONFIG_INVALID and "plain engine has no per-layer profiler" in str(info.value)
