"""Fixtures that build tiny bundles in code: a valid one, and hand-crafted malicious ones.

The model is one MatMul (``y = x @ W``, ``x: [batch, 4]``, ``W: [4, 3]``) whose
weights are small multiples of 1/8, so float32 results are exact and can be
compared with numpy bit for bit.

pytest runs with ``--import-mode=importlib``, so tests cannot import this
module: every helper is reached through the ``kit`` fixture (``kit.npy``,
``kit.zipinfo``, ``kit.WEIGHTS``, ...).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.client
import io
import json
import ssl
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.build.bundle_writer import write_bundle
from edgekit_runtime.contract import bundle_spec
from edgekit_runtime.keyring import Keyring, key_id_of

WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 8 - 0.75
SAMPLE = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
REGULAR_FILE = 0o100644 << 16  # what write_bundle sets: regular file, rw-r--r--


def matmul_onnx(weights: np.ndarray = WEIGHTS) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="edgekit-tests")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def ring_of(*keys: Ed25519PrivateKey) -> Keyring:
    return Keyring({key_id_of(k.public_key()): k.public_key() for k in keys})


def zipinfo(name: str, mode: int | None = REGULAR_FILE) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    if mode is not None:
        info.external_attr = mode
    return info


class BundleKit:
    """Builds valid bundles with ``write_bundle`` and crafted ones with ``zipfile``."""

    WEIGHTS = WEIGHTS
    SAMPLE = SAMPLE
    matmul_onnx = staticmethod(matmul_onnx)
    npy = staticmethod(npy)
    public_pem = staticmethod(public_pem)
    ring_of = staticmethod(ring_of)
    zipinfo = staticmethod(zipinfo)

    def __init__(self, root: Path, key: Ed25519PrivateKey, model: bytes):
        self.root = root
        self.key = key
        self.model = model
        root.mkdir(parents=True, exist_ok=True)

    # -- a valid minimal bundle ------------------------------------------------
    def parts(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """A fresh manifest (``files``/``signing`` still empty) and its members."""
        members = {
            "model.onnx": self.model,
            "health/input.npy": npy(SAMPLE),
            "health/expected_output.npy": npy(SAMPLE @ WEIGHTS),
        }
        manifest = {
            "format": bundle_spec.FORMAT_NAME,
            "format_version": bundle_spec.FORMAT_VERSION,
            "created_at": "2020-01-01T00:00:00+00:00",
            "created_by": "edgekit tests",
            "model": {"name": "matmul", "version": "1.0.0", "release": 1},
            "target": {"name": "onnxruntime-cpu", "device": "generic"},
            "backend": {"name": "onnxruntime", "version": "test", "precision": "fp32", "artifact": "model.onnx",
                        "engines": ["onnxruntime"], "options": {"threads": 1}},
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "layout": None, "quantization": None}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3], "layout": None,
                         "quantization": None}],
            "preprocess": None,
            "postprocess": None,
            "labels": None,
            "metrics": {},
            "calibration": None,
            "health_check": {"input": "health/input.npy", "expected_output": "health/expected_output.npy",
                             "atol": 1e-5, "rtol": 1e-5},
            "files": {},
            "signing": {},
        }
        bundle_spec.validate_manifest({**manifest, "files": {n: {"sha256": "0" * 64, "size": 0} for n in members},
                                       "signing": {"algorithm": "ed25519", "key_id": ""}})
        return copy.deepcopy(manifest), dict(members)

    def write(self, name: str = "ok.ekb", *, manifest: dict | None = None, members: dict | None = None,
              key: Ed25519PrivateKey | None = None) -> Path:
        base_manifest, base_members = self.parts()
        return write_bundle(self.root / name, manifest if manifest is not None else base_manifest,
                            members if members is not None else base_members, key or self.key)

    # -- hand-crafted archives ---------------------------------------------------
    def sign(self, manifest: dict, listed: dict[str, bytes], key: Ed25519PrivateKey | None = None,
             *, fill: bool = True) -> tuple[bytes, bytes]:
        """``(manifest.json, signature.json)`` bytes, the manifest listing ``listed`` and validly signed."""
        key = key or self.key
        manifest = copy.deepcopy(manifest)
        kid = key_id_of(key.public_key())
        if fill:
            manifest["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                 for n, d in sorted(listed.items())}
            manifest["signing"] = {"algorithm": "ed25519", "key_id": kid}
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        signature = {"algorithm": "ed25519", "key_id": kid,
                     "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}
        return manifest_bytes, json.dumps(signature).encode()

    def craft(self, name: str, entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
        """Write exactly ``entries`` (in order, duplicates allowed) into a ZIP."""
        path = self.root / name
        with zipfile.ZipFile(path, "w") as zf:
            for entry, data in entries:
                info = entry if isinstance(entry, zipfile.ZipInfo) else zipinfo(entry)
                zf.writestr(info, data)
        return path

    def craft_signed(self, name: str, *, manifest: dict | None = None,
                     entries: list[tuple[str | zipfile.ZipInfo, bytes]] | None = None,
                     listed: dict[str, bytes] | None = None, key: Ed25519PrivateKey | None = None,
                     signature: bool = True) -> Path:
        """A ZIP with a validly signed manifest listing ``listed`` (default: the entries)."""
        base_manifest, base_members = self.parts()
        manifest = manifest if manifest is not None else base_manifest
        if entries is None:
            entries = list(base_members.items())
        if listed is None:
            listed = {(e.filename if isinstance(e, zipfile.ZipInfo) else e): d for e, d in entries}
        manifest_bytes, signature_bytes = self.sign(manifest, listed, key)
        head = [("manifest.json", manifest_bytes)] + ([("signature.json", signature_bytes)] if signature else [])
        return self.craft(name, head + list(entries))


@pytest.fixture(scope="session")
def tiny_model() -> bytes:
    return matmul_onnx()


@pytest.fixture(scope="session")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def key2() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def ring(key) -> Keyring:
    return ring_of(key)


@pytest.fixture
def kit(tmp_path, key, tiny_model) -> BundleKit:
    return BundleKit(tmp_path / "bundles", key, tiny_model)


@pytest.fixture
def no_temp_leftovers(tmp_path, monkeypatch):
    """Point ``tempfile`` at an empty folder; the test asserts it is still empty."""
    import tempfile

    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# -- edgekit-runtime serve ---------------------------------------------------------------------------------
class Client:
    """One keep-alive HTTP connection, as a KServe client holds it."""

    def __init__(self, server, token: str | None = None, context: ssl.SSLContext | None = None):
        if context is not None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30, context=context)
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
        r = self.conn.getresponse()
        data = r.read()
        ctype = r.getheader("Content-Type", "")
        return r.status, (json.loads(data) if ctype.startswith("application/json") else data), r

    def infer(self, name: str, x: np.ndarray, **params):
        body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}], **params}).encode()
        return self.request("POST", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"})

    def close(self):
        self.conn.close()


def y_of(doc: dict) -> np.ndarray:
    out = next(o for o in doc["outputs"] if o["name"] == "y")
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


@pytest.fixture
def serve(ring):
    """Start a server on a free port over the given sources; stopped at teardown. ``serve.Client`` and
    ``serve.y_of`` are the test client and the reader of a matmul answer."""
    from edgekit_runtime.serve import Server, ServeSettings
    from edgekit_runtime.serve.models import Route

    servers: list = []

    def start(*sources: Path, keyring=ring, **settings):
        s = ServeSettings(port=0, **settings)
        routes = [Route(p, max_batch=s.max_batch, check_every_s=s.check_every_s, keyring=keyring, threads=1)
                  for p in sources]
        server = Server(routes, s)
        server.start()
        servers.append(server)
        return server

    start.Client = Client
    start.y_of = y_of
    yield start
    for s in servers:
        s.stop()
