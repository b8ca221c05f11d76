"""KServe v2 requests and responses as bytes, and the dynamic batcher on its own (no sockets)."""

from __future__ import annotations

import json
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from edgekit_runtime.contract.errors import ErrorCode, InputError
from edgekit_runtime.serve.batcher import Batcher, Pending
from edgekit_runtime.serve.metrics import ServeMetrics
from edgekit_runtime.serve.protocol import (HEADER_LENGTH, InferRequest, ProtocolError, encode_response,
                                            parse_request)


def binary_request(inputs: dict[str, np.ndarray], **doc) -> tuple[bytes, str]:
    """What tritonclient's HTTP client sends: the JSON header, then each input's raw bytes."""
    specs, chunks = [], []
    for name, arr in inputs.items():
        if arr.dtype.kind == "O":
            raw = b"".join(struct.pack("<I", len(b)) + b for b in arr.reshape(-1))
            dt = "BYTES"
        else:
            raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            dt = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8"}[arr.dtype.name]
        specs.append({"name": name, "shape": list(arr.shape), "datatype": dt,
                      "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    head = json.dumps({"inputs": specs, **doc}).encode()
    return head + b"".join(chunks), str(len(head))


def test_json_and_binary_requests_give_the_same_arrays():
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    ids = np.array([[5, -7]], dtype=np.int64)
    js = json.dumps({"id": "r1", "inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()},
        {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [[5, -7]]}]}).encode()
    a = parse_request(js, None)
    body, n = binary_request({"x": x, "ids": ids}, id="r1")
    b = parse_request(body, n)
    for req in (a, b):
        assert req.id == "r1" and list(req.inputs) == ["x", "ids"]
        np.testing.assert_array_equal(req.inputs["x"], x)
        np.testing.assert_array_equal(req.inputs["ids"], ids)
        assert req.inputs["x"].dtype == np.float32 and req.inputs["x"].flags.writeable


def test_bytes_elements_are_length_prefixed_in_binary_and_strings_in_json():
    images = np.empty(2, dtype=object)
    images[:] = [b"\x89PNG...", b""]
    body, n = binary_request({"img": images})
    got = parse_request(body, n).inputs["img"]
    assert got.dtype == object and list(got) == [b"\x89PNG...", b""]
    js = json.dumps({"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a", "bé"]}]}).encode()
    assert list(parse_request(js, None).inputs["t"]) == [b"a", "bé".encode()]


def _bin(size: int, tail: bytes, shape: int = 2, datatype: str = "FP32") -> tuple[bytes, bytes]:
    head = json.dumps({"inputs": [{"name": "x", "shape": [shape], "datatype": datatype,
                                   "parameters": {"binary_data_size": size}}]}).encode()
    return head, tail


@pytest.mark.parametrize("body,header,code,says", [
    (b"not json", None, ErrorCode.SERVE_BAD_REQUEST, "not JSON"),
    (b'{"inputs": []}', None, ErrorCode.INPUT_MISSING, "no 'inputs'"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP8", "data": [1, 2]}]}', None,
     ErrorCode.INPUT_BAD_DTYPE, "FP8"),
    (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None,
     ErrorCode.INPUT_BAD_SHAPE, "2 values do not make shape [3]"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None,
     ErrorCode.INPUT_BAD_SHAPE, "non-negative"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', None,
     ErrorCode.INPUT_BAD_DTYPE, "not FP32 numbers"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, ErrorCode.INPUT_MISSING,
     "neither 'data'"),
    (_bin(8, b"\0" * 4), None, ErrorCode.INPUT_BAD_SHAPE, "runs past"),
    (_bin(4, b"\0" * 4), None, ErrorCode.INPUT_BAD_SHAPE, "do not make shape [2]"),
    (_bin(4, b"\0" * 6, shape=1), None, ErrorCode.INPUT_BAD_SHAPE, "2 bytes after"),
    (_bin(6, struct.pack("<I", 9) + b"ab", shape=1, datatype="BYTES"), None, ErrorCode.INPUT_BAD_SHAPE,
     "says 9 bytes"),
    (b"{}", "500", ErrorCode.SERVE_BAD_REQUEST, "not a length within"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}',
     None, ErrorCode.SERVE_BAD_REQUEST, "no Inference-Header-Content-Length"),
])
def test_malformed_requests_are_refused_with_a_code_and_the_reason(body, header, code, says):
    if isinstance(body, tuple):
        header = str(len(body[0]))
        body = body[0] + body[1]
    with pytest.raises(ProtocolError) as info:
        parse_request(body, header)
    assert info.value.code == code and info.value.status == 400 and says in info.value.message


