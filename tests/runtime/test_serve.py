"""``edgekit-runtime serve`` over real sockets: the KServe v2 endpoints, refusals that leave the server serving,
batching under concurrent clients, TLS and a bearer token, and zero failed requests across OTA switches."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit_runtime.contract.errors import ErrorCode
from edgekit_runtime.keyring import Keyring

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"


def test_health_metadata_and_an_exact_answer(kit, serve):
    server = serve(kit.write("m.ekb"))
    c = serve.Client(server)
    assert c.request("GET", "/v2/health/live")[:2] == (200, {"live": True})
    assert c.request("GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    status, meta, _ = c.request("GET", "/v2/models/matmul")
    assert status == 200 and meta["versions"] == ["1.0.0"] and meta["platform"] == "edgekit_onnxruntime"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["batching"]["enabled"] is True
    assert c.request("GET", "/v2/models/matmul/versions/1.0.0/ready")[:2] == (200, {"name": "matmul", "ready": True})
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
    status, doc, r = c.infer("matmul", x, id="q1")
    assert status == 200 and doc["id"] == "q1" and doc["model_version"] == "1.0.0"
    assert r.getheader("Edgekit-Model-Version") == "1.0.0"
    np.testing.assert_array_equal(serve.y_of(doc), x @ kit.WEIGHTS)  # weights in 1/8ths: float32 exact
    assert c.request("GET", "/v2/models/matmul/versions/9.9.9")[0] == 404
    status, err, _ = c.infer("nosuch", x)
    assert status == 404 and err["code"] == ErrorCode.SERVE_MODEL_NOT_FOUND and "matmul" in err["error"]


def test_binary_tensors_in_and_out(kit, serve):
    server = serve(kit.write("m.ekb"))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    status, body, r = serve.Client(server).request("POST", "/v2/models/matmul/infer", head + x.tobytes(),
                                             {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200
    n = int(r.getheader("Inference-Header-Content-Length"))
    doc = json.loads(body[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 9 * 4
    np.testing.assert_allclose(np.frombuffer(body[n:], np.float32).reshape(3, 3), x @ kit.WEIGHTS, rtol=1e-6)


def test_malformed_requests_get_a_4xx_with_the_runtime_code_and_the_server_keeps_serving(kit, serve):
    server = serve(kit.write("m.ekb"), max_body_mb=8)
    c = serve.Client(server)
    good = np.ones((1, 4), np.float32)
    bad = [
        (c.infer("matmul", np.ones((1, 5), np.float32)), 400, ErrorCode.INPUT_BAD_SHAPE),
        (c.request("POST", "/v2/models/matmul/infer", json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}).encode()),
         400, ErrorCode.INPUT_BAD_DTYPE),
        (c.request("POST", "/v2/models/matmul/infer", b"{not json"), 400, ErrorCode.SERVE_BAD_REQUEST),
        (c.request("POST", "/v2/models/matmul/infer", json.dumps(
            {"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()),
         400, ErrorCode.INPUT_MISSING),
        (c.request("POST", "/v2/models/matmul/infer", b"\xff\xd8 not a jpeg", {"Content-Type": "image/jpeg"}),
         400, ErrorCode.INPUT_UNSUPPORTED),  # a tensor model takes no images
    ]
    for (status, err, _), want_status, want_code in bad:
        assert (status, err["code"]) == (want_status, want_code), err
        assert err["error"] and err["name"] == ErrorCode(want_code).name
        assert c.infer("matmul", good)[0] == 200  # the same connection still serves
    # 50 MB: refused before it is read into memory, and the connection is closed
    big = serve.Client(server)
    status, err, r = big.request("POST", "/v2/models/matmul/infer", b"0" * (50 * 2**20))
    assert status == 413 and err["code"] == ErrorCode.SERVE_REQUEST_TOO_LARGE and r.getheader("Connection") == "close"
    assert serve.Client(server).infer("matmul", good)[0] == 200
    # chunked bodies (no Content-Length) are refused too
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(b"POST /v2/models/matmul/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert raw.recv(200).startswith(b"HTTP/1.1 411")
    raw.close()
    metrics = serve.Client(server).request("GET", "/metrics")[1].decode()
    assert 'edgekit_serve_requests_total{model="matmul",code="400"} 5' in metrics
    assert 'edgekit_serve_requests_total{model="matmul",code="413"} 1' in metrics


def test_a_refused_post_never_leaves_its_body_to_be_read_as_the_next_request(kit, serve):
    """An unknown route, or a missing token, refuses before the body is read: the connection closes, so a body
    that looks like a request is never answered as one."""
    for token in (None, "t0ken"):
        server = serve(kit.write(f"m-{token}.ekb"), token=token)
        smuggled = b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n"
        path = "/v2/models/matmul/infer" if token else "/v2/models/nosuch/infer"
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
                    + smuggled)
        got = b""
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                break
            got += chunk
        raw.close()
        assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 40"), got[:200]


def test_a_malformed_request_gets_an_answer_not_a_reset(kit, serve):
    server = serve(kit.write("m.ekb"))
    c = serve.Client(server)
    for doc in ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4],
                             "parameters": [1]}]},
                {"inputs": [{"name": "x", "shape": [2**32, 2**32], "datatype": "FP32", "data": [1]}]},
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "UINT8", "data": [300, 1, 2, 3]}]}):
        status, err, _ = c.request("POST", "/v2/models/matmul/infer", json.dumps(doc).encode())
        assert status == 400 and err["code"] in (300, 301, 500), err
    assert c.infer("matmul", np.ones((1, 4), np.float32))[0] == 200


def test_images_are_decoded_preprocessed_and_answered_with_the_devices_results(tmp_path, serve):
    """The golden detector (letterbox 32×32, NMS on the device): a PNG sent bare or as a BYTES tensor gives
    the boxes Model.predict gives for that image."""
    import cv2

    import edgekit_runtime

    ring = Keyring.from_paths(GOLDEN / "v1.4-golden.pub")
    bundle = GOLDEN / "v1.4-onnxruntime-detector.ekb"
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image[10:30, 20:44] = (250, 30, 30)
    ok, png = cv2.imencode(".png", image[:, :, ::-1])
    with edgekit_runtime.load(bundle, keyring=ring) as model:
        want = model.predict([image])[0]
    server = serve(bundle, keyring=ring)
    c = serve.Client(server)
    status, doc, _ = c.request("POST", "/v2/models/golden-detector/infer", png.tobytes(), {"Content-Type": "image/png"})
    assert status == 200 and [o["name"] for o in doc["outputs"]] == ["results"]
    got = json.loads(doc["outputs"][0]["data"][0])
    assert got["image_size"] == want["image_size"] == [64, 48]
    assert [d["label"] for d in got["detections"]] == [d["label"] for d in want["detections"]]
    for a, b in zip(got["detections"], want["detections"]):
        assert np.allclose(a["box"], b["box"], atol=1e-4) and abs(a["score"] - b["score"]) < 1e-6
    # two images in one BYTES tensor (tritonclient's binary form), raw output asked for by name
    blob = b"".join(len(p).to_bytes(4, "little") + p for p in (png.tobytes(), png.tobytes()))
    head = json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "results"}, {"name": model.outputs[0].name}]}).encode()
    status, doc, _ = c.request("POST", "/v2/models/golden-detector/infer", head + blob,
                               {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200 and doc["outputs"][0]["shape"] == [2] and doc["outputs"][1]["shape"][0] == 2, doc
    assert json.loads(doc["outputs"][0]["data"][1]) == got
    status, err, _ = c.request("POST", "/v2/models/golden-detector/infer", b"\x89PNG broken", {"Content-Type": "image/png"})
    assert status == 400 and err["code"] == ErrorCode.INPUT_UNREADABLE
    assert c.request("GET", "/v2/health/ready")[0] == 200


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(kit, serve):
    server = serve(kit.write("m.ekb"), max_batch=8, max_delay_ms=20, batch_delay="fixed")
    errors: list[str] = []

    def client(i: int) -> None:
        c = serve.Client(server)
        for j in range(15):
            x = np.full((1, 4), i * 100 + j, np.float32)
            status, doc, _ = c.infer("matmul", x)
            if status != 200 or not np.array_equal(serve.y_of(doc), x @ kit.WEIGHTS):
                errors.append(f"client {i} request {j}: {status} {doc}")
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    text = serve.Client(server).request("GET", "/metrics")[1].decode()
    count = int(next(ln for ln in text.splitlines() if ln.startswith("edgekit_serve_batch_size_count")).split()[-1])
    rows = int(next(ln for ln in text.splitlines() if ln.startswith("edgekit_serve_batch_size_sum")).split()[-1])
    assert rows == 120 and count < 120 / 2, (rows, count)  # batches of several requests on average
    assert 'stage="queue",quantile="0.99"' in text and 'stage="total",quantile="0.5"' in text


def test_a_client_that_goes_away_is_not_run(kit, serve, monkeypatch):
    server = serve(kit.write("m.ekb"), max_batch=1)
    loaded = server.routes["matmul"].current
    real, gate, ran = loaded.model.run, threading.Event(), []

    def slow(feeds):
        gate.wait(10)
        ran.append(float(feeds["x"][0, 0]))
        return real(feeds)

    monkeypatch.setattr(loaded.model, "run", slow)
    first = threading.Thread(target=lambda: serve.Client(server).infer("matmul", np.zeros((1, 4), np.float32)))
    first.start()
    time.sleep(0.2)  # the batcher is blocked in the first request
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [7, 7, 7, 7]}]})
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(f"POST /v2/models/matmul/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                .encode())
    time.sleep(0.2)
    raw.close()  # gone before its turn
    time.sleep(0.2)
    gate.set()
    first.join(10)
    assert ran == [0.0]  # the abandoned request never reached the engine
    text = serve.Client(server).request("GET", "/metrics")[1].decode()
    assert 'edgekit_serve_cancelled_total{model="matmul"} 1' in text


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_a_bearer_token(kit, serve, tmp_path):
    cert, key = _self_signed(tmp_path)
    server = serve(kit.write("m.ekb"), token="s3cret", tls_cert=cert, tls_key=key)
    ctx = ssl.create_default_context(cafile=str(cert))
    x = np.ones((1, 4), np.float32)
    assert serve.Client(server, context=ctx).request("GET", "/v2/health/ready")[0] == 200  # probes need no token
    status, err, r = serve.Client(server, context=ctx).infer("matmul", x)
    assert status == 401 and err["code"] == ErrorCode.SERVE_UNAUTHORIZED and r.getheader("WWW-Authenticate")
    assert serve.Client(server, token="wrong", context=ctx).infer("matmul", x)[0] == 401
    assert serve.Client(server, token="wrong", context=ctx).request("GET", "/metrics")[0] == 401
    status, doc, _ = serve.Client(server, token="s3cret", context=ctx).infer("matmul", x)
    assert status == 200 and np.array_equal(serve.y_of(doc), x @ kit.WEIGHTS)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):  # plain HTTP is not served
        serve.Client(server).request("GET", "/v2/health/live")


def test_the_cli_serves_until_sigterm(kit, key, tmp_path):
    import signal

    bundle = kit.write("m.ekb")
    (tmp_path / "k.pub").write_bytes(kit.public_pem(key))
    (tmp_path / "token").write_text("t0ken\n")
    proc = subprocess.Popen([sys.executable, "-m", "edgekit_runtime.cli", "serve", f"mm={bundle}", "--port", "0",
                             "--keyring", str(tmp_path / "k.pub"), "--token-file", str(tmp_path / "token")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["models"]["mm"]["version"] == "1.0.0"
        port = int(info["listening"].rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v2/models/mm/infer", body=json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}),
            headers={"Authorization": "Bearer t0ken"})
        doc = json.loads(conn.getresponse().read())
        assert doc["outputs"][0]["data"] == (kit.SAMPLE @ kit.WEIGHTS).reshape(-1).tolist()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0, proc.stderr.read()
    bad = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", "serve", str(tmp_path / "none.ekb"),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and json.loads(bad.stdout)["error"]["code"] == ErrorCode.CONFIG_INVALID


_TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.http as httpclient
url, image = sys.argv[1], sys.argv[2]
client = httpclient.InferenceServerClient(url=url)
out = {"live": client.is_server_live(), "ready": client.is_model_ready("matmul"),
       "meta": client.get_model_metadata("matmul")}
x = httpclient.InferInput("x", [2, 4], "FP32")
x.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4) / 4)  # binary by default
result = client.infer("matmul", [x], outputs=[httpclient.InferRequestedOutput("y")])
out["y"] = result.as_numpy("y").tolist()
out["version"] = result.get_response()["model_version"]
img = httpclient.InferInput("image", [1], "BYTES")
img.set_data_from_numpy(np.array([open(image, "rb").read()], dtype=object))
det = client.infer("golden-detector", [img])
out["results"] = [json.loads(r) for r in det.as_numpy("results")]
print(json.dumps(out))
"""


