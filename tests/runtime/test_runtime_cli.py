"""`edgekit-runtime` on a device: verify, run, bench; errors print their code and exit 3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BUNDLE = GOLDEN / "v1.0-onnxruntime-matmul.ekb"
KEY = GOLDEN / "golden.pub"


def cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgekit_runtime.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_verify_json():
    out = json.loads(cli("verify", BUNDLE, "--keyring", KEY, "--json").stdout)
    assert out["ok"] and out["files"] == 4 and out["format_version"] == "1.0"


def test_run_on_images(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.array([[255, 0], [0, 255]], np.uint8))
    rows = json.loads(cli("run", BUNDLE, tmp_path, "--keyring", KEY, "--json", "--top-k", "2").stdout)
    assert len(rows) == 1 and [t["label"] for t in rows[0]["top_k"]] == ["two", "zero"]


def test_bench_writes_json(tmp_path):
    out = tmp_path / "r.json"
    cli("bench", BUNDLE, "--keyring", KEY, "--queries", "20", "--seconds", "0.1", "--batch", "2", "--json-out", out)
    r = json.loads(out.read_text())
    assert r["single_stream"]["inference"]["count"] >= 20 and r["offline"]["batch"] == 2


def test_untrusted_bundle_exits_3_with_code(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = cli("verify", BUNDLE, "--keyring", other, check=False)
    assert proc.returncode == 3 and "E104 BUNDLE_UNTRUSTED_KEY" in proc.stderr



def test_json_errors_are_one_document_on_stdout(tmp_path):
    """With --json, a failure is one JSON document too: the runtime's stable code, and the exit code 2 or 3."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cases = [
        (("verify", tmp_path / "missing.ekb", "--json"), 3, "BUNDLE_UNREADABLE"),
        (("verify", BUNDLE, "--keyring", other, "--json"), 3, "BUNDLE_UNTRUSTED_KEY"),
        (("run", BUNDLE, "--json"), 2, "CONFIG_INVALID"),  # no images: a usage error
        (("bench", BUNDLE, "--keyring", KEY, "--lock-clocks", "--json"), 2, "CONFIG_INVALID"),  # not a Jetson
    ]
    for args, rc, name in cases:
        proc = cli(*args, check=False)
        doc = json.loads(proc.stdout)
        assert proc.returncode == rc and doc["ok"] is False and doc["error"]["name"] == name, (args, proc.stdout)
        assert set(doc["error"]) >= {"code", "name", "message", "hint"}


def test_agent_json_errors_are_one_document_on_stdout(tmp_path):
    def agent(*args):
        return subprocess.run([sys.executable, "-m", "edgekit_runtime.agent.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    usage = agent("status", "--json")  # --config is missing
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["name"] == "CONFIG_INVALID"
    for args in (("status", "--config", tmp_path / "none.toml", "--json"),
                 ("install", BUNDLE, "--config", tmp_path / "none.toml", "--json"),
                 ("run", "--config", tmp_path / "none.toml", "--json")):
        proc = agent(*args)
        doc = json.loads(proc.stdout)
        assert proc.returncode == 3 and doc["error"]["code"] == 401 and "none.toml" in doc["error"]["message"], args