def test_outputs_come_back_binary_when_asked_and_parse_as_numpy():
    req = InferRequest(inputs={}, id="7", outputs=["y", "results"], binary_outputs={"y"})
    y = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    res = np.empty(2, dtype=object)
    res[:] = [b'{"a":1}', b'{"b":2}']
    body, headers = encode_response("m", "1.2.0", {"y": y, "results": res}, req)
    n = int(headers[HEADER_LENGTH])
    doc = json.loads(body[:n])
    assert doc["model_version"] == "1.2.0" and doc["id"] == "7"
    ys, rs = doc["outputs"]
    assert ys["parameters"]["binary_data_size"] == 24 and "data" not in ys
    np.testing.assert_array_equal(np.frombuffer(body[n:n + 24], np.float32).reshape(2, 3), y)
    assert rs["datatype"] == "BYTES" and rs["data"] == ['{"a":1}', '{"b":2}']
    plain, h = encode_response("m", "1", {"y": y}, InferRequest(inputs={}))
    assert HEADER_LENGTH not in h and json.loads(plain)["outputs"][0]["data"] == y.reshape(-1).tolist()


# -- the batcher, on a model that records what it ran -------------------------------------------------
class _Recorder:
    def __init__(self, delay_s: float = 0.0):
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def run(self, feeds):
        self.gate.wait(5)
        x = feeds["x"]
        if (x < 0).any():
            raise InputError("negative input", code=ErrorCode.INPUT_BAD_SHAPE)
        self.batches.append(len(x))
        time.sleep(self.delay_s)
        return {"y": x * 2}


def _loaded(model, generation=1, batchable=True):
    return SimpleNamespace(model=model, generation=generation, batchable=batchable)


def _pending(loaded, value: float, rows: int = 1, deadline_s: float = 5.0) -> Pending:
    return Pending(loaded, {"x": np.full((rows, 3), value, np.float32)}, deadline=time.monotonic() + deadline_s)


def test_queued_requests_are_joined_up_to_max_batch_and_each_gets_its_own_rows():
    model = _Recorder()
    loaded = _loaded(model)
    b = Batcher("m", ServeMetrics(), max_batch=4, max_delay_s=0.5, delay="fixed")
    try:
        model.gate.clear()  # the first batch blocks until every request is queued
        ps = [_pending(loaded, float(i)) for i in range(10)]
        for p in ps:
            b.submit(p)
        model.gate.set()
        for p in ps:
            assert p.done.wait(5)
        for i, p in enumerate(ps):
            assert p.error is None and np.all(p.outputs["y"] == 2 * i) and p.outputs["y"].shape == (1, 3)
        assert max(model.batches) == 4 and sum(model.batches) == 10
    finally:
        b.stop()


def test_a_lone_request_does_not_wait_for_company_unless_the_delay_is_fixed():
    for delay, least in (("arriving", 0.0), ("fixed", 0.2)):
        b = Batcher("m", ServeMetrics(), max_batch=8, max_delay_s=0.2, delay=delay)
        try:
            p = _pending(_loaded(_Recorder()), 1.0)
            t = time.monotonic()
            b.submit(p)
            assert p.done.wait(5)
            took = time.monotonic() - t
            assert took >= least and (delay == "fixed" or took < 0.1), (delay, took)
        finally:
            b.stop()


def test_a_request_being_received_holds_the_batch_open_for_it():
    model = _Recorder()
    loaded = _loaded(model)
    b = Batcher("m", ServeMetrics(), max_batch=8, max_delay_s=1.0)
    try:
        first = _pending(loaded, 1.0)
        with b.arrival() as arriving:
            b.submit(first)
            time.sleep(0.1)
            assert not first.done.is_set()  # waits: a second request is on its way
            second = _pending(loaded, 2.0)
            b.submit(second, arriving)
        assert first.done.wait(5) and second.done.wait(5)
        assert model.batches == [2]
    finally:
        b.stop()


def test_different_models_and_shapes_are_never_joined():
    model = _Recorder()
    old, new = _loaded(model, generation=1), _loaded(model, generation=2)
    b = Batcher("m", ServeMetrics(), max_batch=8, max_delay_s=0.3, delay="fixed")
    try:
        model.gate.clear()
        ps = [_pending(old, 1.0), _pending(new, 2.0), _pending(old, 3.0),
              Pending(old, {"x": np.ones((1, 5), np.float32)}, deadline=time.monotonic() + 5)]
        for p in ps:
            b.submit(p)
        model.gate.set()
        for p in ps:
            assert p.done.wait(5) and p.error is None
        assert sorted(model.batches) == [1, 1, 2]  # old×2 together; new and the other shape alone
    finally:
        b.stop()


def test_a_bad_request_fails_alone_not_the_batch_it_joined():
    model = _Recorder()
    loaded = _loaded(model)
    b = Batcher("m", ServeMetrics(), max_batch=8, max_delay_s=0.3, delay="fixed")
    try:
        model.gate.clear()
        good, bad, good2 = _pending(loaded, 1.0), _pending(loaded, -1.0), _pending(loaded, 3.0)
        for p in (good, bad, good2):
            b.submit(p)
        model.gate.set()
        for p in (good, bad, good2):
            assert p.done.wait(5)
        assert good.error is None and good2.error is None and np.all(good2.outputs["y"] == 6)
        assert isinstance(bad.error, InputError) and "negative" in bad.error.message
    finally:
        b.stop()