def test_tritonclient_http_works_unchanged(kit, serve, tmp_path):
    """NVIDIA's tritonclient (HTTP, binary tensors by default) against the endpoint: health, metadata, a tensor
    model and an image model. In a child process: tritonclient's HTTP client runs on gevent."""
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    import cv2

    (tmp_path / "k.pub").write_bytes(kit.public_pem(kit.key))
    ring = Keyring.from_paths(GOLDEN / "v1.4-golden.pub", tmp_path / "k.pub")
    server = serve(kit.write("m.ekb"), GOLDEN / "v1.4-onnxruntime-detector.ekb", keyring=ring)
    image = np.zeros((40, 40, 3), np.uint8)
    image[5:30, 8:33] = 255
    cv2.imwrite(str(tmp_path / "img.png"), image)
    proc = subprocess.run([sys.executable, "-c", _TRITON_CLIENT, f"127.0.0.1:{server.port}", str(tmp_path / "img.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["meta"]["inputs"][0]["shape"] == [-1, 4]
    assert out["version"] == "1.0.0"
    np.testing.assert_array_equal(np.asarray(out["y"], np.float32),
                                  (np.arange(8, dtype=np.float32).reshape(2, 4) / 4) @ kit.WEIGHTS)
    assert out["results"][0]["image_size"] == [40, 40] and "detections" in out["results"][0]


def test_a_shadow_candidate_is_compared_on_live_traffic_and_never_served(kit, key, serve, tmp_path):
    """The candidate (-W: every output flipped) runs on the served batches; the answers stay the served model's,
    and the report says how far the candidate is: cosine -1, top-1 agreement well under 1, and its latency."""
    import edgekit_runtime

    manifest, members = kit.parts()
    members["model.onnx"] = kit.matmul_onnx(-kit.WEIGHTS)
    members["health/expected_output.npy"] = kit.npy(kit.SAMPLE @ -kit.WEIGHTS)
    manifest["model"].update(version="2.0.0", release=2)
    candidate = kit.write("cand.ekb", manifest=manifest, members=members)
    (tmp_path / "k.pub").write_bytes(kit.public_pem(key))
    server = serve(kit.write("m.ekb"))
    shadow = server.add_shadow("matmul", edgekit_runtime.load(candidate, keyring=tmp_path / "k.pub", threads=1))
    c = serve.Client(server)
    rng = np.random.default_rng(3)
    for _ in range(40):
        x = rng.normal(size=(2, 4)).astype(np.float32)
        status, doc, r = c.infer("matmul", x)
        assert status == 200 and r.getheader("Edgekit-Model-Version") == "1.0.0"
        assert np.allclose(serve.y_of(doc), x @ kit.WEIGHTS, atol=1e-5)  # the served model's answer, always
    deadline = time.monotonic() + 10
    while shadow.report()["rows"] + 2 * shadow.report()["skipped_batches"] < 80 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, report, _ = c.request("GET", "/v2/models/matmul/shadow")
    assert status == 200 and report["candidate"]["version"] == "2.0.0" and report["served"]["version"] == "1.0.0"
    assert report["rows"] >= 2 and report["failed_batches"] == 0
    assert report["agreement"]["cosine"] == pytest.approx(-1.0, abs=1e-6) and report["agreement"]["top1"] < 0.5
    assert report["latency_ms"]["candidate_p50"] > 0 and report["latency_ms"]["ratio"] > 0
    metrics = c.request("GET", "/metrics")[1].decode()
    assert 'edgekit_serve_shadow_agreement{model="matmul",candidate="2.0.0",measure="cosine"} -1.0' in metrics
    route = server.route_report("matmul")  # what --report-dir leaves for the agent's telemetry
    assert route["requests"] == {"200": 40} and route["rows"] == 80 and route["model"]["version"] == "1.0.0"
    assert route["stages"]["inference"]["p50_ms"] > 0 and route["shadow"]["candidate"]["version"] == "2.0.0"
    json.dumps(route)
    assert c.request("GET", "/v2/models/nosuch/shadow")[0] == 404


def test_a_shadow_detector_against_itself_agrees_box_for_box(serve):
    import cv2

    import edgekit_runtime

    ring = Keyring.from_paths(GOLDEN / "v1.4-golden.pub")
    bundle = GOLDEN / "v1.4-onnxruntime-detector.ekb"
    server = serve(bundle, keyring=ring)
    shadow = server.add_shadow("golden-detector", edgekit_runtime.load(bundle, keyring=ring, threads=1))
    c = serve.Client(server)
    rng = np.random.default_rng(0)
    for _ in range(6):
        ok, png = cv2.imencode(".png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
        assert c.request("POST", "/v2/models/golden-detector/infer", png.tobytes(),
                         {"Content-Type": "image/png"})[0] == 200
    deadline = time.monotonic() + 10
    while shadow.report()["rows"] + shadow.report()["skipped_batches"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    agreement = shadow.report()["agreement"]
    assert agreement["box_f1"] == 1.0 and agreement["cosine"] == pytest.approx(1.0)
    assert agreement.get("box_iou", 1.0) == pytest.approx(1.0)


def test_a_shadow_that_takes_other_inputs_is_refused(kit, serve):
    import edgekit_runtime

    from edgekit_runtime.contract.errors import RuntimeConfigError

    server = serve(kit.write("m.ekb"))
    other = edgekit_runtime.load(GOLDEN / "v1.4-onnxruntime-detector.ekb",
                                 keyring=Keyring.from_paths(GOLDEN / "v1.4-golden.pub"))
    try:
        with pytest.raises(RuntimeConfigError, match="inputs"):
            server.add_shadow("matmul", other)
    finally:
        other.close()