def test_full_queue_is_429_expired_is_504_and_cancelled_never_runs():
    model = _Recorder()
    loaded = _loaded(model, batchable=False)
    metrics = ServeMetrics()
    b = Batcher("m", metrics, max_batch=1, max_queue=3)
    try:
        model.gate.clear()
        running = _pending(loaded, 0.0)
        b.submit(running)
        time.sleep(0.1)  # taken off the queue, blocked in run()
        expiring, cancelled, kept = _pending(loaded, 1.0, deadline_s=0.05), _pending(loaded, 2.0), _pending(loaded, 3.0)
        for p in (expiring, cancelled, kept):
            b.submit(p)
        with pytest.raises(ProtocolError) as info:
            b.submit(_pending(loaded, 4.0))
        assert info.value.status == 429 and info.value.code == ErrorCode.SERVE_OVERLOADED
        assert info.value.headers["Retry-After"] == "1"
        cancelled.cancelled = True
        time.sleep(0.1)
        model.gate.set()
        for p in (running, expiring, cancelled, kept):
            assert p.done.wait(5)
        assert expiring.error.status == 504 and expiring.error.code == ErrorCode.SERVE_DEADLINE_EXCEEDED
        assert cancelled.error is not None and metrics.cancelled["m"] == 1
        assert kept.error is None and model.batches == [1, 1]  # only 'running' and 'kept' ran
    finally:
        b.stop()


def test_metrics_render_as_prometheus_text():
    m = ServeMetrics()
    m.request("m", 200)
    m.request("m", 429)
    m.batch("m", 3)
    for ms in (1, 2, 3, 4, 100):
        m.stage("m", "inference", ms / 1000)
    text = m.render()
    assert 'edgekit_serve_requests_total{model="m",code="429"} 1' in text
    assert 'edgekit_serve_batch_size_bucket{model="m",le="2"} 0' in text
    assert 'edgekit_serve_batch_size_bucket{model="m",le="4"} 1' in text
    line = next(ln for ln in text.splitlines() if 'stage="inference",quantile="0.5"' in ln)
    assert abs(float(line.split()[-1]) - 0.003) < 0.0001
    assert 'edgekit_serve_stage_seconds_count{model="m",stage="inference"} 5' in text
    for ln in text.splitlines():  # every sample line is NAME{labels} VALUE
        assert ln.startswith("#") or len(ln.rsplit(" ", 1)) == 2 and float(ln.rsplit(" ", 1)[1]) >= 0


@pytest.mark.parametrize("doc,code", [
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": [1]}]},
     ErrorCode.SERVE_BAD_REQUEST),
    ({"inputs": [{"name": "x", "shape": [2**32, 2**32], "datatype": "FP32", "data": [1]}]}, ErrorCode.INPUT_BAD_SHAPE),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}, ErrorCode.INPUT_BAD_DTYPE),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [2**70]}]}, ErrorCode.INPUT_BAD_DTYPE),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
      "outputs": [{"name": "y", "parameters": "binary"}]}, ErrorCode.SERVE_BAD_REQUEST),
])
def test_hostile_requests_are_refused_not_crashed_on(doc, code):
    with pytest.raises(ProtocolError) as info:
        parse_request(json.dumps(doc).encode(), None)
    assert info.value.code == code and info.value.status == 400


def test_a_tiny_request_cannot_ask_for_gigabytes_of_bytes_elements():
    head = json.dumps({"inputs": [{"name": "b", "shape": [2_000_000_000], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    t = time.monotonic()
    with pytest.raises(ProtocolError, match="cannot hold"):
        parse_request(head + b"\0" * 8, str(len(head)))
    assert time.monotonic() - t < 0.5


def test_binary_data_false_on_an_output_beats_binary_data_output():
    req = parse_request(json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                                    "parameters": {"binary_data_output": True},
                                    "outputs": [{"name": "y", "parameters": {"binary_data": False}},
                                                {"name": "z"}]}).encode(), None)
    assert not req.wants_binary("y") and req.wants_binary("z")


def test_non_finite_outputs_are_null_in_json_and_exact_in_binary():
    y = np.array([[1.0, np.nan, np.inf]], np.float32)
    body, _ = encode_response("m", "1", {"y": y}, InferRequest(inputs={}))
    out = json.loads(body)["outputs"][0]  # strict JSON: parses
    assert out["data"] == [1.0, None, None] and out["parameters"]["non_finite"] == "null"
    body, h = encode_response("m", "1", {"y": y}, InferRequest(inputs={}, binary_default=True))
    n = int(h[HEADER_LENGTH])
    got = np.frombuffer(body[n:], np.float32)
    assert got[0] == 1.0 and np.isnan(got[1]) and np.isinf(got[2])
